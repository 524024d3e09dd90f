"""The `ngrpo` command: demo, pretrain, train, sample, eval, config."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _cmd_demo(args) -> None:
    from neighbor_grpo.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, overrides=args.overrides, progress=not args.no_progress,
             threads=args.threads)


def _cmd_pretrain(args) -> None:
    from neighbor_grpo.pretrain import BUILTIN_MODELS, ClassifierSettings, ensure_base_model, ensure_classifier
    import shutil

    if not 0.0 <= args.label_noise <= 1.0:
        raise ValueError(f"--label-noise: expected a share in [0, 1], got {args.label_noise}")
    classifier_dir, accuracy = ensure_classifier(progress=not args.no_progress, settings=ClassifierSettings(epochs=args.classifier_epochs))
    settings = BUILTIN_MODELS[args.model](label_noise=args.label_noise)
    settings.steps = args.steps or settings.steps
    base_dir = ensure_base_model(progress=not args.no_progress, settings=settings)
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
    from neighbor_grpo.resume import parse_changes
    from neighbor_grpo.trainer import train

    if args.accept_changes and not args.resume:
        raise ValueError("--accept-changes goes with --resume RUN (it changes settings of a run being continued)")
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {str(run)!r}: not a run folder (no config.yaml)")
        if args.config or args.overrides:
            raise ValueError("--resume takes the run's own config.yaml; give no config file or overrides (to change "
                             "optim.lr, iterations and a few more on purpose: --accept-changes KEY=VALUE)")
        config = load_config(run / "config.yaml")
        out = run
    else:
        if args.config and "=" in args.config and not Path(args.config).is_file():
            args.overrides, args.config = [args.config, *args.overrides], None  # overrides without a YAML file
        if not args.out:
            raise ValueError("--out RUN_FOLDER is required (or --resume RUN_FOLDER)")
        config = load_config(args.config, args.overrides)
        out = Path(args.out)
    from neighbor_grpo.distributed import is_main_process

    result = train(config, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress,
                   accept_changes=parse_changes(args.accept_changes or []) or None)
    if is_main_process():  # launched on several processes, one summary
        print(json.dumps({"run": str(result.run_dir), "before": result.eval_before, "after": result.eval_after}, indent=2))


def _load_model_for(args, config=None):
    """The checkpoint (ours or a diffusers folder) with model options: a run config's `model` section (eval
    --config), overridden by the flags (--resolution, --guidance, ...), then the --lora files merged in order."""
    import dataclasses

    from neighbor_grpo.models import load_adapter

    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise ValueError("--resolution sets both sides; give it or --height/--width, not both")
    flags = {"height": args.height or args.resolution, "width": args.width or args.resolution,
             "guidance": args.guidance, "cfg_scale": args.cfg_scale, "negative_prompt": args.negative_prompt,
             "dtype": args.dtype, "max_sequence_length": args.max_sequence_length}
    options = {k: v for k, v in dataclasses.asdict(config.model).items() if k != "path"} if config is not None else {}
    options.update({k: v for k, v in flags.items() if v is not None})
    adapter = load_adapter(args.checkpoint, device=args.device, options=options or None)
    for lora in args.lora or []:
        if not hasattr(adapter, "load_lora"):
            raise ValueError(f"--lora {lora!r}: the checkpoint's model ({type(adapter).__name__}) takes no LoRA files; "
                             "--lora is for diffusers models (FLUX.1, SD3/SD3.5)")
        adapter.load_lora(lora)
    return adapter


def _cmd_sample(args) -> None:
    import numpy as np
    import torch

    from neighbor_grpo.io import atomic_write_bytes
    from neighbor_grpo.logs import save_grid
    from neighbor_grpo.models import model_default_shift
    from neighbor_grpo.monitors import generate

    if args.num < 1:
        raise ValueError(f"--num: expected a count >= 1, got {args.num}")
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out {str(out)!r}: expected a file ending in .png (grid) or .npz (arrays)")
    adapter = _load_model_for(args)
    shift = args.shift if args.shift is not None else model_default_shift(adapter)
    _, images = generate(adapter, [args.prompt], args.num, args.seed, args.solver, args.steps, shift)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"--checkpoint {str(args.checkpoint)!r}: the samples hold NaN/inf "
                         f"({int((~torch.isfinite(images)).sum())} of {images.numel()} values); nothing written")
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


def _parse_reward_flag(text: str) -> dict:
    """'pickscore' or 'pickscore:path=/w/PickScore,weight=0.5' -> a reward spec {name, weight, kwargs}.
    Values are read as YAML scalars (numbers, true/false, strings)."""
    import yaml

    name, _, rest = text.partition(":")
    if not name.strip():
        raise ValueError(f"--reward {text!r}: expected NAME or NAME:key=value,... (e.g. pickscore:path=/weights/PickScore)")
    spec: dict = {"name": name.strip(), "weight": 1.0, "kwargs": {}}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--reward {text!r}: {item!r} is not key=value")
        parsed = yaml.safe_load(value) if value.strip() else ""
        if key.strip() == "weight":
            if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
                raise ValueError(f"--reward {text!r}: weight must be a number, got {value!r}")
            spec["weight"] = float(parsed)
        elif key.strip() == "label":
            spec["label"] = str(parsed)
        else:
            spec["kwargs"][key.strip()] = parsed
    return spec


def _eval_settings(args):
    """Rewards, prompts and sampling settings: a run config (--config) gives the defaults, flags override them."""
    from neighbor_grpo.config import load_config
    from neighbor_grpo.prompts import read_prompt_file, resolve_prompt_sets

    config = load_config(args.config) if args.config else None
    if args.reward:
        specs = [_parse_reward_flag(text) for text in args.reward]
    elif config is not None:
        specs = [{"name": r.name, "weight": r.weight, "kwargs": dict(r.kwargs), "label": r.label} for r in config.rewards]
    else:
        specs = [{"name": "digit_prob"}]
    if args.prompts_file:
        prompts = read_prompt_file(args.prompts_file, args.prompt_field, "--prompts-file")
    elif args.prompts is not None:
        prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    elif config is not None:
        prompts = resolve_prompt_sets(config.prompts)[1]
    else:
        prompts = [str(d) for d in range(10)]
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit: expected a count >= 1, got {args.limit}")
        prompts = prompts[: args.limit]
    if not prompts:
        raise ValueError("no prompts: give --prompts '0,1,2', a non-empty --prompts-file, or --config with eval prompts")
    sampling = {"samples_per_prompt": 16, "seed": 1_000_003, "solver": "dpm++2m", "steps": 8}
    if config is not None:
        sampling = {"samples_per_prompt": config.eval.samples_per_prompt, "seed": config.eval.seed,
                    "solver": config.eval.solver, "steps": config.eval.steps}
    for key in sampling:
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    return config, specs, prompts, sampling


def _cmd_eval(args) -> None:
    from neighbor_grpo.io import atomic_write_text
    from neighbor_grpo.logs import save_grid
    from neighbor_grpo.models import model_default_shift
    from neighbor_grpo.monitors import score_model
    from neighbor_grpo.rewards import build_rewards

    config, specs, prompts, sampling = _eval_settings(args)
    if sampling["samples_per_prompt"] < 2:
        raise ValueError(f"--samples-per-prompt: expected at least 2 (diversity needs pairs), got {sampling['samples_per_prompt']}")
    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out {str(out)!r}: expected a .json file (the grid is written beside it as .png)")
    adapter = _load_model_for(args, config)
    if args.shift is not None:
        shift = args.shift
    else:  # as training uses: the config's shift, else the model's own
        from neighbor_grpo.parts import model_shift

        shift = model_shift(config, adapter) if config is not None else model_default_shift(adapter)
    rewards = build_rewards(specs, device=args.device)
    if args.monitor:  # scored beside the rewards, never part of `reward`
        monitor_specs = [_parse_reward_flag(text) for text in args.monitor]
    else:
        monitor_specs = [dict(vars(r)) for r in config.eval.monitor_rewards] if config is not None else []
    monitors = build_rewards(monitor_specs, device=args.device) if monitor_specs else None
    try:  # non-finite samples or scores: an error, never NaN in the results
        result, images = score_model(adapter, rewards, prompts, sampling["samples_per_prompt"], sampling["seed"],
                                     sampling["solver"], sampling["steps"], shift, monitors)
    except FloatingPointError as error:
        raise ValueError(f"--checkpoint {str(args.checkpoint)!r}: {error}; nothing written") from None
    nonfinite = sorted(k for k, v in result["metrics"].items() if isinstance(v, float) and not math.isfinite(v))
    if nonfinite:
        raise ValueError(f"--checkpoint {str(args.checkpoint)!r}: non-finite metrics {nonfinite}; nothing written")
    result = {"checkpoint": str(args.checkpoint), "prompts": prompts, **sampling, "shift": shift,
              "rewards_config": specs, "monitor_rewards_config": monitor_specs, **result}
    atomic_write_text(out, json.dumps(result, indent=2))
    save_grid(images[:16, :8], out.with_suffix(".png"), row_labels=prompts[:16])
    print(json.dumps(result["metrics"], indent=2))


def _cmd_compare(args) -> None:
    from neighbor_grpo.compare import compare

    results = compare(args.out, budget_fe=args.budget_fe, lrs=tuple(args.lrs), methods=args.methods,
                      seeds=tuple(args.seeds), evals_per_run=args.evals_per_run, eval_samples=args.eval_samples,
                      frozen_target=args.frozen_target, equal_steps=args.equal_steps, ablation=args.ablation,
                      device=args.device, overwrite=args.overwrite,
                      progress=not args.no_progress, command="ngrpo " + " ".join(sys.argv[1:]))
    print(open(Path(args.out).with_suffix(".md")).read())
    print(f"wall-clock {results['wall_clock_s']:.0f} s; results in {args.out}")


def _cmd_config(args) -> None:
    from neighbor_grpo.config import config_reference

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, type_name, default, doc in config_reference():
        print(f"| `{key}` | {cell(type_name)} | `{json.dumps(default)}` | {cell(doc)} |")


def _add_model_flags(cmd) -> None:
    """Model options for sample and eval (diffusers models; the built-in model ignores them)."""
    cmd.add_argument("--lora", action="append", metavar="PATH",
                     help="diffusers-format LoRA (a folder with pytorch_lora_weights.safetensors, or the file) merged "
                          "into a FLUX.1/SD3 checkpoint; repeatable")
    cmd.add_argument("--height", type=int, help="diffusers models: image height in pixels (a multiple of 16)")
    cmd.add_argument("--width", type=int, help="diffusers models: image width in pixels (a multiple of 16)")
    cmd.add_argument("--resolution", type=int, help="diffusers models: height and width at once")
    cmd.add_argument("--guidance", type=float, help="FLUX.1: guidance-embedding value (default 3.5)")
    cmd.add_argument("--cfg-scale", type=float, help="SD3: classifier-free guidance scale (default 4.5; 1 disables)")
    cmd.add_argument("--negative-prompt", help="SD3: negative prompt of classifier-free guidance (default '')")
    cmd.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                     help="diffusers models (default auto: bfloat16 on CUDA, float32 on CPU)")
    cmd.add_argument("--max-sequence-length", type=int, help="diffusers models: T5 prompt tokens (512 FLUX, 256 SD3)")


def build_parser() -> argparse.ArgumentParser:
    from neighbor_grpo.solvers import SOLVERS

    parser = argparse.ArgumentParser(prog="ngrpo", description="Neighbor GRPO: align flow-matching image models with rewards.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain (or reuse) the built-in model and reward, align, show before/after")
    demo.add_argument("--out", required=True, help="run folder to create")
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--threads", type=int, default=2,
                      help="torch CPU threads (default 2; the README's table was made with 2, and the numbers "
                           "change in the last digits with the thread count)")
    demo.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. iterations=50)")
    demo.set_defaults(func=_cmd_demo)

    pre = sub.add_parser("pretrain", help="build the built-in base model and reward classifier (cached, reused)")
    pre.add_argument("--out", help="also copy them here as base/ and reward/")
    pre.add_argument("--overwrite", action="store_true")
    pre.add_argument("--model", choices=("digits", "digits-unet"), default="digits",
                     help="built-in model: digits (the MLP, default) or digits-unet (compute-bound conv U-Net)")
    pre.add_argument("--steps", type=int, help="base-model training steps (default: 3000 digits, 2000 digits-unet)")
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
    tr.add_argument("--accept-changes", nargs="+", action="extend", metavar="KEY=VALUE",
                    help="with --resume: change optim.lr, optim.max_grad_norm, iterations, eval.*, checkpoint_every or "
                         "keep_checkpoints on purpose (the run is then marked as not an exact replay in run.json)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_cmd_train)

    smp = sub.add_parser("sample", help="write samples of one prompt as a PNG grid or an .npz")
    smp.add_argument("--checkpoint", required=True,
                     help="model folder (a run's base/, aligned/ or best/, or a diffusers FLUX.1/SD3 folder)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--solver", default="dpm++2m", choices=sorted(SOLVERS))
    smp.add_argument("--steps", type=int, default=8)
    smp.add_argument("--shift", type=float, help="grid shift (default: the model's own; 1 for the built-in model)")
    smp.add_argument("--device", default="cpu")
    smp.add_argument("--out", required=True, help=".png or .npz")
    smp.add_argument("--prompt", required=True)
    smp.add_argument("--num", type=int, default=8)
    _add_model_flags(smp)
    smp.set_defaults(func=_cmd_sample)

    ev = sub.add_parser("eval", help="score a checkpoint with several rewards on held-out prompts and fixed seeds; "
                                     "writes JSON and a grid")
    ev.add_argument("--checkpoint", required=True, help="model folder (a run's base/, aligned/ or best/, or a diffusers folder)")
    ev.add_argument("--config", help="a run config (e.g. RUN/config.yaml): its rewards, held-out prompts, eval settings "
                                     "and model options are the defaults of the flags below")
    ev.add_argument("--reward", action="append", default=None, metavar="NAME[:key=value,...]",
                    help="reward to score with (repeatable), e.g. pickscore:path=/weights/PickScore,weight=0.5; "
                         "default: the config's rewards, else digit_prob")
    ev.add_argument("--monitor", action="append", default=None, metavar="NAME[:key=value,...]",
                    help="monitor reward (repeatable; same syntax as --reward), reported as monitor/<name> and never "
                         "part of `reward`, e.g. digit_gold; default: the config's eval.monitor_rewards")
    ev.add_argument("--prompts", help="comma-separated prompts (default: the config's held-out prompts, else '0'..'9')")
    ev.add_argument("--prompts-file", help="prompt file (.txt, .jsonl, .csv, .tsv; overrides --prompts)")
    ev.add_argument("--prompt-field", default="prompt", help="JSONL key or CSV column of --prompts-file")
    ev.add_argument("--limit", type=int, help="score only the first N prompts")
    ev.add_argument("--samples-per-prompt", type=int, help="default: the config's eval.samples_per_prompt, else 16")
    ev.add_argument("--seed", type=int, help="held-out noise seed (default: the config's eval.seed, else 1000003)")
    ev.add_argument("--solver", choices=sorted(SOLVERS), help="default: the config's eval.solver, else dpm++2m")
    ev.add_argument("--steps", type=int, help="default: the config's eval.steps, else 8")
    ev.add_argument("--shift", type=float, help="default: the config's shift, else the model's own")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", required=True, help="JSON file (a grid PNG is written beside it)")
    _add_model_flags(ev)
    ev.set_defaults(func=_cmd_eval)

    cmp = sub.add_parser("compare", help="Neighbor GRPO vs the SDE baselines at an equal forward-equivalent budget, "
                                         "scored on a gold reward nothing trains on")
    cmp.add_argument("--out", required=True, help="results JSON (markdown table and plots are written beside it)")
    cmp.add_argument("--budget-fe", type=float, default=60000.0,
                     help="training forward-equivalents per run (no-grad forwards + (1 + b) x with-grad forwards)")
    cmp.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4],
                     help="learning-rate sweep (first seed; chosen by the area under the held-out proxy curve)")
    cmp.add_argument("--methods", nargs="+", help="subset of neighbor_grpo flow_grpo dance_grpo mix_grpo mix_grpo_flash flow_grpo_cps grpo_guard")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (paired across methods)")
    cmp.add_argument("--evals-per-run", type=int, default=24,
                     help="held-out evaluations per run, at the same forward-equivalent points for every method")
    cmp.add_argument("--eval-samples", type=int, default=32, help="held-out samples per prompt")
    cmp.add_argument("--frozen-target", metavar="RESULTS_JSON",
                     help="report against the gold target frozen in an earlier results JSON (and a recomputed one)")
    cmp.add_argument("--equal-steps", type=int, metavar="N", help="instead: every method with N rollout steps")
    cmp.add_argument("--ablation", choices=["sigma", "anchors", "p", "solver", "tau", "ref_beta", "distance", "clip", "steps"],
                     help="instead: Neighbor GRPO's variants of one knob, paired against the first")
    cmp.add_argument("--device", help="default: cuda when available, else cpu")
    cmp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.set_defaults(func=_cmd_compare)

    cfg = sub.add_parser("config", help="print the reference of every config key (markdown)")
    cfg.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from neighbor_grpo.guards import TrainingIneffective

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingIneffective as error:  # the run finished but learned nothing: a failed run, not a usage error
        print(f"ngrpo {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (a run resumes from its latest checkpoint with `ngrpo train --resume RUN`)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TypeError, ImportError) as error:
        print(f"ngrpo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
