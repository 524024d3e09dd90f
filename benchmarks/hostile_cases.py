"""Hostile input on every `ngrpo` command, replayed as a new user would type it, each outcome classified.

    python benchmarks/hostile_cases.py [--cache DIR] [--only WORD ...] [--timeout 120] [--jobs 1] [--list]

Each case runs the real command in a subprocess (a fresh temporary folder; NGRPO_CACHE a temporary folder too,
unless --cache reuses one; the built-in base model pretrains once there, about a minute) and is classified:

- clear:     the refusal we want: a non-zero exit whose last stderr line is one `PROG: error: ...` (or `ngrpo plan`'s
             exit 3 "does not fit"), no traceback;
- ok:        a case that must succeed, did, and left what it should;
- traceback: a Python traceback, or the "unexpected ... (a bug" line;
- silent:    exit 0 where a refusal was due, or a refusal/success that hides the problem (a misleading result);
- lost:      a file or folder the case protects changed or disappeared;
- hang:      still running at the timeout (killed).

It prints one line per case and the counts; the goal for traceback, silent, lost and hang is 0. The cases are
data (CASES below): a name, the argv after `python -m neighbor_grpo.cli` (or `report` for
`python -m neighbor_grpo.bench.report`), what is expected (error, ok, nofit, interrupt), and optionally a setup
that makes the files, the paths it protects, and a check of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neighbor_grpo"
TINY = ["iterations=2", "prompts_per_iteration=1", "eval.samples_per_prompt=2", "neighbor_grpo.group_size=4",
        "neighbor_grpo.num_anchors=2", "neighbor_grpo.rollout_steps=4", "eval.steps=4", "prompts.eval=['0','1']"]
KINDS = ("clear", "ok", "traceback", "silent", "lost", "hang")


@dataclass
class Case:
    name: str
    argv: list[str]                   # after the program; "{w}" is the case's work folder, "{run}" a finished run, ...
    expect: str = "error"             # error | ok | nofit | interrupt
    setup: Callable[[Path], None] | None = None  # makes files in the work folder before the command
    protect: list[str] = field(default_factory=list)  # paths (with placeholders) that must stay byte for byte
    check: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None  # a problem, or None
    env: dict = field(default_factory=dict)
    program: str = "ngrpo"            # ngrpo | report
    needs: str = ""                   # "run" (a finished run), "flux" (diffusers), "cache" (a pretrained cache)


# ---- setups -------------------------------------------------------------------------------------------------------

def write(path: str, text: str | bytes) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
    return make


def both(*setups) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        for setup in setups:
            setup(work)
    return make


def copy_run(name: str = "r1", extra: dict | None = None) -> Callable[[Path], None]:
    """A copy of the finished run as WORK/name, plus files a user added (`extra`: relative path -> text)."""
    def make(work: Path) -> None:
        shutil.copytree(FIXTURES["run"], work / name)
        for rel, text in (extra or {}).items():
            (work / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / name / rel).write_text(text)
    return make


def edited_flux(component: str, **changes) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        shutil.copytree(FIXTURES["flux"], work / "flux")
        path = work / "flux" / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return make


def flux_without(component: str) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        shutil.copytree(FIXTURES["flux"], work / "flux")
        shutil.rmtree(work / "flux" / component)
    return make


def damaged_checkpoints(work: Path) -> None:
    copy_run()(work)
    for checkpoint in (work / "r1" / "checkpoints").iterdir():
        with open(checkpoint / "model.safetensors", "r+b") as handle:
            handle.seek(-4, 2)
            handle.write(b"\x00\x01\x02\x03")


def tampered_export(work: Path) -> None:
    copy_run()(work)
    with open(work / "r1" / "aligned" / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")


def results_json(target: str | float = 0.5) -> str:
    runs = {m: {"0": {"curve": [{"fe": 0, "iteration": 0, "gold": 0.1, "proxy": 0.1}], "iterations": 1,
                      "fe_per_iter": 10.0, "median_s_per_iter": 1.0}} for m in ("neighbor_grpo", "flow_grpo")}
    return json.dumps({"settings": {"seeds": [0], "budget_fe": 10}, "rules": {"reference_method": "neighbor_grpo"},
                       "runs": runs, "target": {"gold": target}})


def absent(*paths: str) -> Callable[[Path, subprocess.CompletedProcess], str | None]:
    def check(work: Path, done) -> str | None:
        there = [p for p in paths if (work / p).exists() or list(work.glob(f".{Path(p).name}.new-*"))]
        return f"left {there}" if there else None
    return check


def present(*paths: str) -> Callable[[Path, subprocess.CompletedProcess], str | None]:
    def check(work: Path, done) -> str | None:
        missing = [p for p in paths if not (work / p).exists()]
        return f"missing {missing}" if missing else None
    return check


# ---- the cases ----------------------------------------------------------------------------------------------------

CASES = [
    # demo
    Case("demo --out inside the installed package", ["demo", "--out", f"{PACKAGE}/hostile_demo", "iterations=1"],
         check=lambda w, d: "made a folder in the package" if (PACKAGE / "hostile_demo").exists() else None),
    Case("demo --overwrite of a user's folder", ["demo", "--out", "{w}/mine", "--overwrite"],
         setup=write("mine/cat.png", b"\x89PNG"), protect=["mine"]),
    Case("demo iterations=0", ["demo", "--out", "{w}/d", "iterations=0"], check=absent("d")),
    Case("demo --threads 0", ["demo", "--out", "{w}/d", "--threads", "0"], check=absent("d")),
    Case("demo with an unwritable NGRPO_CACHE", ["demo", "--out", "{w}/d"], setup=write("afile", ""),
         env={"NGRPO_CACHE": "{w}/afile/cache"}, check=absent("d")),
    Case("demo --out below /proc", ["demo", "--out", "/proc/ngrpo-demo"]),
    Case("demo with a key without =", ["demo", "--out", "{w}/d", "iterations"], check=absent("d")),
    # pretrain
    Case("pretrain --steps -1", ["pretrain", "--steps", "-1"]),
    Case("pretrain --label-noise 1.5", ["pretrain", "--label-noise", "1.5"]),
    Case("pretrain --out a user's folder --overwrite", ["pretrain", "--out", "{w}/mine", "--overwrite"],
         setup=write("mine/notes.txt", "mine"), protect=["mine"], needs="cache"),
    Case("pretrain --out a file", ["pretrain", "--out", "{w}/afile"], setup=write("afile", "x"), protect=["afile"],
         needs="cache"),
    Case("pretrain with NGRPO_CACHE below a file", ["pretrain"], setup=write("afile", ""),
         env={"NGRPO_CACHE": "{w}/afile/cache"}),
    Case("pretrain --classifier-epochs -3", ["pretrain", "--classifier-epochs", "-3"]),
    # train: config
    Case("train a key without =", ["train", "optim.lr", "--out", "{w}/r"], check=absent("r")),
    Case("train an unknown key", ["train", "optim.lrr=1", "--out", "{w}/r"]),
    Case("train optim.lr=nan", ["train", "optim.lr=.nan", "--out", "{w}/r"], check=absent("r")),
    Case("train iterations=1e9 (a string in YAML)", ["train", "iterations=1e9", "--out", "{w}/r"]),
    Case("train prompts_per_iteration=-1", ["train", "prompts_per_iteration=-1", "--out", "{w}/r"]),
    Case("train a YAML file with a key twice", ["train", "{w}/dup.yaml", "--out", "{w}/r"],
         setup=write("dup.yaml", "optim:\n  lr: 1.0e-4\n  lr: 3.0e-4\n")),
    Case("train a folder as the config file", ["train", "{w}/folder", "--out", "{w}/r"], setup=write("folder/x", "")),
    Case("train a config file that is not UTF-8", ["train", "{w}/latin.yaml", "--out", "{w}/r"],
         setup=write("latin.yaml", b"seed: 1 # caf\xe9\n")),
    Case("train a YAML list as the config", ["train", "{w}/list.yaml", "--out", "{w}/r"],
         setup=write("list.yaml", "- 1\n- 2\n")),
    Case("train checkpoint_every=0", ["train", "checkpoint_every=0", "--out", "{w}/r"]),
    Case("train optim.lora_targets=[]", ["train", "optim.finetune=lora", "optim.lora_targets=[]", "--out", "{w}/r"]),
    Case("train awm.advantage_max=1e30", ["train", "algorithm=awm", "awm.advantage_max=1e30", "--out", "{w}/r"]),
    Case("train dance_grpo.eta=1e6", ["train", "algorithm=dance_grpo", "dance_grpo.eta=1e6", "--out", "{w}/r"]),
    Case("train optim.weight_decay=1e30", ["train", "optim.weight_decay=1e30", "--out", "{w}/r"]),
    Case("train neighbor_grpo.ref_beta=1e30", ["train", "neighbor_grpo.ref_beta=1e30", "--out", "{w}/r"]),
    Case("train device=cuda on a machine without CUDA", ["train", "device=cuda", "--out", "{w}/r"],
         check=absent("r")),
    Case("train rewards=[{name: nope}]", ["train", "rewards=[{name: nope}]", "--out", "{w}/r"], check=absent("r"),
         needs="cache"),
    Case("train eval.seed = seed", ["train", "eval.seed=0", "seed=0", "--out", "{w}/r"]),
    # train: files and folders
    Case("train --out inside the installed package", ["train", *TINY, "--out", f"{PACKAGE}/hostile_run"],
         check=lambda w, d: "made a folder in the package" if (PACKAGE / "hostile_run").exists() else None),
    Case("train --out below /proc", ["train", *TINY, "--out", "/proc/ngrpo-run"]),
    Case("train --out a file", ["train", *TINY, "--out", "{w}/afile"], setup=write("afile", "x"), protect=["afile"]),
    Case("train --overwrite of a run holding a user's NOTES.md and analysis/",
         ["train", *TINY, "--out", "{w}/r1", "--overwrite"],
         setup=copy_run(extra={"NOTES.md": "what I saw", "analysis/plot.py": "..."}), protect=["r1"], needs="run"),
    Case("train --overwrite of a user folder with a copied marker", ["train", *TINY, "--out", "{w}/mine", "--overwrite"],
         setup=both(write("mine/cat.png", b"\x89PNG"), write("mine/.ngrpo-owned.json", '{"kind": "run"}')),
         protect=["mine"]),
    Case("train --overwrite of the working directory", ["train", *TINY, "--out", ".", "--overwrite"]),
    Case("train into a non-empty folder without a flag", ["train", *TINY, "--out", "{w}/r1"], setup=copy_run(),
         protect=["r1"], needs="run"),
    Case("train --resume of a folder that is not a run", ["train", "--resume", "{w}/mine"],
         setup=write("mine/notes.txt", "x"), protect=["mine"]),
    Case("train --resume of a missing folder", ["train", "--resume", "{w}/nope"]),
    Case("train --resume with --overwrite", ["train", "--resume", "{w}/r1", "--overwrite"], setup=copy_run(),
         protect=["r1"], needs="run"),
    Case("train --resume --accept-changes seed=1", ["train", "--resume", "{w}/r1", "--accept-changes", "seed=1"],
         setup=copy_run(), protect=["r1/checkpoints", "r1/aligned", "r1/config.yaml"], needs="run"),
    Case("train --resume with a key twice in --accept-changes",
         ["train", "--resume", "{w}/r1", "--accept-changes", "optim.lr=1e-5", "optim.lr=3e-5"], setup=copy_run(),
         protect=["r1/checkpoints", "r1/aligned", "r1/config.yaml"], needs="run"),
    Case("train --accept-changes without --resume", ["train", *TINY, "--out", "{w}/r", "--accept-changes",
                                                     "optim.lr=1e-5"]),
    Case("train --resume with every checkpoint damaged", ["train", "--resume", "{w}/r1"], setup=damaged_checkpoints,
         protect=["r1/checkpoints", "r1/aligned", "r1/config.yaml"], needs="run"),
    Case("train --resume of a run whose config.yaml was edited", ["train", "--resume", "{w}/r1"],
         setup=both(copy_run(), lambda w: (w / "r1" / "config.yaml").write_text(
             (w / "r1" / "config.yaml").read_text().replace("seed: 0", "seed: 5"))),
         protect=["r1/checkpoints", "r1/aligned"], needs="run"),
    Case("train prompts.eval=[cat] (the model knows digits)", ["train", *TINY, "prompts.eval=[cat]", "--out", "{w}/r"],
         check=absent("r"), needs="cache"),
    Case("train a prompt file with a prompt the model cannot take", ["train", *TINY, "prompts.file={w}/p.txt",
                                                                     "--out", "{w}/r"],
         setup=write("p.txt", "3\nseven\n"), check=absent("r"), needs="cache"),
    Case("train prompts.file missing", ["train", *TINY, "prompts.file={w}/nope.txt", "--out", "{w}/r"],
         check=absent("r")),
    Case("train prompts.file empty", ["train", *TINY, "prompts.file={w}/empty.txt", "--out", "{w}/r"],
         setup=write("empty.txt", ""), check=absent("r"), needs="cache"),
    Case("train model.path missing", ["train", *TINY, "model.path={w}/nope", "--out", "{w}/r"], check=absent("r")),
    Case("train model.path a run folder", ["train", *TINY, "model.path={w}/r1", "--out", "{w}/r"], setup=copy_run(),
         protect=["r1"], check=absent("r"), needs="run"),
    Case("train with an unwritable NGRPO_CACHE", ["train", *TINY, "--out", "{w}/r"], setup=write("afile", ""),
         env={"NGRPO_CACHE": "{w}/afile/cache"}, check=absent("r")),
    Case("train a FLUX folder with a string num_layers", ["train", "model.path={w}/flux", "--out", "{w}/r"],
         setup=edited_flux("transformer", num_layers="1"), check=absent("r"), needs="flux"),
    Case("train a FLUX folder whose VAE does not fit the transformer", ["train", "model.path={w}/flux", "--out", "{w}/r"],
         setup=edited_flux("vae", latent_channels=2), check=absent("r"), needs="flux"),
    Case("train a FLUX folder without a scheduler", ["train", "model.path={w}/flux", "--out", "{w}/r"],
         setup=flux_without("scheduler"), check=absent("r"), needs="flux"),
    Case("train a FLUX folder without a text encoder", ["train", "model.path={w}/flux", "--out", "{w}/r"],
         setup=flux_without("text_encoder_2"), check=absent("r"), needs="flux"),
    Case("train blown up by optim.lr=1e6 without clipping", ["train", *TINY, "algorithm=dgpo", "optim.lr=1e6",
                                                              "optim.max_grad_norm=0", "--out", "{w}/r"],
         check=lambda w, d: "aligned/ written" if (w / "r" / "aligned").exists() else (
             None if "optim.lr=0.0001" in d.stderr else "no advice at most the default lr"), needs="cache"),
    Case("train Ctrl-C during start-up", ["train", *TINY, "--out", "{w}/r"], expect="interrupt", needs="cache"),
    # sample
    Case("sample a missing checkpoint", ["sample", "--checkpoint", "{w}/nope", "--prompt", "3", "--out", "{w}/s.png"]),
    Case("sample a run folder (not a model)", ["sample", "--checkpoint", "{run}", "--prompt", "3", "--out", "{w}/s.png"],
         needs="run"),
    Case("sample --num 0", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3", "--num", "0", "--out",
                            "{w}/s.png"], needs="run"),
    Case("sample --steps 0", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3", "--steps", "0", "--out",
                              "{w}/s.png"], needs="run"),
    Case("sample --prompt cat", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "cat", "--out", "{w}/s.png"],
         needs="run"),
    Case("sample --out an existing file", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3", "--out",
                                           "{w}/s.png"], setup=write("s.png", "mine"), protect=["s.png"], needs="run"),
    Case("sample --out a folder", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3", "--out", "{w}/dir"],
         setup=write("dir/x", "mine"), protect=["dir"], needs="run"),
    Case("sample --out .txt", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3", "--out", "{w}/s.txt"],
         needs="run"),
    Case("sample --shift nan", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3", "--shift", "nan", "--out",
                                "{w}/s.png"], check=absent("s.png"), needs="run"),
    Case("sample an export whose weights changed", ["sample", "--checkpoint", "{w}/r1/aligned", "--prompt", "3",
                                                    "--out", "{w}/s.png"], setup=tampered_export, needs="run"),
    Case("sample --out inside the installed package", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3",
                                                       "--out", f"{PACKAGE}/hostile.png"],
         check=lambda w, d: "wrote into the package" if (PACKAGE / "hostile.png").exists() else None, needs="run"),
    Case("sample a finished run's export", ["sample", "--checkpoint", "{run}/aligned", "--prompt", "3", "--num", "2",
                                            "--out", "{w}/s.png"], expect="ok", check=present("s.png"), needs="run"),
    # eval
    Case("eval --limit 0", ["eval", "--checkpoint", "{run}/aligned", "--limit", "0", "--out", "{w}/e.json"],
         needs="run"),
    Case("eval --samples-per-prompt 1", ["eval", "--checkpoint", "{run}/aligned", "--samples-per-prompt", "1", "--out",
                                         "{w}/e.json"], needs="run"),
    Case("eval --reward nope", ["eval", "--checkpoint", "{run}/aligned", "--reward", "nope", "--out", "{w}/e.json"],
         needs="run"),
    Case("eval --prompts-file missing", ["eval", "--checkpoint", "{run}/aligned", "--prompts-file", "{w}/nope.txt",
                                         "--out", "{w}/e.json"], needs="run"),
    Case("eval --out an existing JSON", ["eval", "--checkpoint", "{run}/aligned", "--out", "{w}/e.json"],
         setup=write("e.json", "{}"), protect=["e.json"], needs="run"),
    Case("eval --config a file that is no config", ["eval", "--checkpoint", "{run}/aligned", "--config", "{w}/x.yaml",
                                                    "--out", "{w}/e.json"], setup=write("x.yaml", "- 1\n"),
         needs="run"),
    Case("eval --steps -1", ["eval", "--checkpoint", "{run}/aligned", "--steps", "-1", "--out", "{w}/e.json"],
         needs="run"),
    # compare
    Case("compare --budget-fe 0", ["compare", "--out", "{w}/c.json", "--budget-fe", "0", "--no-progress"]),
    Case("compare --out r.txt", ["compare", "--out", "{w}/c.txt", "--no-progress"]),
    Case("compare --frozen-target a missing file", ["compare", "--out", "{w}/c.json", "--frozen-target", "{w}/no.json",
                                                    "--no-progress"]),
    Case("compare --frozen-target a file whose target is NaN", ["compare", "--out", "{w}/c.json", "--frozen-target",
                                                                "{w}/old.json", "--no-progress"],
         setup=write("old.json", '{"target": {"gold": NaN}}')),
    Case("compare --out an existing results file", ["compare", "--out", "{w}/c.json", "--no-progress"],
         setup=write("c.json", "{}"), protect=["c.json"]),
    Case("compare --lrs -1", ["compare", "--out", "{w}/c.json", "--lrs", "-1", "--no-progress"]),
    Case("compare --methods nope", ["compare", "--out", "{w}/c.json", "--methods", "neighbor_grpo", "nope",
                                    "--no-progress"]),
    Case("compare --workers 0", ["compare", "--out", "{w}/c.json", "--workers", "0", "--no-progress"]),
    # plan
    Case("plan --gpus 500", ["plan", "--gpus", "500", "--quiet"]),
    Case("plan --gpus 0", ["plan", "--gpus", "0", "--quiet"]),
    Case("plan --mfu 2", ["plan", "--mfu", "2", "--quiet"]),
    Case("plan --gpu x100", ["plan", "--gpu", "x100", "--quiet"]),
    Case("plan a key without =", ["plan", "optim.lr", "--quiet"]),
    Case("plan 10^14 samples", ["plan", "prompts_per_iteration=100000000", "neighbor_grpo.group_size=1000000",
                                "--quiet"], expect="nofit", needs="cache"),
    Case("plan FLUX.1-dev at 16384 px", ["plan", "model.path=arch:flux-dev", "model.height=16384",
                                         "model.width=16384", "--quiet"], expect="nofit"),
    Case("plan a FLUX folder with num_layers 1e9", ["plan", "model.path={w}/flux", "--quiet"],
         setup=edited_flux("transformer", num_layers=1e9), needs="flux"),
    # config
    Case("config with an extra argument", ["config", "extra"]),
    # python -m neighbor_grpo.bench.report
    Case("report a JSON list", ["{w}/list.json", "--out", "{w}/r.json"], program="report",
         setup=write("list.json", "[1, 2]"), check=absent("r.json")),
    Case("report a missing file", ["{w}/nope.json", "--out", "{w}/r.json"], program="report"),
    Case("report --frozen-target nan", ["{w}/c.json", "--out", "{w}/r.json", "--frozen-target", "nan"],
         program="report", setup=write("c.json", results_json()), check=absent("r.json")),
    Case("report --frozen-target a file with an inf target", ["{w}/c.json", "--out", "{w}/r.json", "--frozen-target",
                                                              "{w}/old.json"], program="report",
         setup=both(write("c.json", results_json()), write("old.json", '{"target": {"gold": Infinity}}')),
         check=absent("r.json")),
    Case("report --out an existing file", ["{w}/c.json", "--out", "{w}/r.json"], program="report",
         setup=both(write("c.json", results_json()), write("r.md", "my notes")), protect=["r.md"]),
    Case("report --reference a row that is not there", ["{w}/c.json", "--out", "{w}/r.json", "--reference", "nobody"],
         program="report", setup=write("c.json", results_json()), check=absent("r.json")),
]

FIXTURES: dict[str, Path] = {}


# ---- running and classifying ----------------------------------------------------------------------------------------

def command(case: Case) -> list[str]:
    module = "neighbor_grpo.bench.report" if case.program == "report" else "neighbor_grpo.cli"
    return [sys.executable, "-m", module]


def fill(text: str, work: Path) -> str:
    return text.replace("{w}", str(work)).replace("{run}", str(FIXTURES.get("run", "")))


def snapshot(path: Path) -> dict | None:
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def classify(case: Case, done: subprocess.CompletedProcess | None, work: Path, before: dict) -> tuple[str, str]:
    if done is None:
        return "hang", "killed at the timeout"
    for rel, old in before.items():
        if snapshot(work / rel) != old:
            return "lost", f"{rel} changed or disappeared"
    last = error_line(done.stderr)
    if "Traceback (most recent call last)" in done.stderr or "(a bug: rerun with --debug" in done.stderr:
        return "traceback", last
    problem = case.check(work, done) if case.check else None
    if case.expect == "ok":
        if done.returncode != 0 or problem:
            return "silent", f"expected success: rc {done.returncode}: {problem or last}"
        return "ok", "succeeded"
    if case.expect == "nofit":
        if done.returncode == 3 and "does not fit" in done.stdout and not problem:
            return "clear", done.stdout.strip().splitlines()[-1][:160]
        return "silent", f"expected exit 3 'does not fit': rc {done.returncode}: {problem or last}"
    if case.expect == "interrupt":
        if done.returncode == 130 and "interrupted" in last and not problem:
            return "clear", last
        return "silent", f"expected exit 130 and one line: rc {done.returncode}: {problem or last}"
    if done.returncode == 0:
        return "silent", f"exit 0 where a refusal was due{': ' + problem if problem else ''}"
    if problem:
        return "silent", problem
    if ": error: " not in last:
        return "silent", f"rc {done.returncode} without a one-line error: {last[:160]!r}"
    return "clear", last


def run_case(case: Case, root: Path, env: dict, timeout: float) -> tuple[str, str, float]:
    work = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    if case.setup:
        case.setup(work)
    before = {rel: snapshot(work / rel) for rel in case.protect}  # paths relative to the case's folder
    argv = command(case) + [fill(a, work) for a in case.argv]
    case_env = {**env, **{k: fill(v, work) for k, v in case.env.items()}}
    started = time.perf_counter()
    try:
        if case.expect == "interrupt":  # Ctrl-C a few seconds in, while it imports and starts up
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=case_env,
                                       cwd=work)
            time.sleep(4.0)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=timeout)
            done = subprocess.CompletedProcess(argv, process.returncode, out, err)
        else:
            done = subprocess.run(argv, capture_output=True, text=True, env=case_env, timeout=timeout, cwd=work)
    except subprocess.TimeoutExpired:
        if case.expect == "interrupt":
            process.kill()
            process.communicate()
        done = None
    kind, detail = classify(case, done, work, before)
    return kind, detail, time.perf_counter() - started


def prepare(root: Path, env: dict, needs: set[str]) -> set[str]:
    """The shared fixtures the selected cases need: a pretrained cache, a finished run, a tiny FLUX folder.
    Returns what could not be made (their cases are skipped)."""
    unavailable = set()
    if needs & {"cache", "run"}:
        done = subprocess.run([sys.executable, "-m", "neighbor_grpo.cli", "pretrain", "--no-progress"],
                              capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"pretraining the built-in models failed: {error_line(done.stderr)}")
    if "run" in needs:
        FIXTURES["run"] = root / "finished" / "run"
        done = subprocess.run([sys.executable, "-m", "neighbor_grpo.cli", "train", *TINY, "checkpoint_every=1",
                               "--out", str(FIXTURES["run"]), "--no-progress"], capture_output=True, text=True,
                              env=env, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"the finished run failed: {error_line(done.stderr)}")
    if "flux" in needs:
        try:
            sys.path.insert(0, str(ROOT / "tests" / "models"))
            import tiny_diffusers

            FIXTURES["flux"] = tiny_diffusers.build_flux(root / "finished" / "flux")
        except ImportError:
            unavailable.add("flux")
    return unavailable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="reuse this NGRPO_CACHE (default: a fresh temporary one)")
    parser.add_argument("--only", nargs="+", help="only the cases whose name contains one of these words")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1)")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or any(word in c.name for word in args.only)]
    if args.list:
        for case in cases:
            print(f"{case.name}: {case.program} {' '.join(case.argv)}")
        return
    with tempfile.TemporaryDirectory(prefix="ngrpo-hostile-") as folder:
        root = Path(folder)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "NGRPO_CACHE": os.path.abspath(args.cache) if args.cache else str(root / "cache")}
        needs = {c.needs for c in cases if c.needs}
        started = time.perf_counter()
        unavailable = prepare(root, env, needs | ({"cache"} if "run" in needs else set()))
        counts = dict.fromkeys(KINDS, 0)
        commands = {}
        runnable = [c for c in cases if c.needs not in unavailable]
        for case in cases:
            if case.needs in unavailable:
                print(f"  skipped    {case.name} (needs {case.needs})")
        with ThreadPoolExecutor(args.jobs) as pool:  # each case is its own process: threads only wait on them
            for case, (kind, detail, seconds) in zip(runnable, pool.map(
                    lambda c: run_case(c, root, env, args.timeout), runnable)):
                counts[kind] += 1
                commands[case.program if case.program == "report" else case.argv[0]] = True
                print(f"  {kind:9s}  {case.name} ({seconds:.0f} s): {detail[:220]}", flush=True)
        print(f"\n{sum(counts.values())} cases on {', '.join(commands)} in {time.perf_counter() - started:.0f} s")
        print("  ".join(f"{kind} {counts[kind]}" for kind in KINDS))


if __name__ == "__main__":
    main()
