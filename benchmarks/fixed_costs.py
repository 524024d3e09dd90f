"""Costs of a training step that do not scale with the number of trained samples, on the built-in model:

    python benchmarks/fixed_costs.py

one gradient clip + AdamW step (torch's per-parameter loop and the fused kernel training uses), and a
forward+backward pass at several batch sizes (per-sample cost falls with the batch). One thread, medians. Where an
iteration's time goes per phase (rollout, reward, training) is `benchmarks/throughput.py`'s `details`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neighbor_grpo.training.parts import load_model


def median_ms(step, repeats: int, warmup: int = 5) -> float:
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times[warmup:])


def optimizer_step_costs(net: torch.nn.Module, repeats: int) -> None:
    params = list(net.parameters())
    for label, options in (("per-parameter loop (torch's default here)", {}),
                           ("fused kernel (what training uses)", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        for param in params:
            param.grad = torch.randn_like(param)

        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        print(f"parameters: {sum(p.numel() for p in params)}; one clip + AdamW step, {label}: "
              f"{median_ms(step, repeats):.2f} ms")


def forward_backward_costs(net: torch.nn.Module, repeats: int, batches=(32, 128, 432)) -> None:
    for batch in batches:
        x, s, labels = torch.randn(batch, 1, 8, 8), torch.rand(batch), torch.randint(0, 10, (batch,))
        ms = median_ms(lambda: net(x, s, labels).square().mean().backward(), repeats)
        print(f"forward+backward, batch {batch}: {ms:.2f} ms ({1000 * ms / batch:.0f} us per sample)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = load_model("builtin:digits", "cpu", progress=False).net
    optimizer_step_costs(net, args.repeats)
    forward_backward_costs(net, args.repeats)


if __name__ == "__main__":
    main()
