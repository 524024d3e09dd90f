"""Held-out evaluation: rewards on seeds never trained on, and reward-hacking monitors."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from neighbor_grpo.config.prompts import load_source_images
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.noise import independent_noises
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import decode_samples, sample_latent_shape


class NonFiniteSamples(FloatingPointError):
    """The model's samples hold NaN/inf (its weights may still be finite): nothing can be scored on them."""


def out_of_range_share(images: torch.Tensor, margin: float = 0.1) -> float:
    """Share of pixels further than `margin` outside the data range [0, 1], before clamping."""
    return float(((images < -margin) | (images > 1 + margin)).float().mean())


def within_prompt_diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance between samples of one prompt; images (P, S, C, H, W)."""
    flat = images.clamp(0, 1).flatten(2)
    dist = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5  # (P, S, S)
    S = flat.shape[1]
    return float(dist.sum(dim=(1, 2)).mean() / (S * (S - 1)))


def temporal_difference(videos: torch.Tensor) -> float:
    """Temporal consistency of videos (..., T, C, H, W): the mean absolute change between consecutive frames
    (clamped to [0, 1]); 0 for a still video, larger for flicker. A monitor, never part of `reward`."""
    frames = videos.clamp(0, 1)
    return float((frames[..., 1:, :, :, :] - frames[..., :-1, :, :, :]).abs().mean())


def nearest_real_distance(images: torch.Tensor, real_images: torch.Tensor) -> float:
    """Realism: mean RMS pixel distance from each sample to its nearest real image (lower is more realistic)."""
    flat = images.clamp(0, 1).flatten(1)
    real = real_images.to(flat).flatten(1)
    return float((torch.cdist(flat, real).min(dim=1).values / flat.shape[-1] ** 0.5).mean())


@torch.no_grad()
def generate(adapter, prompts: Sequence[str], samples_per_prompt: int, seed: int, solver: str = "dpm++2m",
             steps: int = 8, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples from independent noises keyed by (seed, 0, prompt position, sample): latents and raw images,
    each shaped (P, S, ...)."""
    device = adapter.device
    shape = sample_latent_shape(adapter, prompts)
    noises = torch.stack([independent_noises(shape, samples_per_prompt, seed, 0, k, device) for k in range(len(prompts))])
    cond = adapter.encode_prompts(list(prompts)).repeat_interleave(samples_per_prompt, dim=0)
    sigmas = sigma_grid(steps, shift=shift).to(device)
    trajectory = integrate(lambda x, s: adapter.velocity(x, s, cond), noises.flatten(0, 1), sigmas, solver)
    latents = trajectory.states[-1]
    images = decode_samples(adapter, latents, cond)
    P = len(prompts)
    return latents.reshape(P, samples_per_prompt, *latents.shape[1:]), images.reshape(P, samples_per_prompt, *images.shape[1:])


def _summary(values: torch.Tensor) -> dict[str, float]:
    """Mean, population std and a normal-approximation 95% half-width of the mean."""
    values = values.double().flatten()
    std = float(values.std(correction=0)) if values.numel() > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "ci95": 1.96 * std / math.sqrt(values.numel())}


def monitor_scores(monitors, images: torch.Tensor, prompts: Sequence[str], source_images: torch.Tensor | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Monitor rewards (eval.monitor_rewards): per-image scores as `monitor/<name>`, and each monitor's extra
    metrics (the gold's gold_class and typical, say) as `monitor/<name>/<metric>`. Nothing here feeds `reward`."""
    if monitors is None or not monitors.rewards:
        return {}, {}
    scores = {f"monitor/{name}": value for name, value in monitors.score(images, prompts, source_images).items()}
    extra = {}
    for name, reward in monitors.rewards.items():
        if hasattr(reward, "extra_metrics"):
            extra.update({f"monitor/{name}/{k}": v for k, v in reward.extra_metrics(images.clamp(0, 1), prompts).items()})
    return scores, extra


@torch.no_grad()
def score_model(adapter, rewards, prompts: Sequence[str], samples_per_prompt: int, seed: int, solver: str = "dpm++2m",
                steps: int = 8, shift: float = 1.0, monitors=None) -> tuple[dict, torch.Tensor]:
    """Each reward on `samples_per_prompt` samples of every prompt, from noises keyed by (seed, prompt position,
    sample) - the same images for every checkpoint of the same model, so checkpoints compare sample by sample.
    `monitors` (a WeightedRewards, optional) are scored on the same images, kept out of `reward`.
    Returns {metrics (as a run's held-out metrics), summaries (mean, std, 95% half-width), per_prompt, weights}
    and the raw images (P, S, C, H, W), or videos (P, S, T, C, H, W) (then also `temporal_difference`)."""
    _, images = generate(adapter, prompts, samples_per_prompt, seed, solver, steps, shift)
    if not bool(torch.isfinite(images).all()):  # the trainer skips such a held-out evaluation; ngrpo eval refuses
        raise NonFiniteSamples(f"the samples hold NaN/inf ({int((~torch.isfinite(images)).sum())} of "
                                 f"{images.numel()} values)")
    flat = images.flatten(0, 1)
    flat_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    group_ids = torch.arange(len(prompts), device=flat.device).repeat_interleave(samples_per_prompt)
    sources = load_source_images(flat_prompts, *flat.shape[-2:])  # editing prompts carry theirs; else None
    sources = None if sources is None else sources.to(flat.device)
    scores = {f"reward_{name}": value
              for name, value in rewards.score(flat, flat_prompts, sources, group_ids=group_ids).items()}
    scores["reward"] = rewards.total({name[len("reward_"):]: value for name, value in scores.items()})
    # the same flat keys as a run's held-out metrics (eval_before.json / eval_after.json), so they compare directly
    metrics = {name: float(value.mean()) for name, value in scores.items()}
    for reward in rewards.rewards.values():
        if hasattr(reward, "extra_metrics"):
            metrics.update(reward.extra_metrics(flat.clamp(0, 1), flat_prompts))
    monitored, monitor_extra = monitor_scores(monitors, flat, flat_prompts, sources)
    scores.update(monitored)  # after the total: a monitor never enters `reward`
    metrics.update({name: float(value.mean()) for name, value in monitored.items()})
    metrics.update(monitor_extra)
    metrics["out_of_range"] = out_of_range_share(flat)
    metrics["diversity"] = within_prompt_diversity(images)
    if images.dim() == 6:  # videos (P, S, T, C, H, W)
        metrics["temporal_difference"] = temporal_difference(images)
    if hasattr(adapter, "reference_images"):
        metrics["realism_nn_dist"] = nearest_real_distance(flat, adapter.reference_images())
    P = len(prompts)
    result = {
        "metrics": metrics,
        "summaries": {name: _summary(value) for name, value in scores.items()},
        "per_prompt": [{"prompt": prompt, **{name: float(value.view(P, -1)[k].mean()) for name, value in scores.items()}}
                       for k, prompt in enumerate(prompts)],
        "weights": dict(rewards.weights),
    }
    return result, images


@torch.no_grad()
def evaluate(adapter, rewards, prompts: Sequence[str], samples_per_prompt: int, seed: int, solver: str = "dpm++2m",
             steps: int = 8, shift: float = 1.0, monitors=None) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out metrics (each reward's mean, their weighted total, hacking monitors, monitor rewards) and the raw
    images."""
    result, images = score_model(adapter, rewards, prompts, samples_per_prompt, seed, solver, steps, shift, monitors)
    return result["metrics"], images
