"""Tiny random-weight Wan pipelines (2.1: one transformer; 2.2 A14B: two experts switched at boundary_ratio; 2.2
TI2V-5B layout: a 48-channel VAE and expand_timesteps) saved as diffusers folders, built offline in about a second.

The layout follows diffusers' own Wan tests (tests/pipelines/wan/test_wan.py, `get_dummy_components`: a 3-channel
base AutoencoderKLWan with 8x spatial and 4x temporal compression, a two-layer WanTransformer3DModel), except that
the UMT5 encoder is built from a small config and the tokenizer is tiny_diffusers' T5 unigram tokenizer instead of
downloaded ones. The scheduler is FlowMatchEulerDiscreteScheduler, so the pipeline's sampler is Euler, as ours.
"""

from __future__ import annotations

from pathlib import Path

import torch

import tiny_diffusers


def umt5_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0))


def wan_transformer(channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=channels, out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def ti2v_vae():
    """Wan2.2-TI2V-5B's VAE layout: 48 latent channels, residual blocks, 2x2 pixel patches in and out (12 channels),
    16x spatial and 4x temporal compression; tiny widths."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                            out_channels=12, scale_factor_spatial=16,
                            latents_mean=[0.1 * (k % 5) for k in range(48)], latents_std=[1.0 + 0.1 * (k % 3) for k in range(48)])


def build_wan(folder: str | Path, seed: int = 0, experts: int = 1, boundary_ratio: float = 0.875,
              ti2v: bool = False, shift: float = 3.0) -> Path:
    """A WanPipeline with random weights saved to `folder`: Wan 2.1 (experts=1) or Wan 2.2 A14B's two-expert layout
    (experts=2, switched at `boundary_ratio`); `ti2v`: Wan2.2-TI2V-5B's layout (its 48-channel VAE, a 48-channel
    transformer, one timestep per token: expand_timesteps)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = ti2v_vae() if ti2v else AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                   temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=tiny_diffusers.t5_tokenizer(), text_encoder=umt5_encoder(), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                       transformer=wan_transformer(48 if ti2v else 16),
                       transformer_2=wan_transformer() if experts == 2 else None,
                       boundary_ratio=boundary_ratio if experts == 2 else None, expand_timesteps=ti2v)
    pipe.save_pretrained(folder)
    return Path(folder)
