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
from neighbor_grpo.algorithms.sde import (cps_code_log_prob, cps_mean_std, cps_sde_step, dance_grpo_mean_std,
                                          dance_grpo_sde_step, flow_grpo_mean_std, flow_grpo_sde_step,
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


def assert_float32_policy(half: tuple, full: tuple):
    """`half`, `full`: (new log-prob, old log-prob) from the bf16 inputs and from the same numbers in float32. The
    ratios are finite and within 1e-3 (relative) of the float32 ones; the log-probs themselves are the float32
    computation's (the same numbers in, the same float32 operations)."""
    ratio_half, ratio_full = (half[0] - half[1]).exp(), (full[0] - full[1]).exp()
    assert (ratio_full - 1).abs().max() > 1e-3, "the case needs ratios away from 1"
    assert torch.isfinite(ratio_half).all()
    torch.testing.assert_close(ratio_half.float(), ratio_full, rtol=1e-3, atol=0)
    assert ratio_half.dtype == torch.float32
    for got, want in zip(half, full):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def sde_log_probs(mean_std, log_prob, x, v_old, v_new, x_next):
    """log pi_new(x_next), log pi_old(x_next) of a stored transition x -> x_next."""
    mean_old, std = mean_std(x, v_old)
    mean_new, _ = mean_std(x, v_new)
    return log_prob(x_next, mean_new, std), log_prob(x_next, mean_old, std)


MEAN_STDS = {
    "flow_grpo": (lambda x, v: flow_grpo_mean_std(x, v, S, S_NEXT, 0.7, S_1), gaussian_log_prob),
    "dance_grpo": (lambda x, v: dance_grpo_mean_std(x, v, S, S_NEXT, 0.3), gaussian_log_prob),
    "cps": (lambda x, v: cps_mean_std(x, v, S, S_NEXT, 0.8), cps_code_log_prob),
}


@pytest.mark.parametrize("name", sorted(MEAN_STDS))
def test_sde_ratios_of_a_bf16_net_are_the_float32_ones(bf16_flux, name):
    x, v_old, v_new, z = bf16_flux
    mean_std, log_prob = MEAN_STDS[name]
    mean_old, std = mean_std(x.float(), v_old.float())
    x_next = (mean_old + std * z.float()).bfloat16()  # the old policy's step, stored in the rollout's dtype
    half = sde_log_probs(mean_std, log_prob, x, v_old, v_new, x_next)
    full = sde_log_probs(mean_std, log_prob, *as_float32(x, v_old, v_new, x_next))
    assert_float32_policy(half, full)


def leaping_log_probs(x, v_old, v_new, candidates):
    """Neighbor GRPO's log pi_new and log pi_old over each anchor's G candidates (every candidate an anchor)."""
    anchors = x.view(P, G, *x.shape[1:])
    old = squared_distances(candidates, leap(anchors, v_old.view_as(anchors), S, S_NEXT))
    new = squared_distances(candidates, leap(anchors, v_new.view_as(anchors), S, S_NEXT))
    tau = temperature(old, 0.1, None)
    return leaping_log_policy(new, tau), leaping_log_policy(old, tau)


def test_neighbor_grpo_ratios_of_a_bf16_net_are_the_float32_ones(bf16_flux):
    x, v_old, v_new, z = bf16_flux
    # the candidates' next states: the old policy's ODE step from nearby noises, stored in the rollout's dtype
    candidates = (x + (S_NEXT - S) * v_old + 0.05 * z).view(P, G, *x.shape[1:])
    half = leaping_log_probs(x, v_old, v_new, candidates)
    full = leaping_log_probs(*as_float32(x, v_old, v_new, candidates))
    assert_float32_policy(half, full)


@pytest.mark.parametrize("step", [
    lambda x, v, z: flow_grpo_sde_step(x, v, S, S_NEXT, z, noise_level=0.7, s_1=S_1),
    lambda x, v, z: dance_grpo_sde_step(x, v, S, S_NEXT, z, eta=0.3),
    lambda x, v, z: cps_sde_step(x, v, S, S_NEXT, z, eta=0.8)], ids=["flow_grpo", "dance_grpo", "cps"])
def test_sde_steps_keep_the_state_dtype_and_a_float32_mean(bf16_flux, step):
    """A rollout of bf16 states stays bf16 (its states stack into one tensor); the step's mean, which the log-prob
    is measured from, is float32 and equals the float32 computation's."""
    x, v_old, _, z = bf16_flux
    half, full = step(x, v_old, z), step(*as_float32(x, v_old, z))
    assert half.x_next.dtype == torch.bfloat16 and half.mean.dtype == torch.float32
    torch.testing.assert_close(half.mean, full.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(half.x_next, full.x_next.bfloat16(), rtol=0, atol=0)


def test_log_probs_and_distances_of_bf16_arguments_are_computed_in_float32():
    """Called with bf16 arguments directly (a plug-in's bf16 means or predictions), the Gaussian and CPS log-probs
    and the squared distances equal the float32 computation on the same numbers."""
    generator = torch.Generator().manual_seed(1)
    x_next, mean = (torch.randn(P, G, 64, generator=generator).bfloat16() for _ in range(2))
    for log_prob in (gaussian_log_prob, cps_code_log_prob):
        half, full = log_prob(x_next, mean, 0.3, 2), log_prob(x_next.float(), mean.float(), 0.3, 2)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, full, rtol=1e-6, atol=1e-6)
    half = squared_distances(x_next, mean[:, :2])
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, squared_distances(x_next.float(), mean[:, :2].float()), rtol=1e-6, atol=1e-6)
