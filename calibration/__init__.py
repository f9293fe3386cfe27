"""calibration stage of dfosd."""
