"""Training data: the 2-D checkerboard (§4.8) and image data sets."""
