"""The `ngrpo` command: demo, pretrain, train, sample, eval, config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neighbor_grpo.failures import InterruptSeen, report_failure, report_interrupt, stdout_is_closed  # light: loaded before any Ctrl-C can matter


def _cmd_demo(args) -> None:
    from neighbor_grpo.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, overrides=args.overrides, progress=not args.no_progress)


def _cmd_pretrain(args) -> None:
    from neighbor_grpo.ownership import check_folder_target
    from neighbor_grpo.pretrain import BaseModelSettings, ClassifierSettings, ensure_base_model, ensure_classifier
    from neighbor_grpo.runfolder import RunFolder
    import shutil

    if args.out:  # refused before minutes of pretraining, not after
        check_folder_target(args.out, args.overwrite)
    classifier_dir, accuracy = ensure_classifier(progress=not args.no_progress, settings=ClassifierSettings(epochs=args.classifier_epochs))
    base_dir = ensure_base_model(progress=not args.no_progress,
                                 settings=BaseModelSettings(steps=args.steps, label_noise=args.label_noise))
    print(f"reward classifier: {classifier_dir} (held-out accuracy {accuracy:.4f})")
    print(f"base model:        {base_dir}")
    if args.out:
        with RunFolder(args.out, overwrite=args.overwrite, kind="pretrain") as folder:
            for source, name in ((base_dir, "base"), (classifier_dir, "reward")):
                shutil.copytree(source, folder.path / name)
            out = folder.commit()
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
    from neighbor_grpo.distributed import is_main_process

    result = train(config, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
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

    from neighbor_grpo.distributed import check_device
    from neighbor_grpo.io import atomic_write_bytes
    from neighbor_grpo.logs import save_grid
    from neighbor_grpo.models import model_default_shift
    from neighbor_grpo.monitors import generate
    from neighbor_grpo.ownership import check_file_outputs

    if args.num < 1:
        raise ValueError(f"--num: expected a count >= 1, got {args.num}")
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out {str(out)!r}: expected a file ending in .png (grid) or .npz (arrays)")
    check_file_outputs([out], args.overwrite)
    check_device(args.device, "--device")
    adapter = _load_model_for(args)
    shift = args.shift if args.shift is not None else model_default_shift(adapter)
    _, images = generate(adapter, [args.prompt], args.num, args.seed, args.solver, args.steps, shift)
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
    from neighbor_grpo.distributed import check_device
    from neighbor_grpo.io import atomic_write_text
    from neighbor_grpo.ownership import check_file_outputs
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
    check_file_outputs([out, out.with_suffix(".png")], args.overwrite)
    check_device(args.device, "--device")
    adapter = _load_model_for(args, config)
    if args.shift is not None:
        shift = args.shift
    else:  # as training uses: the config's shift, else the model's own
        from neighbor_grpo.trainer import model_shift

        shift = model_shift(config, adapter) if config is not None else model_default_shift(adapter)
    rewards = build_rewards(specs, device=args.device)
    result, images = score_model(adapter, rewards, prompts, sampling["samples_per_prompt"], sampling["seed"],
                                 sampling["solver"], sampling["steps"], shift)
    result = {"checkpoint": str(args.checkpoint), "prompts": prompts, **sampling, "shift": shift,
              "rewards_config": specs, **result}
    atomic_write_text(out, json.dumps(result, indent=2))
    save_grid(images[:16, :8], out.with_suffix(".png"), row_labels=prompts[:16])
    print(json.dumps(result["metrics"], indent=2))


def _cmd_compare(args) -> None:
    from neighbor_grpo.compare import compare

    results = compare(args.out, budget_s=args.budget_s, lrs=tuple(args.lrs), methods=args.methods, target=args.target,
                      equal_steps=args.equal_steps or None, ablation=args.ablation, evals_per_run=args.evals_per_run,
                      eval_samples=args.eval_samples, seed=args.seed, device=args.device, progress=not args.no_progress,
                      overwrite=args.overwrite)
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
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain (or reuse) the built-in model and reward, align, show before/after")
    demo.add_argument("--out", required=True, help="run folder to create")
    demo.add_argument("--overwrite", action="store_true", help="replace a --out folder ngrpo made")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. iterations=50)")
    demo.set_defaults(func=_cmd_demo)

    pre = sub.add_parser("pretrain", help="build the built-in base model and reward classifier (cached, reused)")
    pre.add_argument("--out", help="also copy them here as base/ and reward/")
    pre.add_argument("--overwrite", action="store_true", help="replace a --out folder ngrpo made")
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
    tr.add_argument("--overwrite", action="store_true", help="replace a --out folder ngrpo made (after start-up succeeds)")
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
    smp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
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
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out JSON and its .png")
    _add_model_flags(ev)
    ev.set_defaults(func=_cmd_eval)

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
    cmp.add_argument("--overwrite", action="store_true", help="replace existing results (the JSON, .md and plots)")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.set_defaults(func=_cmd_compare)

    cfg = sub.add_parser("config", help="print the reference of every config key (markdown)")
    cfg.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every expected failure ends as one line `ngrpo CMD: error: ...` (exit 2 bad input, 1 failure, 130 Ctrl-C);
    --debug (or NGRPO_DEBUG=1) prints the traceback too."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NGRPO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), "")
    interrupted = InterruptSeen()
    try:
        with interrupted:
            args = build_parser().parse_args(argv)
            command = args.command
            args.func(args)
    except KeyboardInterrupt:
        return report_interrupt(command, debug)
    except BrokenPipeError:
        if stdout_is_closed():  # `ngrpo config | head`: the reader stopped reading, nothing went wrong here
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return 0
        return report_failure(command, sys.exc_info()[1], debug)
    except Exception as error:
        if interrupted.seen:  # Ctrl-C inside an import (torch's) can surface as another error: it is still Ctrl-C
            return report_interrupt(command, debug)
        return report_failure(command, error, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
