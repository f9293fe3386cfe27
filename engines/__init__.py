"""engines stage of dfosd."""
