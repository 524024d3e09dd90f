"""What lives through a whole planned iteration on one GPU, term by term (weights, gradients, optimizer state,
copies, trajectories, text encoders, prompt cache, VAE, rewards), and the largest phase on top of it."""

from __future__ import annotations

import torch

from neighbor_grpo.plan import memory
from neighbor_grpo.plan.models import ModelSpec
from neighbor_grpo.plan.rewards import reward_estimate
from neighbor_grpo.plan.trace import Trace


def gpu_dtype(config) -> torch.dtype:
    """model.dtype as the adapter resolves it on a CUDA device ('auto' is bfloat16 there)."""
    from neighbor_grpo.models.diffusers_common import resolve_dtype

    return resolve_dtype(config.model.dtype, torch.device("cuda"))



def held_peak(trace: Trace, held: int) -> int:
    """A with-grad call's peak when `held` such calls' saved activations are alive before one backward (a loss summed
    over steps): the traced call's forward + backward peak on top of the other held - 1 calls' saved bytes (autograd
    runs one call's backward at a time, freeing its saved tensors; the gradients are shared)."""
    return trace.peak_bytes + (held - 1) * trace.forward_bytes


def persistent_memory(config, traced, model: ModelSpec, algorithm, gpus: int, samples: int) -> dict:
    """Bytes that live through the whole iteration on one GPU, by what they are."""
    net = traced.adapter.net
    fsdp = config.speed.parallel == "fsdp" and gpus > 1
    shards = gpus if fsdp else 1
    c = config.algorithm_config
    needs_reference = getattr(c, "ref_beta", 0) > 0 or getattr(c, "kl_beta", 0) > 0
    dtype_bytes = torch.finfo(gpu_dtype(config)).bits // 8
    copies = gpu_dtype(config) if traced.master_weights else None  # copied before the net is upcast to fp32
    m = config.model
    out = {"weights": memory.sharded(memory.weight_bytes(net), shards),
           "gradients": memory.sharded(memory.gradient_bytes(net), shards),
           "optimizer_state": memory.sharded(memory.optimizer_state_bytes(net, config.speed.optimizer), shards),
           "ema": memory.sharded(memory.ema_bytes(net, config.optim.ema_decay), shards),
           "reference_copy": memory.sharded(memory.reference_copy_bytes(net, config.optim.finetune, needs_reference, copies), shards),
           "algorithm_networks": memory.sharded(memory.algorithm_network_bytes(net, getattr(algorithm, "networks", ()), copies), shards),
           "ddp_buckets": memory.ddp_bucket_bytes(net, gpus, fsdp)}
    latent = traced.adapter.latent_shape()
    out["trajectories"] = memory.trajectory_bytes(config.algorithm, c.rollout_steps, samples, latent)
    if model.kind == "diffusers":
        tokens, width, pooled = model.spec["text"]
        cached = cached_prompts(config)
        out["text_encoders"] = 0 if m.offload_text_encoders else sum(model.text_encoders.values()) * dtype_bytes
        out["prompt_cache"] = 0 if m.prompt_cache_on_cpu else memory.prompt_cache_bytes(max(cached, 1), tokens, width, pooled, dtype_bytes)
        vae = traced.adapter.pipeline.vae
        out["vae"] = 0 if m.offload_vae else memory.tensors_bytes(vae.parameters())
    out["rewards"] = sum(reward_estimate(r.name, r.kwargs).weight_bytes for r in config.rewards)
    return out


def cached_prompts(config) -> int:
    """Prompts whose embeddings the cache holds by the end of the run: the held-out ones (encoded up front) and
    every training prompt seen, at most iterations x prompts_per_iteration of them."""
    from neighbor_grpo.config.prompts import resolve_prompt_sets

    train, held_out = resolve_prompt_sets(config.prompts)
    return min(len(set(train)), config.iterations * config.prompts_per_iteration) + len(set(held_out) - set(train))


def phase_peak(persistent: dict, peaks: dict, config, net, gpus: int) -> tuple[str, int]:
    """The largest phase: persistent bytes plus the phase's own peak. A training pass starts with no gradients
    (zero_grad(set_to_none)) and its trace includes the ones it makes: with FSDP only a shard of them stays."""
    fsdp = config.speed.parallel == "fsdp" and gpus > 1
    gather = memory.fsdp_gather_bytes(net, gpus, fsdp)
    base = sum(persistent.values())
    best = ("", 0)
    for name, (peak, grads) in peaks.items():
        if grads:
            total = base - persistent["gradients"] + peak - grads + memory.sharded(grads, gpus if fsdp else 1) + gather
        else:
            total = base + peak + (gather if name not in ("decode", "reward") else 0)
        best = max(best, (name, int(total)), key=lambda item: item[1])
    return best
