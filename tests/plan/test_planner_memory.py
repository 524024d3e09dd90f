"""The planner's predicted peak per GPU against a real CPU iteration of a small FLUX (peak above 200 MB): the live
bytes before the iteration (every weight, gradient, optimizer moment and cached prompt) plus the largest running
sum of torch.profiler's memory events during it, within 15%. The planner never sees the weights: it reads the
folder's config.json files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import load_adapter
from neighbor_grpo.plan.live_bytes import tensor_bytes
from neighbor_grpo.plan.planner import GIB, plan
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import build_training_parts, train_iteration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import tiny_diffusers  # noqa: E402


def build_small_flux(folder: Path) -> Path:
    """tiny_diffusers' FLUX pipeline with a wider, deeper transformer (4 heads x 32, 2 + 2 blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[8, 12, 12], guidance_embeds=True)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_diffusers.tiny_vae(1),
                        text_encoder=CLIPTextModel(tiny_diffusers.clip_config()), tokenizer=tiny_diffusers.clip_tokenizer(),
                        text_encoder_2=tiny_diffusers.t5_encoder(), tokenizer_2=tiny_diffusers.t5_tokenizer(),
                        transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def resident_bytes(adapter, parts) -> int:
    """Every tensor alive between iterations: the pipeline's weights and buffers, the reference copy, gradients,
    optimizer moments, the prompt cache."""
    modules = [getattr(adapter.pipeline, n) for n in ("transformer", "vae", "text_encoder", "text_encoder_2")]
    tensors = [t for m in [*modules, parts.reference_net] if m is not None for t in (*m.parameters(), *m.buffers())]
    tensors += [p.grad for p in parts.params if p.grad is not None]
    tensors += [v for state in parts.optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0]
    tensors += [t for rows in adapter.cache.tensors.values() for t in rows]
    return tensor_bytes(tensors)


def profiled_peak(run) -> int:
    """The largest running sum of the profiler's allocation (+) and free (-) events, in start order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


COMMON = ["model.height=128", "model.width=128", "model.dtype=float32", "model.max_sequence_length=64",
          "prompts_per_iteration=2", "prompts.train=[a cat, a dog]", "prompts.eval=[a cat, a dog]",
          "rewards=[{name: jpeg_compressibility}]"]
# DanceGRPO: 3 trained steps in each of 2 minibatches, each step backpropagated before the next as its reference
# does (Phase.held = 1; issue #22 item 11: summed before one backward, 3 calls' activations were alive together)
METHODS = {"neighbor_grpo": ["neighbor_grpo.group_size=4", "neighbor_grpo.rollout_steps=2"],
           "dance_grpo": ["algorithm=dance_grpo", "dance_grpo.group_size=4", "dance_grpo.rollout_steps=4",
                          "dance_grpo.train_step_fraction=1.0", "dance_grpo.num_minibatches=2"]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_predicted_peak_within_15_percent_of_a_real_iteration(method, tmp_path):
    folder = build_small_flux(tmp_path / "flux")
    config = load_config(None, [f"model.path={folder}", *COMMON, *METHODS[method]])
    result = plan(config, gpus=1, gpu="h100-80gb")
    predicted = result["memory_gib"]["total"] * GIB
    adapter = load_adapter(folder, options=config.model)
    parts = build_training_parts(config, adapter)
    rewards = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})

    def iteration(number):
        train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer, parts.params, parts.ema,
                        parts.reference_velocity, list(config.prompts.train), number, lambda point: None, parts=parts)

    iteration(0)  # the optimizer's moments and the gradients exist from the first step on
    measured = resident_bytes(adapter, parts) + profiled_peak(lambda: iteration(1))
    assert measured >= 200 * 2**20
    assert result["memory_gib"]["peak_phase"] in ("train", "reference")  # the with-grad pass, or a call inside it
    print(f"{method}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 2**20, measured / 2**20)
