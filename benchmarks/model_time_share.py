"""Model-time share of a Neighbor GRPO iteration, for both built-in model sizes.

    python benchmarks/model_time_share.py --out benchmarks/results/model_time_share.json

Model time is the time spent inside the velocity net's and the reference net's forward calls plus inside
`backward()`, over the iteration's wall-clock (`trainer.train_iteration`, the loop `ngrpo train` runs, at the
paper's settings: 8 prompts x G 12, 8-step DPM-Solver++, B 4 anchors x K 4 steps, full fine-tune). Everything else
is not model time: prompt encoding, solver arithmetic, decoding, the reward, advantages, the optimizer and EMA steps.
Reported per model: the median over the timed iterations (after warm-up) of each iteration's share, with one torch
thread. Method: forward pre/post hooks on the nets read time.perf_counter; `torch.Tensor.backward` is wrapped for
the duration of the iteration (the trainer's one backward call site is `loss.backward()`), so the whole autograd
pass, weight and input gradients, counts as model time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by the tests
import method_runs  # noqa: E402  (each method built and its iterations run)
import throughput  # noqa: E402  (the throughput benchmark's settings and arguments)

MODELS = {"builtin": "builtin:digits, the residual MLP (1.7 MFLOP per sample)",
          "builtin-unet": "builtin:digits-unet, the conv U-Net (17.9 MFLOP per sample)"}


class ModelTimer:
    """Seconds inside the forward calls of `nets` and inside `Tensor.backward` (while `backward_timed` is on)."""

    def __init__(self, *nets: torch.nn.Module | None):
        self.forward_s = self.backward_s = 0.0
        self._depth, self._started = 0, 0.0
        self._handles = []
        for net in (n for n in nets if n is not None):
            self._handles += [net.register_forward_pre_hook(self._enter), net.register_forward_hook(self._leave)]

    def _enter(self, module, args) -> None:
        if self._depth == 0:  # a net called inside another (none today) counts once
            self._started = time.perf_counter()
        self._depth += 1

    def _leave(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.forward_s += time.perf_counter() - self._started

    @contextlib.contextmanager
    def backward_timed(self):
        original = torch.Tensor.backward

        def timed_backward(tensor, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.backward_s += time.perf_counter() - started

        torch.Tensor.backward = timed_backward
        try:
            yield self
        finally:
            torch.Tensor.backward = original

    def reset(self) -> tuple[float, float]:
        seconds = (self.forward_s, self.backward_s)
        self.forward_s = self.backward_s = 0.0
        return seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(arch: str, warmup: int, iters: int, extra: list[str]) -> dict:
    """Neighbor GRPO iterations of one model at the paper's settings; per-iteration seconds and model seconds."""
    args = throughput.parse_args(["--arch", arch, "--methods", "neighbor_grpo", "--device", "cpu", *extra])
    reward = args.reward or throughput.DEFAULT_REWARD.get(arch, throughput.FALLBACK_REWARD)
    if reward == "digit_prob":
        from neighbor_grpo.builtin.pretrain import ensure_classifier

        ensure_classifier(progress=False)
    from neighbor_grpo.rewards import build_rewards

    rewards = method_runs.TimedRewards(build_rewards([{"name": reward}], device="cpu"), lambda: None)
    run, _ = method_runs.prepare_method(args, "neighbor_grpo", "cpu", torch.float32, reward)
    timer = ModelTimer(run.adapter.net, run.parts.reference_net)
    rows = []
    with timer.backward_timed():
        for index in range(warmup + iters):
            timer.reset()
            record = method_runs.run_iteration(run, rewards, lambda: None, "cpu")
            forward_s, backward_s = timer.reset()
            if index >= warmup:
                rows.append({"iteration_s": record.seconds, "forward_s": forward_s, "backward_s": backward_s,
                             "reward_s": record.reward_s, "share": (forward_s + backward_s) / record.seconds})
    timer.remove()
    median = lambda key: statistics.median(row[key] for row in rows)  # noqa: E731
    return {"model": MODELS.get(arch, arch), "model_time_share": median("share"),
            "share_min": min(r["share"] for r in rows), "share_max": max(r["share"] for r in rows),
            "iteration_s": median("iteration_s"), "forward_s": median("forward_s"), "backward_s": median("backward_s"),
            "reward_s": median("reward_s"), "parameters": sum(p.numel() for p in run.adapter.net.parameters()),
            "iterations": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(MODELS), choices=throughput.ARCHS[:3],
                        help="models (default: both built-in sizes)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--reward", help="reward name (default digit_prob, as throughput.py for the built-in models)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # the machine may be shared: the load says how much the figures can be trusted
    extra = [item for override in args.set for item in ("--set", override)]
    extra += ["--reward", args.reward] if args.reward else []
    results = {arch: measure(arch, args.warmup, args.iters, extra) for arch in args.archs}
    print("| model | model-time share (median) | range | s/iter | forward s | backward s | reward s |")
    print("|---|---|---|---|---|---|---|")
    for arch, r in results.items():
        print(f"| {r['model']} | {100 * r['model_time_share']:.1f}% | {100 * r['share_min']:.1f}-"
              f"{100 * r['share_max']:.1f}% | {r['iteration_s']:.4f} | {r['forward_s']:.4f} | {r['backward_s']:.4f} "
              f"| {r['reward_s']:.4f} |")
    command = ["benchmarks/model_time_share.py", *(argv if argv is not None else sys.argv[1:])]
    result = {"models": results,
              "settings": {"method": "neighbor_grpo (paper settings)", "iters": args.iters, "warmup": args.warmup,
                           "threads": args.threads, "overrides": args.set},
              "definition": __doc__.split("\n\n", 2)[2].strip(),
              "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                              "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
                              "command": command}}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
    return result


if __name__ == "__main__":
    main()
