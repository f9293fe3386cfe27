"""training stage of dfosd."""
