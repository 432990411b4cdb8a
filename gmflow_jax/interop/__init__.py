"""Interop with the official GM-DiT checkpoint (`Lakonik/gmflow_imagenet_k8_ema`, diffusers format).

One concept per module:

=====================  ============================================================================
module                 what it is
=====================  ============================================================================
`key_table`            `KEY_TABLE`: every official key -> our parameter path and transform, and
                       the state-dict conversions that apply it
`official_config`      the official `config.json` files -> `GMDiTConfig` / SpectrumMLP sizes
`diffusers_folder`     reading the raw diffusers folder (safetensors, weights variants), converting
                       it in memory
`converted_folder`     our converted folder: `convert_official_folder` writes it, `load_official`
                       reads it or the raw folder, `load_vae_folder` a VAE of either form
=====================  ============================================================================

The VAE has its own key table in `gmflow_jax.models.vae` (§4.8).
"""
