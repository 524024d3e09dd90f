"""Every term of neighbor_grpo/plan/memory.py on hand-counted nets (exact bytes), the planner's persistent memory of
bf16, fp32-master and LoRA plans of a small FLUX against its parameter counts, and how plan_core composes the
activation peak from given traces (the saved activations a no-grad call inside the loss sits on)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.plan import memory
from neighbor_grpo.plan.models import resolve_model
from neighbor_grpo.plan.planner import GIB, Tracer, persistent_memory, plan_core, schedule
from neighbor_grpo.plan.trace import Trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_planner_memory import build_small_flux  # noqa: E402


def hand_net(dtype=torch.float32) -> nn.Module:
    """Two trained blocks (4x4 + 4 = 20 and 4x2 + 2 = 10 parameters) and a frozen head (2x3 + 3 = 9): 39 in all, 30
    trained."""
    net = nn.Module()
    net.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 2)])
    net.head = nn.Linear(2, 3).requires_grad_(False)
    return net.to(dtype)


def test_bytes_of_weights_trainables_gradients_and_tied_parameters():
    net = hand_net()
    assert memory.weight_bytes(net) == 39 * 4
    assert memory.weight_bytes(hand_net(torch.bfloat16)) == 39 * 2
    assert memory.trainable_bytes(net) == 30 * 4
    assert memory.gradient_bytes(net) == 30 * 4  # one gradient per trained parameter, once
    weight = net.blocks[0].weight
    assert memory.tensors_bytes([weight, weight, net.blocks[1].weight]) == (16 + 8) * 4  # tied: once


def test_adamw_keeps_two_moments_in_the_parameter_dtype_and_8bit_one_byte_each():
    assert memory.optimizer_state_bytes(hand_net(), "adamw") == 2 * 30 * 4
    assert memory.optimizer_state_bytes(hand_net(torch.bfloat16), "adamw") == 2 * 30 * 2
    assert memory.optimizer_state_bytes(hand_net(), "adamw8bit") == 2 * 30


def test_ema_and_the_frozen_copies():
    net = hand_net()
    assert memory.ema_bytes(net, 0.9) == 30 * 4 and memory.ema_bytes(net, 0.0) == 0
    assert memory.copy_bytes(net) == 39 * 4
    assert memory.copy_bytes(net, torch.bfloat16) == 39 * 2  # fp32 master weights: the copies stay bf16
    mixed = hand_net(torch.bfloat16)
    mixed.blocks[1].float()  # a LoRA-like net: bf16 base, fp32 adapter
    assert memory.copy_bytes(mixed) == (20 + 9) * 2 + 10 * 4
    assert memory.reference_copy_bytes(net, "full", True) == 39 * 4
    assert memory.reference_copy_bytes(net, "full", True, torch.bfloat16) == 39 * 2
    assert memory.reference_copy_bytes(net, "lora", True) == 0  # LoRA: adapters off, no copy
    assert memory.reference_copy_bytes(net, "full", False) == 0
    assert memory.algorithm_network_bytes(net, ("old_policy",)) == 39 * 4
    assert memory.algorithm_network_bytes(net, ("a", "b"), torch.bfloat16) == 2 * 39 * 2
    assert memory.algorithm_network_bytes(net, ()) == 0


def test_sharding_caches_latents_trajectories_and_images():
    assert memory.sharded(10, 3) == 4 and memory.sharded(9, 3) == 3 and memory.sharded(7, 1) == 7
    assert memory.prompt_cache_bytes(3, 5, 7, 2, 2) == 3 * (5 * 7 + 2) * 2
    assert memory.latent_bytes((16, 8, 8)) == 16 * 8 * 8 * 4  # float32 in the solvers, whatever the model dtype
    assert memory.stored_latents_per_sample("diffusion_nft", 8) == memory.stored_latents_per_sample("awm", 8) == 3
    assert memory.stored_latents_per_sample("neighbor_grpo", 8) == 2 * 8 + 2
    for name in ("flow_grpo", "dance_grpo", "mix_grpo", "dgpo"):
        assert memory.stored_latents_per_sample(name, 8) == 3 * 8 + 1
    assert memory.trajectory_bytes("flow_grpo", 4, 5, (1, 2, 2)) == 5 * 13 * 16
    assert memory.image_bytes(2, 8, 4) == 2 * 3 * 8 * 4 * 4


def test_ddp_buckets_and_fsdp_gathers():
    net = hand_net()
    assert memory.ddp_bucket_bytes(net, 2, False) == 30 * 4
    assert memory.ddp_bucket_bytes(net, 1, False) == memory.ddp_bucket_bytes(net, 2, True) == 0
    assert memory.fsdp_gather_bytes(net, 2, True) == 2 * 20 * 4  # two of the largest block (prefetch)
    assert memory.fsdp_gather_bytes(net, 1, True) == memory.fsdp_gather_bytes(net, 4, False) == 0


# ---- the planner's persistent memory of a small FLUX, against its parameter counts -------------------------------

@pytest.fixture(scope="module")
def small_flux(tmp_path_factory):
    return build_small_flux(tmp_path_factory.mktemp("terms") / "flux")


def flux_config(folder, *overrides):
    return load_config(None, [f"model.path={folder}", "model.height=64", "model.width=64",
                              "model.max_sequence_length=16", "prompts_per_iteration=2", "prompts.train=[a cat, a dog]",
                              "prompts.eval=[a cat]", "rewards=[{name: jpeg_compressibility}]",
                              "neighbor_grpo.group_size=4", "neighbor_grpo.rollout_steps=2", *overrides])


def persistent(config):
    model = resolve_model(config.model.path, dataclasses.asdict(config.model))
    tracer = Tracer(model)
    traced = tracer.traced_model(config)
    algorithm, _ = schedule(config, config.prompts_per_iteration)
    samples = config.prompts_per_iteration * config.algorithm_config.group_size
    return persistent_memory(config, traced, model, algorithm, 1, samples), traced, model


def counts(traced, model):
    net = traced.adapter.net
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"all": sum(p.numel() for p in net.parameters()), "trained": trained,
            "encoders": sum(model.text_encoders.values()),
            "vae": sum(p.numel() for p in traced.adapter.pipeline.vae.parameters())}


def expected_shared(config, traced, model, half: int) -> dict:
    """The terms that do not depend on the fine-tune: trajectories (float32), text encoders, prompt cache and VAE in
    the model dtype (`half` bytes)."""
    n = counts(traced, model)
    tokens, width, pooled = model.spec["text"]
    latent = torch.Size(traced.adapter.latent_shape()).numel()
    return {"trajectories": 2 * 4 * (2 * 2 + 2) * latent * 4, "text_encoders": n["encoders"] * half,
            "prompt_cache": 2 * (tokens * width + pooled) * half, "vae": n["vae"] * half, "rewards": 0,
            "ddp_buckets": 0}


def test_bf16_plan_is_pure_bf16_when_asked(small_flux):
    config = flux_config(small_flux, "model.dtype=bfloat16", "optim.finetune=full", "optim.ema_decay=0.9")
    out, traced, model = persistent(config)
    n = counts(traced, model)
    assert not traced.master_weights and n["trained"] == n["all"]
    assert out == {"weights": 2 * n["all"], "gradients": 2 * n["all"], "optimizer_state": 4 * n["all"],
                   "ema": 2 * n["all"], "reference_copy": 2 * n["all"], "algorithm_networks": 0,
                   **expected_shared(config, traced, model, 2)}


def test_auto_full_fine_tune_plan_holds_fp32_master_weights_and_bf16_copies(small_flux):
    config = flux_config(small_flux, "algorithm=diffusion_nft", "diffusion_nft.group_size=4",
                         "diffusion_nft.rollout_steps=2", "optim.finetune=full", "diffusion_nft.kl_beta=0.1")
    out, traced, model = persistent(config)
    n = counts(traced, model)
    assert traced.master_weights
    shared = expected_shared(config, traced, model, 2)
    shared["trajectories"] = 2 * 4 * 3 * torch.Size(traced.adapter.latent_shape()).numel() * 4
    assert out == {"weights": 4 * n["all"], "gradients": 4 * n["all"], "optimizer_state": 8 * n["all"], "ema": 0,
                   "reference_copy": 2 * n["all"], "algorithm_networks": 2 * n["all"], **shared}


def test_lora_plan_keeps_the_base_in_bf16_and_the_adapters_in_fp32(small_flux):
    config = flux_config(small_flux, "optim.finetune=lora", "optim.lora_rank=4")
    out, traced, model = persistent(config)
    n = counts(traced, model)
    assert not traced.master_weights and 0 < n["trained"] < n["all"]
    base = n["all"] - n["trained"]
    assert out == {"weights": 2 * base + 4 * n["trained"], "gradients": 4 * n["trained"],
                   "optimizer_state": 8 * n["trained"], "ema": 0, "reference_copy": 0, "algorithm_networks": 0,
                   **expected_shared(config, traced, model, 2)}


# ---- plan_core's composition of the peak, on given traces ----------------------------------------------------------

MB = 2**20


class GivenTraces(Tracer):
    """The real traced model (for the persistent terms), with every call's trace given: a with-grad call peaks at
    80 MB and leaves 60 MB saved after its forward and 1 MB of gradients, a no-grad call peaks at 20 MB, a decode
    at 1 MB."""

    def call(self, config, kind, network, grad, batch, exact):
        if kind == "decode":
            return Trace(1, 1 * MB, batch)
        if grad:
            return Trace(1, 80 * MB, batch, grad_bytes=1 * MB, forward_bytes=60 * MB)
        return Trace(1, 20 * MB, batch)


@pytest.mark.parametrize("overrides,phase,activations", [
    # Neighbor GRPO (ref_beta 1): the reference's no-grad call runs on top of the train call's 60 MB saved
    ((), "reference", 20 + 60),
    # AWM with 2 training times summed before one backward (Phase.held 2): the train call holds another 60 MB; its
    # reference and EMA calls sit on both calls' saved activations
    (("algorithm=awm", "awm.group_size=4", "awm.rollout_steps=4", "awm.num_times=2", "awm.kl_beta=0.1"),
     "reference", 20 + 2 * 60),
    # Flow-GRPO backpropagates step by step (held 1), no KL: the train call's own peak, on top of everything but
    # the gradients of the previous step (set to none) and with its own 1 MB of them
    (("algorithm=flow_grpo", "flow_grpo.group_size=4", "flow_grpo.rollout_steps=4"), "train", 80),
    # AWM without KL terms: the train call's peak on top of the other held call's 60 MB saved
    (("algorithm=awm", "awm.group_size=4", "awm.rollout_steps=4", "awm.num_times=2", "awm.kl_beta=0",
      "awm.ema_beta=0"), "train", 80 + 60),
])
def test_peak_composes_held_calls_and_no_grad_calls_inside_the_loss(small_flux, overrides, phase, activations):
    config = flux_config(small_flux, "model.dtype=bfloat16", "optim.finetune=lora", *overrides)
    model = resolve_model(config.model.path, dataclasses.asdict(config.model))
    result = plan_core(config, GivenTraces(model), 1, "h100-80gb", 0.4)
    gib = result["memory_gib"]
    assert gib["peak_phase"] == phase
    if phase == "train":  # the persistent gradients are replaced by the pass's own (part of its peak)
        activations -= gib["gradients"] * GIB / MB
    assert gib["activations_peak"] * GIB / MB == pytest.approx(activations, rel=1e-9)


def test_master_weights_plan_traces_bf16_compute_with_fp32_gradients(small_flux):
    """The fp32-master plan traces its calls as the run makes them: under bf16 autocast over the fp32 net, with
    fp32 gradients (4 bytes a trained parameter), counted once in the persistent memory."""
    config = flux_config(small_flux, "optim.finetune=full")
    model = resolve_model(config.model.path, dataclasses.asdict(config.model))
    tracer = Tracer(model)
    result = plan_core(config, tracer, 1, "h100-80gb", 0.4)
    traced = tracer.traced_model(config)
    n = sum(p.numel() for p in traced.adapter.net.parameters())
    with_grad = [trace for key, trace in tracer.traces.items() if key[3]]
    assert traced.master_weights and with_grad
    assert all(key[4] == "bf16" for key in tracer.traces if key[1] == "velocity")  # speed.mixed_precision 'no'
    assert all(trace.grad_bytes == 4 * n for trace in with_grad)
    assert result["memory_gib"]["gradients"] * GIB == 4 * n
