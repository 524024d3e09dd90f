"""Where an iteration's time goes, per algorithm: rollout, decode + reward, advantages, old policy, training.

    python benchmarks/profile_phases.py neighbor_grpo flow_grpo mix_grpo_flash dance_grpo
    python benchmarks/profile_phases.py --costs     # fixed costs: one optimizer step, forward+backward by batch size

Runs the built-in model at each method's paper settings (neighbor_grpo.compare.PAPER_SETTINGS) on one thread,
mirroring neighbor_grpo.trainer.train_iteration phase by phase; prints the median of the timed iterations in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neighbor_grpo.advantages import combine_reward_advantages
from neighbor_grpo.compare import PAPER_SETTINGS
from neighbor_grpo.config import load_config
from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.trainer import build_training_parts, load_model, prompt_batch, read_prompts

PHASES = ("rollout", "decode+reward", "advantages", "old_policy", "training")


def profile_method(method: str, iterations: int, warmup: int, prompts_per_iteration: int) -> tuple[dict, int]:
    config = load_config(None, PAPER_SETTINGS[method] + [f"prompts_per_iteration={prompts_per_iteration}"])
    adapter = load_model(config.model.path, "cpu", progress=False)
    parts = build_training_parts(config, adapter)
    rewards = build_rewards([{"name": "digit_prob"}])
    prompts, algorithm = read_prompts(config), parts.algorithm
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for iteration in range(warmup + iterations):
        marks = [time.perf_counter()]
        chosen, indices = prompt_batch(prompts, config.seed, iteration, prompts_per_iteration)
        rollout = algorithm.rollout(adapter.velocity, adapter.encode_prompts(chosen), chosen, indices, iteration,
                                    adapter.latent_shape(), adapter.device)
        marks.append(time.perf_counter())
        P, G = rollout.final.shape[:2]
        images = adapter.decode(rollout.final.flatten(0, 1))
        scores = {k: v.view(P, G) for k, v in rewards.score(images, [p for p in chosen for _ in range(G)]).items()}
        marks.append(time.perf_counter())
        advantages = combine_reward_advantages(scores, rewards.weights, config.reward_normalization, algorithm.advantages)
        advantages, _ = algorithm.clip(advantages)
        batches = algorithm.minibatches(rollout, iteration)
        marks.append(time.perf_counter())
        rollout = algorithm.prepare_old_policy(adapter.velocity, rollout, batches)
        marks.append(time.perf_counter())
        for batch in batches:
            parts.optimizer.zero_grad(set_to_none=True)
            loss, _ = algorithm.loss(adapter.velocity, rollout, advantages, batch, parts.reference_velocity)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parts.params, config.optim.max_grad_norm or float("inf"))
            parts.optimizer.step()
        marks.append(time.perf_counter())
        if iteration >= warmup:
            for phase, start, end in zip(PHASES, marks, marks[1:]):
                times[phase].append(end - start)
    return {phase: 1000 * statistics.median(values) for phase, values in times.items()}, len(batches)


def fixed_costs(repeats: int = 30) -> None:
    adapter = load_model("builtin:digits", "cpu", progress=False)
    params = list(adapter.net.parameters())
    for label, options in (("per-parameter loop (torch's default here)", {}), ("fused kernel (what training uses)", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        for param in params:
            param.grad = torch.randn_like(param)
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            times.append(time.perf_counter() - tick)
        print(f"parameters: {sum(p.numel() for p in params)}; one clip + AdamW step, {label}: "
              f"{1000 * statistics.median(times[5:]):.2f} ms")
    for batch in (32, 128, 432):
        x, s, labels = torch.randn(batch, 1, 8, 8), torch.rand(batch), torch.randint(0, 10, (batch,))
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            adapter.net(x, s, labels).square().mean().backward()
            times.append(time.perf_counter() - tick)
        median = statistics.median(times[5:])
        print(f"forward+backward, batch {batch}: {1000 * median:.2f} ms ({1e6 * median / batch:.0f} us per sample)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", default=["neighbor_grpo", "flow_grpo", "mix_grpo_flash", "dance_grpo"],
                        help=f"any of {sorted(PAPER_SETTINGS)}")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--costs", action="store_true", help="measure the fixed costs instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.costs:
        fixed_costs()
        return
    print("| method | " + " | ".join(PHASES) + " | total | optimizer steps |")
    print("|---|" + "---|" * (len(PHASES) + 2))
    for method in args.methods:
        if method not in PAPER_SETTINGS:
            parser.error(f"unknown method {method!r}; expected one of {sorted(PAPER_SETTINGS)}")
        phases, steps = profile_method(method, args.iterations, args.warmup, args.prompts)
        cells = " | ".join(f"{phases[p]:.1f}" for p in PHASES)
        print(f"| {method} | {cells} | {sum(phases.values()):.1f} | {steps} |")


if __name__ == "__main__":
    main()
