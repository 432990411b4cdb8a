"""gmflow_jax: Gaussian Mixture Flow Matching (GMFlow, Chen et al., ICML 2025) in JAX/Flax."""

__version__ = "0.1.0"
