"""Trace one component of an iteration at its real shapes under fake tensors: FLOPs (FlopCounterMode's formulas with the CPU
attention formula) and the peak bytes of the storages the call creates (LiveBytes), with no memory and no weights.

Everything goes through the project's own code (design item 7): the model's adapter (FLUX.1, SD3, FLUX.2, Z-Image,
Qwen-Image, Qwen-Image-Edit(-Plus), FLUX.1 Kontext, Wan) built around the real architecture on the meta device,
LoRA applied with `lora.apply_lora`, gradient checkpointing through the adapter's switch, mixed precision through
`speed.autocast_velocity`, the reference through `lora.make_reference_velocity`, the VAE through `adapter.decode`.
Prompts are encoded outside the fake mode (one prompt, real tensors of the real shape); everything else runs fake.
See docs/planning.md.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from neighbor_grpo.models.prompt_cache import PromptCache
from neighbor_grpo.plan.attention_flops import cpu_attention_flops
from neighbor_grpo.plan.live_bytes import LiveBytes, fake_mode, tensor_bytes

PLAN_PROMPT = "a plan"  # the one prompt every traced call is conditioned on (repeated to the batch)


@dataclass(frozen=True)
class Trace:
    """One traced call: its FLOPs and the peak bytes of the storages it created (on top of what existed before:
    weights, the input latents). A with-grad trace includes the backward, and `grad_bytes` of the gradients it
    left (they are part of `peak_bytes`)."""

    flops: int
    peak_bytes: int
    batch: int
    grad_bytes: int = 0
    seconds: float = 0.0
    forward_bytes: int = 0  # with-grad: bytes alive after the forward (what autograd saved), before the backward

    def scaled(self, batch: int) -> "Trace":
        """The same call at another batch: FLOPs are exactly linear in the batch (every counted op is per sample),
        activation bytes approximately (the planner traces the shapes of the configured run, and scales only for
        baselines and fit options)."""
        if batch == self.batch:
            return self
        factor = batch / self.batch
        return Trace(round(self.flops * factor), round((self.peak_bytes - self.grad_bytes) * factor) + self.grad_bytes,
                     batch, self.grad_bytes, 0.0, round(self.forward_bytes * factor))


@dataclass
class TracedModel:
    """A meta-built adapter made fake, with the switches of the configured run applied."""

    adapter: object
    mode: object
    cond: torch.Tensor    # the one prompt's row in the adapter's prompt cache (real)
    lora: bool
    master_weights: bool = False  # the trained net upcast to fp32 as the trainer does (speed.keeps_master_weights)


def meta_adapter(arch: str, spec: dict, resolution, dtype: torch.dtype, options: dict):
    """The project's adapter around `spec` (a DIFFUSERS_ARCHS-style dict) with every weight on the meta device; its
    prompt cache on the CPU, filled with one real random embedding of the real shape."""
    from neighbor_grpo.models import qwen_kontext_wan_archs
    from neighbor_grpo.models.architectures import build_diffusers_adapter, random_text_embeddings
    from neighbor_grpo.models.flux2_zimage_archs import FAMILIES, random_prompt_features

    adapter = build_diffusers_adapter(arch, resolution, "meta", dtype, spec=spec, options=options)
    adapter._device = torch.device("cpu")  # the fake tensors live on "cpu"; FLOPs and bytes map to the GPU
    adapter.cache = PromptCache(torch.device("cpu"))
    if arch in FAMILIES:  # FLUX.2 / Z-Image prompt features (Z-Image's with their lengths)
        adapter.encode_new_prompts = random_prompt_features(arch, *spec["text"][:2], "cpu", dtype)
    elif arch in qwen_kontext_wan_archs.FAMILIES:  # Qwen-Image's with lengths, Kontext's and Edit's with sources
        adapter.encode_new_prompts = qwen_kontext_wan_archs.prompt_stand_in(adapter, arch, spec["text"], "cpu", dtype)
    else:
        adapter.encode_new_prompts = random_text_embeddings(*spec["text"], "cpu", dtype)
    return adapter


def make_traceable(adapter, lora: dict | None, checkpointing: bool, prompt: str = PLAN_PROMPT,
                   master_weights: bool = False) -> TracedModel:
    """LoRA (rank, alpha, targets), fp32 master weights and gradient checkpointing applied as the trainer applies
    them; a meta-built diffusers adapter's transformer and VAE are then made fake (the prompt is encoded before,
    outside the mode). Any other adapter (the built-in model: small) is traced for real."""
    from neighbor_grpo.models.lora import apply_lora
    from neighbor_grpo.training.speed import enable_gradient_checkpointing

    if lora:
        adapter.net = apply_lora(adapter.net, lora["rank"], lora["alpha"], lora["targets"])
    if master_weights:
        adapter.net.float()
    if checkpointing:
        enable_gradient_checkpointing(adapter)
    cond = adapter.encode_prompts([prompt])
    if not any(p.is_meta for p in adapter.net.parameters()):
        return TracedModel(adapter, contextlib.nullcontext(), cond, bool(lora), master_weights)
    mode = fake_mode()
    with mode:  # the trained net (Wan 2.2 A14B: both experts) and the VAE
        for component in (adapter.net, adapter.pipeline.vae):
            component.to_empty(device="cpu")
    return TracedModel(adapter, mode, cond, bool(lora), master_weights)


def existing_tensors(model: TracedModel, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """What exists before a call (weights, buffers, prompt cache, inputs): views of it are not new memory."""
    adapter = model.adapter
    pipeline = getattr(adapter, "pipeline", None)
    modules = (adapter.net, pipeline.transformer, pipeline.vae) if pipeline is not None else (adapter.net,)
    cache = getattr(adapter, "cache", None)
    if cache is None:
        return [*inputs, *(t for m in modules for t in (*m.parameters(), *m.buffers()))]
    cache = [t for rows in adapter.cache.tensors.values() for t in rows]
    return [*inputs, *cache, *(t for m in modules for t in (*m.parameters(), *m.buffers()))]


def counted(model: TracedModel, run, inputs: tuple) -> tuple[int, int, float]:
    """FLOPs and peak new bytes of `run(tracker)` under the fake mode."""
    start = time.perf_counter()
    live = LiveBytes(0, existing_tensors(model, *inputs))
    with model.mode, cpu_attention_flops(True), live:
        run(live)
    return int(live.flops), int(live.peak), time.perf_counter() - start


def velocity_fn(model: TracedModel, network: str, mixed_precision: str):
    """v(x, s, cond) of `network` as the trainer builds it: the policy, or the reference (LoRA: adapters off; a full
    fine-tune's frozen copy costs the policy's no-grad forward, so it is traced as that), under autocast."""
    from neighbor_grpo.models.lora import make_reference_velocity
    from neighbor_grpo.training.speed import autocast_velocity

    adapter = model.adapter
    base = make_reference_velocity(adapter, None) if network == "reference" and model.lora else adapter.velocity
    return autocast_velocity(base, mixed_precision, torch.device("cpu"))


def trace_velocity(model: TracedModel, batch: int, grad: bool, network: str = "policy",
                   mixed_precision: str = "no") -> Trace:
    """One velocity call at `batch` samples: no-grad, or forward + backward of a scalar loss (the trainer's
    with-grad pass). The input latents exist before (they are the rollout's states), the output is counted."""
    adapter, mode = model.adapter, model.mode
    velocity = velocity_fn(model, network, mixed_precision)
    with mode:
        x = torch.randn(batch, *adapter.latent_shape())
        s = torch.tensor(0.5)
    cond = model.cond.repeat(batch)
    params = [p for p in adapter.net.parameters() if p.requires_grad]
    grad_bytes = forward_bytes = 0

    def run(tracker):
        nonlocal grad_bytes, forward_bytes
        if not grad:
            with torch.no_grad():
                velocity(x, s, cond)
            return
        out = velocity(x, s, cond)
        forward_bytes = tracker.live
        out.float().square().mean().backward()
        grad_bytes = tensor_bytes(p.grad for p in params if p.grad is not None)

    try:
        flops, peak, seconds = counted(model, run, (x, s))
    finally:
        for p in params:
            p.grad = None
    return Trace(flops, peak, batch, grad_bytes, seconds, forward_bytes)


def trace_decode(model: TracedModel, batch: int) -> Trace:
    """The VAE decode of `batch` latents through adapter.decode (its chunks of model.decode_batch_size)."""
    adapter, mode = model.adapter, model.mode
    with mode:
        latents = torch.randn(batch, *adapter.latent_shape())
    flops, peak, seconds = counted(model, lambda tracker: adapter.decode(latents), (latents,))
    return Trace(flops, peak, batch, 0, seconds)
