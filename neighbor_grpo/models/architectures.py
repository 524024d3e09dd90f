"""Random-weight models of real architectures, built in memory without downloading anything: FLUX.1-dev and
SD3.5-medium transformers and VAEs at their published configs, tiny versions of both for CPU runs, and the digits
models. For throughput benchmarks, the planner and GPU checks: random weights cost the same FLOPs as trained ones."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from neighbor_grpo.models import load_adapter

ARCHS = ("builtin", "builtin-unet", "tiny-digits", "sd35-medium", "flux-dev", "tiny-sd3", "tiny-flux")


def build_adapter(arch: str, resolution: int, device: str, dtype: torch.dtype):
    """The model adapter of an architecture (the velocity net in `adapter.net`), on `device`.

    builtin: the cached built-in digits model (16x16 images; `resolution` is fixed); builtin-unet: its
    compute-bound conv U-Net sibling (builtin:digits-unet, ~17 MFLOP per sample). tiny-digits: a small random
    digits net (tests). sd35-medium / flux-dev: random-init transformers of the real architectures; tiny-sd3 /
    tiny-flux: the same code with tiny configs, for CPU runs. Random weights cost the same FLOPs as trained ones.
    """
    if arch in ("builtin", "builtin-unet"):
        from neighbor_grpo.builtin.pretrain import ensure_builtin_model

        adapter = load_adapter(str(ensure_builtin_model(arch.replace("builtin", "digits"), progress=False)), device=device)
    elif arch == "tiny-digits":
        from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig

        adapter = DigitsAdapter.create(DigitsNetConfig(hidden=32, depth=2, cond_dim=16), seed=0)
    elif arch in ("sd35-medium", "flux-dev", "tiny-sd3", "tiny-flux"):
        adapter = build_diffusers_adapter(arch, resolution, device, dtype)
    else:
        raise ValueError(f"--arch: unknown {arch!r}; choose from {ARCHS}")
    if arch in ("builtin", "builtin-unet", "tiny-digits") and resolution != adapter.net_config.image_size:
        raise ValueError(f"--resolution: the {arch} model makes {adapter.net_config.image_size}x"
                         f"{adapter.net_config.image_size} images; got {resolution}")
    adapter.net.to(device)
    return adapter


# Random-weight stand-ins for the real checkpoints: the transformer and VAE configs of FLUX.1-dev and SD3.5-medium
# (their config.json on the Hub), and one-block tiny versions for CPU runs. Text encoders are frozen and run once
# per prompt (the adapters cache the embeddings), so they are replaced by random embeddings of the real shapes.
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
TINY_VAE = dict(block_out_channels=(4, 4), layers_per_block=1, norm_num_groups=1, use_quant_conv=False,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                use_post_quant_conv=False, scaling_factor=1.5035, shift_factor=0.0609)
DIFFUSERS_ARCHS = {
    "flux-dev": {"transformer": dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                 "vae": FLUX_VAE, "text": (512, 4096, 768)},
    "tiny-flux": {"transformer": dict(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                      guidance_embeds=True, axes_dims_rope=(4, 4, 8)),
                  "vae": {**TINY_VAE, "latent_channels": 1}, "text": (16, 32, 32)},
    "sd35-medium": {"transformer": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                        qk_norm="rms_norm"),
                    "vae": {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}, "text": (333, 4096, 2048)},
    "tiny-sd3": {"transformer": dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                     pooled_projection_dim=64, out_channels=4),
                 "vae": {**TINY_VAE, "latent_channels": 4}, "text": (16, 32, 64)},
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created in `dtype` (a 12B transformer never exists in fp32 on the way to bf16)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_text_embeddings(tokens: int, width: int, pooled: int, device, dtype):
    """encode_new_prompts stand-in: fixed random embeddings per prompt (keyed by its CRC), the real shapes."""
    import zlib

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        generators = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        embeds = torch.stack([torch.randn(tokens, width, generator=g) for g in generators])
        pooled_embeds = torch.stack([torch.randn(pooled, generator=g) for g in generators])
        return {"prompt_embeds": embeds.to(device, dtype), "pooled_prompt_embeds": pooled_embeds.to(device, dtype)}

    return encode


def build_diffusers_adapter(arch: str, resolution: int, device: str, dtype: torch.dtype, spec: dict | None = None,
                            options: dict | None = None):
    """The project's FluxAdapter / SD3Adapter around a random-weight pipeline built in memory (nothing downloaded),
    at `resolution` (a side, or (height, width)). `spec` replaces DIFFUSERS_ARCHS[arch] (the planner's shipped configs; FLUX when `arch` names it), `options`
    are model options (ModelConfig keys) on top of dtype and resolution. On device "meta" nothing is allocated."""
    import diffusers

    from neighbor_grpo.models.diffusers_common import model_options
    from neighbor_grpo.models import flux2_zimage_archs, qwen_kontext_wan_archs

    for family in (flux2_zimage_archs, qwen_kontext_wan_archs):  # their own pipelines and prompt features
        if arch in family.FAMILIES:
            return family.build_random_adapter(arch, spec, resolution, device, dtype, options)
    height, width = resolution if isinstance(resolution, tuple) else (resolution, resolution)
    spec = spec or DIFFUSERS_ARCHS[arch]
    flux = "flux" in arch
    if flux:
        from neighbor_grpo.models.flux import FluxAdapter as adapter_class
    else:
        from neighbor_grpo.models.sd3 import SD3Adapter as adapter_class
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(0)
        transformer_class = diffusers.FluxTransformer2DModel if flux else diffusers.SD3Transformer2DModel
        transformer = transformer_class(**spec["transformer"])
        vae = diffusers.AutoencoderKL(**{"in_channels": 3, "out_channels": 3, **spec["vae"]})
    scheduler = (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
                 if flux else diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    encoders = {"text_encoder": torch.nn.Identity(), "tokenizer": None, "text_encoder_2": torch.nn.Identity(),
                "tokenizer_2": None}
    if flux:
        pipeline = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **encoders)
    else:
        pipeline = diffusers.StableDiffusion3Pipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                                                      text_encoder_3=torch.nn.Identity(), tokenizer_3=None, **encoders)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    options = model_options({**(options or {}), "dtype": dtype_name, "height": height, "width": width})
    adapter = adapter_class(pipeline, Path("."), options, torch.device(device), loras=[])
    adapter.encode_new_prompts = random_text_embeddings(*spec["text"], device, dtype)
    return adapter


def repeated_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer/residual blocks: children of every ModuleList whose name ends in 'blocks'."""
    return [block for name, module in net.named_modules() if isinstance(module, torch.nn.ModuleList)
            and name.rsplit(".", 1)[-1].endswith("blocks") for block in module]


def checkpoint_blocks(net: torch.nn.Module) -> str:
    """Gradient checkpointing for a model whose adapter has no switch of its own (the digits models): each block
    recomputes its activations in the backward pass. Adapters with enable_gradient_checkpointing() get
    speed.gradient_checkpointing instead."""
    blocks = repeated_blocks(net)
    if not blocks:
        raise ValueError("--gradient-checkpointing: found no blocks to checkpoint in this model")
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # rollouts and reference passes keep nothing to recompute
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return f"torch.utils.checkpoint on {len(blocks)} blocks (benchmark's own)"
