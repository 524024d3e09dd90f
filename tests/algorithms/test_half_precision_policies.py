"""Issue #22 item 12: with a bf16 net, the SDE baselines' log-probabilities and Neighbor GRPO's distances and
softmax are computed in float32 (maths.flow.full_precision), so the policy ratio is the float32 one. The velocities
come from a tiny FLUX transformer loaded in bfloat16 (tests/models/tiny_diffusers.py); the "new" policy is the
same net after a small change of its output projection, so the ratios are not 1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from neighbor_grpo.algorithms.neighbor_grpo import leap, leaping_log_policy, squared_distances, temperature
from neighbor_grpo.algorithms.sde import (cps_code_log_prob, cps_mean_std, dance_grpo_mean_std, flow_grpo_mean_std,
                                          gaussian_log_prob)
from neighbor_grpo.models import load_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import tiny_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

P, G = 2, 6
S, S_NEXT, S_1 = 0.6, 0.5, 0.9


@pytest.fixture(scope="module")
def bf16_flux(tmp_path_factory):
    """x_j (P*G, *latent) and the old and new policies' velocities there, all bf16 as the bf16 net gives them."""
    folder = tiny_diffusers.build_flux(tmp_path_factory.mktemp("tiny") / "flux")
    adapter = load_adapter(folder, options={"height": 64, "width": 64, "max_sequence_length": 8, "dtype": "bfloat16"})
    assert adapter.net.dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(P * G, *adapter.latent_shape(), generator=generator).bfloat16()
    cond = adapter.encode_prompts(["a red cat", "a blue dog"] * G)
    with torch.no_grad():
        v_old = adapter.velocity(x, torch.tensor(S), cond)
        weight = adapter.net.proj_out.weight
        weight.add_(0.3 * weight.abs().mean() * torch.randn(weight.shape, generator=generator).to(weight))
        v_new = adapter.velocity(x, torch.tensor(S), cond)
    assert v_old.dtype == v_new.dtype == torch.bfloat16
    z = torch.randn(x.shape, generator=generator).bfloat16()
    return x, v_old, v_new, z


def as_float32(*tensors):
    return [t.float() for t in tensors]


def assert_close_ratios(half: torch.Tensor, full: torch.Tensor):
    assert (full - 1).abs().max() > 1e-3, "the case needs ratios away from 1"
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, rtol=1e-3, atol=0)
    assert half.dtype == torch.float32


def sde_ratio(mean_std, log_prob, x, v_old, v_new, z):
    """pi_new(x_next) / pi_old(x_next) of the old policy's own step x_next = mean_old + std z."""
    mean_old, std = mean_std(x, v_old)
    x_next = (mean_old + std * z).to(x.dtype)  # stored in the rollout's dtype
    mean_new, _ = mean_std(x, v_new)
    return (log_prob(x_next, mean_new, std) - log_prob(x_next, mean_old, std)).exp()


MEAN_STDS = {
    "flow_grpo": (lambda x, v: flow_grpo_mean_std(x, v, S, S_NEXT, 0.7, S_1), gaussian_log_prob),
    "dance_grpo": (lambda x, v: dance_grpo_mean_std(x, v, S, S_NEXT, 0.3), gaussian_log_prob),
    "cps": (lambda x, v: cps_mean_std(x, v, S, S_NEXT, 0.8), cps_code_log_prob),
}


@pytest.mark.parametrize("name", sorted(MEAN_STDS))
def test_sde_ratios_of_a_bf16_net_are_the_float32_ones(bf16_flux, name):
    x, v_old, v_new, z = bf16_flux
    mean_std, log_prob = MEAN_STDS[name]
    half = sde_ratio(mean_std, log_prob, x, v_old, v_new, z)
    full = sde_ratio(mean_std, log_prob, *as_float32(x, v_old, v_new, z))
    assert_close_ratios(half, full)


def leaping_ratio(x, v_old, v_new, candidates):
    """Neighbor GRPO's pi_new / pi_old over each anchor's G candidates (every candidate an anchor)."""
    anchors = x.view(P, G, *x.shape[1:])
    old = squared_distances(candidates, leap(anchors, v_old.view_as(anchors), S, S_NEXT))
    new = squared_distances(candidates, leap(anchors, v_new.view_as(anchors), S, S_NEXT))
    tau = temperature(old, 0.1, None)
    return (leaping_log_policy(new, tau) - leaping_log_policy(old, tau)).exp()


def test_neighbor_grpo_ratios_of_a_bf16_net_are_the_float32_ones(bf16_flux):
    x, v_old, v_new, z = bf16_flux
    # the candidates' next states: the old policy's ODE step from nearby noises, stored in the rollout's dtype
    candidates = (x + (S_NEXT - S) * v_old + 0.05 * z).view(P, G, *x.shape[1:])
    half = leaping_ratio(x, v_old, v_new, candidates)
    full = leaping_ratio(*as_float32(x, v_old, v_new, candidates))
    assert_close_ratios(half, full)
