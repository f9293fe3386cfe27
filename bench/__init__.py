"""bench stage of dfosd."""
