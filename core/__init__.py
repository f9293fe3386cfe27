"""core stage of dfosd."""
