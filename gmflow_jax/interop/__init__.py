"""Interop with the official GM-DiT checkpoint (`Lakonik/gmflow_imagenet_k8_ema`, diffusers format).

One concept per module:

=====================  ============================================================================
module                 what it is
=====================  ============================================================================
`key_table`            the conversion tables: `KEY_TABLE` (every official GM-DiT / SpectrumMLP key
                       -> our parameter path and transform) and the diffusers VAE table, with the
                       state-dict conversions that apply them
`official_config`      the official `config.json` files -> `GMDiTConfig` / SpectrumMLP sizes
`folder_files`         reading a weights folder's files (errors name the file; relative paths
                       from a file must stay inside its folder)
`staged_folder`        writing a whole folder atomically (staged beside it, renamed into place)
`diffusers_folder`     reading the raw diffusers folder (safetensors, weights variants), converting
                       it in memory
`converted_folder`     our converted folder: `convert_official_folder` / `convert_vae_folder` write
                       it, `load_official` reads it (checked against its manifest) or the raw
                       folder, `load_vae_folder` a VAE of either form
=====================  ============================================================================
"""
