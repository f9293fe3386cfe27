"""runtime stage of dfosd."""
