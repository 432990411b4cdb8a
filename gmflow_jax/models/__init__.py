"""Networks (`docs/math.md` §6): GM-DiT, SpectrumMLP and their fixed embeddings."""

from gmflow_jax.models.embeddings import sincos_position_embedding_2d, timestep_embedding
from gmflow_jax.models.gm_dit import DiTBlock, GMDiT, GMDiTConfig, TimestepEmbedder, gm_dit_config
from gmflow_jax.models.spectrum_mlp import SpectrumMLP

__all__ = [
    "DiTBlock",
    "GMDiT",
    "GMDiTConfig",
    "SpectrumMLP",
    "TimestepEmbedder",
    "gm_dit_config",
    "sincos_position_embedding_2d",
    "timestep_embedding",
]
from gmflow_jax.models.toy_mlp import ToyMLP as ToyMLP  # noqa: E402
