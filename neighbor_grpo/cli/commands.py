"""The `ngrpo` command: demo, pretrain, distill, train, sample, eval, compare, plan, config, serve-reward."""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C before main() is running (Python is still importing): nothing was written yet, so one line and 130."""
    os.write(2, b"ngrpo: interrupted\n")
    os._exit(130)


def _is_the_program() -> bool:
    """`ngrpo ...` or `python -m neighbor_grpo.cli ...` (also under accelerate/torchrun), not an import by a test."""
    argv = getattr(sys, "orig_argv", [])
    as_module = any(flag == "-m" and name == "neighbor_grpo.cli" for flag, name in zip(argv, argv[1:]))
    return __name__ == "__main__" or as_module or os.path.basename(sys.argv[0]) == "ngrpo"


if _is_the_program():
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from neighbor_grpo.cli.failures import InterruptSeen, report_failure, report_interrupt, stdout_is_closed  # light: loaded before any Ctrl-C can matter
from neighbor_grpo.cli.sampling import _cmd_eval, _cmd_sample  # the sample and eval commands (light, too)
from neighbor_grpo.cli.serving import add_serve_reward_command  # light, too
from neighbor_grpo.cli.builtin_commands import demo_command, distill_command, pretrain_command  # the built-in tasks (light)


def _cmd_train(args) -> None:
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.runs.resume import parse_changes
    from neighbor_grpo.training.trainer import train

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
    from neighbor_grpo.parallel.distributed import is_main_process

    result = train(config, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress,
                   accept_changes=parse_changes(args.accept_changes or []) or None)
    if is_main_process():  # launched on several processes, one summary
        print(json.dumps({"run": str(result.run_dir), "before": result.eval_before, "after": result.eval_after}, indent=2))


def _cmd_compare(args) -> None:
    from neighbor_grpo.bench.compare import compare

    results = compare(args.out, budget_fe=args.budget_fe, lrs=tuple(args.lrs), methods=args.methods,
                      seeds=tuple(args.seeds), evals_per_run=args.evals_per_run, eval_samples=args.eval_samples,
                      frozen_target=args.frozen_target, equal_steps=args.equal_steps, ablation=args.ablation,
                      device=args.device, base_path=args.base, overwrite=args.overwrite,
                      progress=not args.no_progress, command="ngrpo " + " ".join(sys.argv[1:]), workers=args.workers,
                      grid=not args.no_grid, throughput_iters=args.throughput_iters,
                      throughput_warmup=args.throughput_warmup, reference=args.reference, x3=not args.no_x3,
                      tuning_seeds=args.tuning_seeds, bands=args.bands, max_lr_points=args.max_lr_points,
                      eval_sampler=args.eval_sampler, parity_grid=args.parity_grid, tuning_gold=args.tuning_gold,
                      side_sampler=args.side_sampler, resume=args.resume)
    print(open(Path(args.out).with_suffix(".md")).read())
    print(f"wall-clock {results['wall_clock_s']:.0f} s; results in {args.out}")


def _cmd_plan(args) -> int:
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.plan.planner import plan, stderr_progress
    from neighbor_grpo.plan.report import render

    if args.config and "=" in args.config and not Path(args.config).is_file():
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides without a YAML file
    result = plan(load_config(args.config, args.overrides), gpus=args.gpus, gpu=args.gpu, mfu=args.mfu,
                  progress=None if args.quiet else stderr_progress)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0 if result["fits"] else 3


def _cmd_config(args) -> None:
    from neighbor_grpo.config.train_config import config_reference

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
    cmd.add_argument("--num-frames", type=int, help="video models (Wan): frames per video, 4k + 1 (default 81)")
    cmd.add_argument("--guidance", type=float, help="FLUX.1: guidance-embedding value (default 3.5)")
    cmd.add_argument("--cfg-scale", type=float, help="SD3: classifier-free guidance scale (default 4.5; 1 disables)")
    cmd.add_argument("--negative-prompt", help="SD3: negative prompt of classifier-free guidance (default '')")
    cmd.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                     help="diffusers models (default auto: bfloat16 on CUDA, float32 on CPU)")
    cmd.add_argument("--max-sequence-length", type=int, help="diffusers models: T5 prompt tokens (512 FLUX, 256 SD3)")


def build_parser() -> argparse.ArgumentParser:
    from neighbor_grpo.maths.solvers import SOLVERS

    parser = argparse.ArgumentParser(prog="ngrpo", description="Neighbor GRPO: align flow-matching image models with rewards.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain (or reuse) the built-in model and reward, align, show before/after")
    demo.add_argument("--out", required=True, help="run folder to create")
    demo.add_argument("--overwrite", action="store_true", help="replace a --out folder ngrpo made")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--task", choices=("digits", "words"), default="digits",
                      help="digits (default: the digit classifier as reward) or words (text rendering, the ocr reward)")
    demo.add_argument("--threads", type=int, default=2,
                      help="torch CPU threads (default 2; the README's table was made with 2, and the numbers "
                           "change in the last digits with the thread count)")
    demo.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. iterations=50)")
    demo.set_defaults(func=demo_command)

    pre = sub.add_parser("pretrain", help="build the built-in base model and reward classifier (cached, reused)")
    pre.add_argument("--out", help="also copy them here as base/ and reward/")
    pre.add_argument("--overwrite", action="store_true", help="replace a --out folder ngrpo made")
    pre.add_argument("--model", choices=("digits", "digits-unet", "words"), default="digits",
                     help="built-in model: digits (the MLP, default), digits-unet (compute-bound conv U-Net) or words "
                          "(text rendering: a small SD3 transformer, ~20 CPU-minutes; no classifier, OCR scores it)")
    pre.add_argument("--steps", type=int, help="base-model training steps (default: 3000 digits, 2000 digits-unet; "
                                               "words: at most 7000, it stops once held-out words are 30%% legible)")
    pre.add_argument("--label-noise", type=float, default=0.4, help="share of labels replaced at random")
    pre.add_argument("--classifier-epochs", type=int, default=40)
    pre.add_argument("--no-progress", action="store_true")
    pre.set_defaults(func=pretrain_command)

    dis = sub.add_parser("distill", help="a few-step student of the built-in model by reflow (builtin:digits-reflow "
                                         "with the defaults; cached, reused)")
    dis.add_argument("--out", help="also copy it here as base/")
    dis.add_argument("--overwrite", action="store_true", help="replace a --out folder ngrpo made")
    dis.add_argument("--pairs", type=int, default=8192, help="(noise, teacher sample) pairs (default 8192)")
    dis.add_argument("--teacher-steps", type=int, default=32, help="teacher ODE steps per sample (default 32)")
    dis.add_argument("--train-steps", type=int, default=4000, help="student optimizer steps (default 4000)")
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--no-progress", action="store_true")
    dis.set_defaults(func=distill_command)

    tr = sub.add_parser("train", help="align a model: YAML config + key=value overrides")
    tr.add_argument("config", nargs="?", help="YAML config file (optional: defaults otherwise)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 neighbor_grpo.group_size=8")
    tr.add_argument("--out", help="run folder to create")
    tr.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest good checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace a --out folder ngrpo made (after start-up succeeds)")
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
    smp.add_argument("--out", required=True, help=".png (grid; for videos a row of frames per sample), .npz, or for "
                                                  "video models .mp4/.gif (one file per sample: NAME-0.mp4, ...)")
    smp.add_argument("--fps", type=int, default=16, help="frame rate of .mp4/.gif videos (Wan 2.1: 16)")
    smp.add_argument("--prompt", required=True)
    smp.add_argument("--image", help="a source image for the prompt: image-to-video (Wan2.2-TI2V-5B) or an editing "
                                     "model's input (FLUX.1 Kontext), as a JSONL prompt row's `image`")
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
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out JSON and its .png")
    _add_model_flags(ev)
    ev.set_defaults(func=_cmd_eval)

    cmp = sub.add_parser("compare", help="Neighbor GRPO vs the SDE baselines at an equal forward-equivalent budget, "
                                         "scored on a gold reward nothing trains on")
    cmp.add_argument("--out", required=True, help="results JSON (markdown table and plots are written beside it)")
    cmp.add_argument("--budget-fe", type=float, default=60000.0,
                     help="training forward-equivalents per run (no-grad forwards + (1 + b) x with-grad forwards)")
    cmp.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4],
                     help="learning-rate grid, tuned on the first seed with each method's knob (chosen by the area "
                          "under the held-out proxy curve); a choice at an end of the grid adds the next x3 point")
    cmp.add_argument("--reference", default="neighbor_grpo", metavar="ROW",
                     help="the row every ratio and 'no worse' verdict is paired against (default neighbor_grpo, the "
                          "paper's settings; e.g. neighbor_grpo_defaults); must be one of --methods")
    cmp.add_argument("--no-x3", action="store_true",
                     help="keep the lr x knob grid but never extend the lr grid by the x3 point")
    cmp.add_argument("--no-grid", action="store_true",
                     help="tune the lr only: every method at its reference knob value, no x3 rule (cheap runs)")
    cmp.add_argument("--tuning-seeds", type=int, nargs="+", metavar="SEED",
                     help="tune on these seeds, never reported (issue #23: 100 101); default: the first of --seeds")
    cmp.add_argument("--bands", metavar="BANDS_JSON",
                     help="select by the gold-free rule with these monitor bands (python -m neighbor_grpo.bench.bands; "
                          "commit the file first: its commit is recorded)")
    cmp.add_argument("--max-lr-points", type=int, metavar="N",
                     help="widen the lr grid in x3 steps while the choice sits at an end, up to N lrs (at most 6); "
                          "default: one x3 step")
    cmp.add_argument("--eval-sampler", default="dpm8",
                     help="held-out sampler: dpm8 (8-step DPM-Solver++), euler40 (the neutral 40-step Euler ODE; "
                          "dpm8's gold recorded beside it), or SOLVER:STEPS (euler:4 for a few-step model)")
    cmp.add_argument("--side-sampler", metavar="SAMPLER",
                     help="scored beside the headline sampler: dpm8 (the default beside any other headline), "
                          "SOLVER:STEPS, or none (no side evaluation: half the sampling and gold of an evaluation)")
    cmp.add_argument("--tuning-gold", default="all", choices=["all", "final"],
                     help="final: tuning runs (on --tuning-seeds, never reported) score the gold only at their last 3 "
                          "evaluations, the final value the selection-regret check reads (the selection never reads "
                          "it); reported runs keep the whole gold curve. Default all")
    cmp.add_argument("--parity-grid", action="store_true",
                     help="issue #23 candidates: anchoring variants (KL / ref_beta), CPS's scaled clip, warm-ups "
                          "scaled to the budget beside the authors'")
    cmp.add_argument("--methods", nargs="+", help="default: the main table (neighbor_grpo neighbor_grpo_defaults "
                     "flow_grpo dance_grpo mix_grpo mix_grpo_flash); also neighbor_grpo_x0, flow_grpo_cps, grpo_guard, "
                     "diffusion_nft, awm, dgpo")
    cmp.add_argument("--base", default="builtin:digits", metavar="MODEL",
                     help="base model: builtin:digits (default), builtin:digits-unet (compute-bound U-Net), builtin:"
                          "digits-reflow (few-step student; all cached on first use), an ngrpo model folder; builtin:"
                          "words or a WordsPipeline folder: text rendering, proxy ocr, gold ocr_tesseract (Tesseract)")
    cmp.add_argument("--workers", type=int, default=1,
                     help="runs in parallel, each in its own single-thread process (1: in this process, one thread); "
                          "the numbers do not depend on it")
    cmp.add_argument("--throughput-iters", type=int, default=6,
                     help="after the runs: timed iterations per method and worker of the interleaved s/iter "
                          "measurement that wall-clock to target uses (0 skips it: the runs' own s/iter)")
    cmp.add_argument("--throughput-warmup", type=int, default=1, help="untimed iterations per method and worker first")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (paired across methods)")
    cmp.add_argument("--evals-per-run", type=int, default=24,
                     help="held-out evaluations per run, at the same forward-equivalent points for every method")
    cmp.add_argument("--eval-samples", type=int, default=32, help="held-out samples per prompt")
    cmp.add_argument("--frozen-target", metavar="RESULTS_JSON",
                     help="report against the gold target frozen in an earlier results JSON (and a recomputed one)")
    cmp.add_argument("--equal-steps", type=int, metavar="N", help="instead: every method with N rollout steps")
    cmp.add_argument("--ablation", choices=["sigma", "anchors", "p", "solver", "tau", "ref_beta", "distance", "clip", "steps",
                                              "reward_normalization"],
                     help="instead: Neighbor GRPO's variants of one knob, paired against the first")
    cmp.add_argument("--device", help="default: cuda when available, else cpu")
    cmp.add_argument("--overwrite", action="store_true", help="replace existing results (the JSON, .md and plots)")
    cmp.add_argument("--resume", action="store_true",
                     help="continue an interrupted comparison from its OUT.partial.json with the same arguments: "
                          "finished runs whose saved weights are intact are reused (runs are deterministic), the "
                          "rest run")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.set_defaults(func=_cmd_compare)

    pln = sub.add_parser("plan", help="predict peak GPU memory, FLOPs by phase and s/iter of a config (and of every "
                                      "baseline) without weights or a GPU; exit 3 if it does not fit")
    pln.add_argument("config", nargs="?", help="YAML config file (optional)")
    pln.add_argument("overrides", nargs="*", help="key=value overrides; model.path=arch:flux-dev (flux-schnell, "
                     "sd35-medium, sd35-large) or a local diffusers folder (config.json files only)")
    pln.add_argument("--gpus", type=int, default=1, help="processes/GPUs (default 1)")
    pln.add_argument("--gpu", default="h100-80gb", help="h100-80gb (default), h200, a100-80gb, a100-40gb, b200, ...")
    pln.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for s/iter (default 0.4)")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON")
    pln.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    pln.set_defaults(func=_cmd_plan)

    add_serve_reward_command(sub)

    cfg = sub.add_parser("config", help="print the reference of every config key (markdown)")
    cfg.set_defaults(func=_cmd_config)
    return parser


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """argparse, except that key=value overrides may also come after options (`ngrpo train c.yaml --out r lr=1`):
    argparse stops a positional list at the first option and would refuse the overrides that follow it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # argparse's own one-line error for what it does not recognise
    return args


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
            args = parse_command_line(argv)
            command = args.command
            code = args.func(args)
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
    return code or 0  # a command's own exit status (`ngrpo plan`: 3 when the run does not fit)


if __name__ == "__main__":
    sys.exit(main())
