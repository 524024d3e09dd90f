"""The `ngrpo` command: demo, pretrain, train, sample, eval, config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args) -> None:
    from neighbor_grpo.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, overrides=args.overrides, progress=not args.no_progress)


def _cmd_pretrain(args) -> None:
    from neighbor_grpo.pretrain import BaseModelSettings, ClassifierSettings, ensure_base_model, ensure_classifier
    import shutil

    classifier_dir, accuracy = ensure_classifier(progress=not args.no_progress, settings=ClassifierSettings(epochs=args.classifier_epochs))
    base_dir = ensure_base_model(progress=not args.no_progress,
                                 settings=BaseModelSettings(steps=args.steps, label_noise=args.label_noise))
    print(f"reward classifier: {classifier_dir} (held-out accuracy {accuracy:.4f})")
    print(f"base model:        {base_dir}")
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise FileExistsError(f"--out {str(out)!r} is not empty; pass --overwrite to replace it")
        out.mkdir(parents=True, exist_ok=True)
        for source, name in ((base_dir, "base"), (classifier_dir, "reward")):
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.copytree(source, out / name)
        print(f"copied to {out}/base (a --checkpoint for sample/eval) and {out}/reward (digit_prob kwargs.path)")


def _cmd_train(args) -> None:
    from neighbor_grpo.config import load_config
    from neighbor_grpo.trainer import train

    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {str(run)!r}: not a run folder (no config.yaml)")
        if args.config or args.overrides:
            raise ValueError("--resume takes the run's own config.yaml; give no config file or overrides")
        config = load_config(run / "config.yaml")
        out = run
    else:
        if args.config and "=" in args.config and not Path(args.config).is_file():
            args.overrides, args.config = [args.config, *args.overrides], None  # overrides without a YAML file
        if not args.out:
            raise ValueError("--out RUN_FOLDER is required (or --resume RUN_FOLDER)")
        config = load_config(args.config, args.overrides)
        out = Path(args.out)
    result = train(config, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps({"run": str(result.run_dir), "before": result.eval_before, "after": result.eval_after}, indent=2))


def _load_for_sampling(args):
    from neighbor_grpo.models import load_adapter

    return load_adapter(args.checkpoint, device=args.device)


def _cmd_sample(args) -> None:
    import numpy as np
    import torch

    from neighbor_grpo.io import atomic_write_bytes
    from neighbor_grpo.logs import save_grid
    from neighbor_grpo.monitors import generate

    if args.num < 1:
        raise ValueError(f"--num: expected a count >= 1, got {args.num}")
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out {str(out)!r}: expected a file ending in .png (grid) or .npz (arrays)")
    adapter = _load_for_sampling(args)
    _, images = generate(adapter, [args.prompt], args.num, args.seed, args.solver, args.steps, args.shift)
    images = images.clamp(0, 1)
    if out.suffix == ".png":
        columns = min(args.num, 8)
        rows = (args.num + columns - 1) // columns
        padded = torch.ones(rows * columns, *images.shape[2:])
        padded[: args.num] = images[0]
        save_grid(padded.view(rows, columns, *images.shape[2:]), out)
    else:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, images=images[0].float().cpu().numpy().astype(np.float32), prompts=np.array([args.prompt] * args.num))
        atomic_write_bytes(out, buffer.getvalue())
    print(f"wrote {args.num} sample(s) of {args.prompt!r} to {out}")


def _cmd_eval(args) -> None:
    from neighbor_grpo.io import atomic_write_text
    from neighbor_grpo.logs import save_grid
    from neighbor_grpo.monitors import evaluate
    from neighbor_grpo.rewards import build_rewards

    if args.samples_per_prompt < 2:
        raise ValueError(f"--samples-per-prompt: expected at least 2 (diversity needs pairs), got {args.samples_per_prompt}")
    adapter = _load_for_sampling(args)
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()] if args.prompts else None
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {str(path)!r}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompts '0,1,2' or a non-empty --prompts-file")
    rewards = build_rewards([{"name": name} for name in args.reward], device=args.device)
    metrics, images = evaluate(adapter, rewards, prompts, args.samples_per_prompt, args.seed, args.solver, args.steps, args.shift)
    result = {"checkpoint": str(args.checkpoint), "prompts": prompts, "samples_per_prompt": args.samples_per_prompt,
              "seed": args.seed, "solver": args.solver, "steps": args.steps, "metrics": metrics}
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=2))
    save_grid(images[:, :8], out.with_suffix(".png"), row_labels=prompts)
    print(json.dumps(metrics, indent=2))


def _cmd_compare(args) -> None:
    from neighbor_grpo.compare import compare

    results = compare(args.out, budget_s=args.budget_s, lrs=tuple(args.lrs), methods=args.methods, target=args.target,
                      equal_steps=args.equal_steps or None, ablation=args.ablation, evals_per_run=args.evals_per_run,
                      eval_samples=args.eval_samples, seed=args.seed, device=args.device, progress=not args.no_progress)
    print(open(Path(args.out).with_suffix(".md")).read())
    print(f"wall-clock {results['wall_clock_s']:.0f} s; results in {args.out}")


def _cmd_config(args) -> None:
    from neighbor_grpo.config import config_reference

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, type_name, default, doc in config_reference():
        print(f"| `{key}` | {cell(type_name)} | `{json.dumps(default)}` | {cell(doc)} |")


def build_parser() -> argparse.ArgumentParser:
    from neighbor_grpo.solvers import SOLVERS

    parser = argparse.ArgumentParser(prog="ngrpo", description="Neighbor GRPO: align flow-matching image models with rewards.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain (or reuse) the built-in model and reward, align, show before/after")
    demo.add_argument("--out", required=True, help="run folder to create")
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. iterations=50)")
    demo.set_defaults(func=_cmd_demo)

    pre = sub.add_parser("pretrain", help="build the built-in base model and reward classifier (cached, reused)")
    pre.add_argument("--out", help="also copy them here as base/ and reward/")
    pre.add_argument("--overwrite", action="store_true")
    pre.add_argument("--steps", type=int, default=3000, help="base-model training steps")
    pre.add_argument("--label-noise", type=float, default=0.4, help="share of labels replaced at random")
    pre.add_argument("--classifier-epochs", type=int, default=40)
    pre.add_argument("--no-progress", action="store_true")
    pre.set_defaults(func=_cmd_pretrain)

    tr = sub.add_parser("train", help="align a model: YAML config + key=value overrides")
    tr.add_argument("config", nargs="?", help="YAML config file (optional: defaults otherwise)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 neighbor_grpo.group_size=8")
    tr.add_argument("--out", help="run folder to create")
    tr.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest good checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_cmd_train)

    for name, helptext, func in (("sample", "write samples of one prompt as a PNG grid or an .npz", _cmd_sample),
                                 ("eval", "score a checkpoint on prompts with fixed seeds; writes JSON and a grid", _cmd_eval)):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("--checkpoint", required=True, help="model folder (a run's base/, aligned/ or best/)")
        cmd.add_argument("--seed", type=int, default=0 if name == "sample" else 1_000_003)
        cmd.add_argument("--solver", default="dpm++2m", choices=sorted(SOLVERS))
        cmd.add_argument("--steps", type=int, default=8)
        cmd.add_argument("--shift", type=float, default=1.0)
        cmd.add_argument("--device", default="cpu")
        cmd.add_argument("--out", required=True, help=".png or .npz" if name == "sample" else "JSON file (a grid PNG is written beside it)")
        if name == "sample":
            cmd.add_argument("--prompt", required=True)
            cmd.add_argument("--num", type=int, default=8)
        else:
            cmd.add_argument("--prompts", default=",".join(str(d) for d in range(10)), help="comma-separated prompts")
            cmd.add_argument("--prompts-file", help="text file, one prompt per line (overrides --prompts)")
            cmd.add_argument("--samples-per-prompt", type=int, default=16)
            cmd.add_argument("--reward", action="append", default=None, help="reward name (repeatable); default digit_prob")
        cmd.set_defaults(func=func)

    cmp = sub.add_parser("compare", help="Neighbor GRPO vs the SDE baselines at equal training wall-clock")
    cmp.add_argument("--out", required=True, help="results JSON (markdown table and plots are written beside it)")
    cmp.add_argument("--budget-s", type=float, default=25.0, help="training seconds per method and learning rate")
    cmp.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4], help="learning-rate sweep for every method")
    cmp.add_argument("--methods", nargs="+", help="subset of neighbor_grpo flow_grpo dance_grpo mix_grpo mix_grpo_flash")
    cmp.add_argument("--target", type=float, help="target held-out reward (default: best final one among SDE baselines)")
    cmp.add_argument("--equal-steps", type=int, default=8, help="second table: every method with this many steps (0: skip)")
    cmp.add_argument("--ablation", choices=["sigma", "anchors", "p", "solver", "tau", "ref_beta", "distance", "clip", "steps"],
                     help="instead: sweep one Neighbor GRPO knob")
    cmp.add_argument("--evals-per-run", type=int, default=8, help="held-out evaluations per run (fixed time interval)")
    cmp.add_argument("--eval-samples", type=int, default=8, help="held-out samples per prompt")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--device", help="default: cuda when available, else cpu")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.set_defaults(func=_cmd_compare)

    cfg = sub.add_parser("config", help="print the reference of every config key (markdown)")
    cfg.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "reward", "unset") is None:
        args.reward = ["digit_prob"]
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted (a run resumes from its latest checkpoint with `ngrpo train --resume RUN`)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TypeError) as error:
        print(f"ngrpo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
