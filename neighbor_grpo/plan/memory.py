"""What stays in GPU memory for a whole iteration, per GPU, each term a small function of shapes and the config.

What the trainer actually keeps (neighbor_grpo.training.parts, speed, lora, parallel):
- the trained net in `model.dtype` (bfloat16 on CUDA by default); LoRA adapters in float32 (peft keeps them so);
  a full fine-tune left at `model.dtype: auto` holds it in float32 (fp32 master weights, bf16 compute:
  speed.keeps_master_weights); an explicit `model.dtype: bfloat16` is pure bf16;
- gradients of the trainable parameters in their dtype; torch AdamW's two moments per trainable parameter in the
  parameter's dtype (`adamw8bit`: one byte each): float32 with master weights, bfloat16 in pure bf16;
- an EMA shadow of the trainable parameters (optim.ema_decay > 0), in their dtype;
- a frozen copy of the whole net for the reference of a full fine-tune with ref_beta/kl_beta > 0 (LoRA: the same
  net with adapters off, no copy), and one frozen copy of the whole net (LoRA included) per network the algorithm
  declares (`networks`: DiffusionNFT's old policy, AWM's EMA policy); both in the loaded dtype (copy_bytes);
- text encoders (unless model.offload_text_encoders), the prompt-embedding cache (unless
  model.prompt_cache_on_cpu), the whole VAE (unless model.offload_vae), the reward models;
- the rollout's stored latents (states and velocities, float32) until the update is done.
FSDP (speed.parallel=fsdp over N processes) shards the trained net, its gradients, optimizer state, EMA shadow,
the reference copy and the algorithm's networks; text encoders, VAE, rewards and the prompt cache are replicated.
Offloading optimizer state or parameters to the CPU is not supported by the trainer yet (the planner can say
what it would save).
"""

from __future__ import annotations

import torch

GIB = 2**30
ADAMW_BYTES_PER_ELEMENT = {"adamw": None, "adamw8bit": 2}  # None: 2 moments in the parameter's dtype


def tensors_bytes(params) -> int:
    """Bytes of distinct parameters (tied ones once), meta or real."""
    unique = {id(p): p for p in params}.values()
    return sum(p.numel() * p.element_size() for p in unique)


def weight_bytes(net: torch.nn.Module) -> int:
    """Every weight of the trained net (base weights in the model dtype, LoRA adapters as peft keeps them)."""
    return tensors_bytes(net.parameters())


def trainable_bytes(net: torch.nn.Module) -> int:
    return tensors_bytes(p for p in net.parameters() if p.requires_grad)


def gradient_bytes(net: torch.nn.Module) -> int:
    """One gradient per trainable parameter, in its dtype (kept from one optimizer step to the next)."""
    return trainable_bytes(net)


def optimizer_state_bytes(net: torch.nn.Module, optimizer: str) -> int:
    """AdamW's exp_avg and exp_avg_sq per trainable parameter (plus its step counters, negligible)."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    per_element = ADAMW_BYTES_PER_ELEMENT.get(optimizer)
    if per_element is None:
        return 2 * tensors_bytes(trainable)
    return per_element * sum(p.numel() for p in {id(p): p for p in trainable}.values())


def ema_bytes(net: torch.nn.Module, ema_decay: float) -> int:
    return trainable_bytes(net) if ema_decay > 0 else 0


def copy_bytes(net: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """A frozen copy of the whole net: in the dtypes the net holds, or all in `dtype` (the loaded model dtype, when
    the trained net was upcast to fp32 master weights after the copies were taken)."""
    if dtype is None:
        return weight_bytes(net)
    unique = {id(p): p for p in net.parameters()}.values()
    return sum(p.numel() for p in unique) * (torch.finfo(dtype).bits // 8)


def reference_copy_bytes(net: torch.nn.Module, finetune: str, needs_reference: bool,
                         dtype: torch.dtype | None = None) -> int:
    """A full fine-tune keeps a frozen copy for the reference; LoRA turns its adapters off instead."""
    return copy_bytes(net, dtype) if finetune == "full" and needs_reference else 0


def algorithm_network_bytes(net: torch.nn.Module, networks: tuple, dtype: torch.dtype | None = None) -> int:
    """parts.build_training_parts deep-copies the whole net (LoRA included) for each declared network."""
    return len(networks) * copy_bytes(net, dtype)


def sharded(nbytes: int, shards: int) -> int:
    return -(-nbytes // shards)


def prompt_cache_bytes(prompts: int, tokens: int, width: int, pooled: int, dtype_bytes: int) -> int:
    """Each cached prompt: its token embeddings and its pooled embedding, in the model dtype."""
    return prompts * (tokens * width + pooled) * dtype_bytes


def latent_bytes(latent_shape: tuple) -> int:
    """One float32 latent (the solvers keep latents in float32)."""
    return 4 * int(torch.Size(latent_shape).numel())


def stored_latents_per_sample(algorithm: str, steps: int) -> int:
    """Latents the rollout keeps per candidate until the update: Neighbor GRPO and the SDE methods every state and
    velocity (N + 1 + N; the SDE methods also pre-draw N step noises), the forward-process methods (DiffusionNFT,
    AWM) the first and last state and one velocity."""
    if algorithm in ("diffusion_nft", "awm"):
        return 3
    if algorithm == "neighbor_grpo":
        return 2 * steps + 1 + 1  # + the candidate's neighbour noise
    return 3 * steps + 1


def trajectory_bytes(algorithm: str, steps: int, samples: int, latent_shape: tuple) -> int:
    return samples * stored_latents_per_sample(algorithm, steps) * latent_bytes(latent_shape)


def image_bytes(samples: int, height: int, width: int) -> int:
    """The decoded images (float32 RGB) the rewards score."""
    return samples * 3 * height * width * 4


def ddp_bucket_bytes(net: torch.nn.Module, gpus: int, fsdp: bool) -> int:
    """DDP's gradient buckets: a second copy of the gradients for the all-reduce (not with FSDP or one GPU)."""
    return gradient_bytes(net) if gpus > 1 and not fsdp else 0


def fsdp_gather_bytes(net: torch.nn.Module, gpus: int, fsdp: bool) -> int:
    """FSDP gathers one block's whole weights to run it and prefetches the next: about two of the largest block."""
    if not (fsdp and gpus > 1):
        return 0
    largest = 0
    for module in net.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                largest = max(largest, tensors_bytes(block.parameters()))
    return 2 * largest
