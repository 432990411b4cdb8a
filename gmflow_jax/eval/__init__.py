"""Evaluation: checkerboard metrics and figures (§4.9, §7), image metrics."""
