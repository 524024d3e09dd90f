"""GRPO-Guard (Wang et al. 2025; reference yifan123/flow_grpo scripts/train_sd3_GRPO_Guard.py L893-L937; spec
competitors.md section 4): Flow-GRPO with a normalised log-ratio and 1/|dt| gradient reweighting.

Flow-GRPO's per-step log-ratio has mean -mean_d (mu_theta - mu_old)^2 / (2 shat^2) < 0 and a 1/shat scale that
blows up at low-noise steps, so the 1 +- eps clip stops over-confident positive updates poorly. RatioNorm adds
the bias back and multiplies by shat; the reweighting divides each step's loss by |dt| = sqrt(-dt)^2. Everything
else (sampler, advantages, clip) is Flow-GRPO's, in neighbor_grpo.algorithms.flow_grpo.
"""

from __future__ import annotations

import torch


def ratio_norm_bias(mean: torch.Tensor, old_mean: torch.Tensor, std: float, batch_dims: int = 2) -> torch.Tensor:
    """b = mean_d (mu_theta - mu_old)^2 / (2 shat^2): minus the log-ratio's mean over the rollout noise. The
    gradient flows through mu_theta, mu_old is the rollout's (detached)."""
    return (mean - old_mean.detach()).pow(2).flatten(batch_dims).mean(-1) / (2 * std**2)


def ratio_norm_log_ratio(log_ratio: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor, std: float,
                         batch_dims: int = 2) -> torch.Tensor:
    """RatioNorm: log rho = (logp_theta - logp_old + b) * shat (shat = the step's std; the reference's batch mean
    of std_j times the batch mean of sqrt(-dt), one number per step as here). In closed form
    mean_d((x' - mu_old)(mu_theta - mu_old)) / shat = mean_d(z (mu_theta - mu_old)): unbiased, antisymmetric."""
    return (log_ratio + ratio_norm_bias(mean, old_mean, std, batch_dims)) * std


def grad_reweight(s: float, s_next: float) -> float:
    """1 / mean_batch(sqrt(-dt))^2 = 1 / (s - s_next): the weight of step j's clipped loss."""
    return 1.0 / (s - s_next)
