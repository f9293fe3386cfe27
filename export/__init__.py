"""export stage of dfosd."""
