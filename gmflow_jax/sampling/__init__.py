"""Sampling: THE driver (noise -> samples in padded chunks over a mesh, traced guidance scale) and
the random streams its callers use. See `sampling.driver` and `sampling.streams`."""
