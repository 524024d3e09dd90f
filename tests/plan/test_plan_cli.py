"""`ngrpo plan`: its JSON, the exit status 3 with the options that would fit, one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neighbor_grpo.cli import main
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.plan import planner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_planner_memory import build_small_flux  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOP_KEYS = {"model", "gpu", "gpus", "mfu", "gpu_peak_tflops", "allowance_gib", "margin", "resolution", "finetune",
            "algorithm", "prompts_per_gpu", "samples_per_gpu", "phases", "flops_per_gpu", "flops_total_per_gpu",
            "flops_all_gpus", "forward_equivalents_per_sample", "seconds_per_iteration", "memory_gib",
            "trainable_parameters", "fits", "gpu_memory_gib", "baselines", "fit_options", "unknown_rewards", "frames"}
MEMORY_KEYS = {"weights", "gradients", "optimizer_state", "ema", "reference_copy", "algorithm_networks",
               "ddp_buckets", "trajectories", "text_encoders", "prompt_cache", "vae", "rewards", "activations_peak",
               "peak_phase", "total"}


@pytest.fixture(scope="module")
def small_flux(tmp_path_factory):
    return build_small_flux(tmp_path_factory.mktemp("plan_cli") / "flux")


def run_args(folder) -> list[str]:
    return [f"model.path={folder}", "model.height=128", "model.width=128", "model.max_sequence_length=64",
            "prompts_per_iteration=2", "prompts.train=[a cat, a dog]", "prompts.eval=[a cat]",
            "neighbor_grpo.group_size=4", "neighbor_grpo.rollout_steps=2", "rewards=[{name: pickscore}]"]


def test_json_end_to_end(small_flux):
    """The installed entry point, as a user runs it: the JSON's schema and its arithmetic."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "neighbor_grpo.cli", "plan", *run_args(small_flux), "--gpus", "2",
                           "--gpu", "h200", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == TOP_KEYS
    assert set(result["memory_gib"]) == MEMORY_KEYS
    assert result["gpus"] == 2 and result["gpu"] == "h200" and result["prompts_per_gpu"] == 1
    assert sum(result["flops_per_gpu"].values()) == pytest.approx(result["flops_total_per_gpu"], rel=1e-12)
    assert result["flops_all_gpus"] == pytest.approx(2 * result["flops_total_per_gpu"])
    parts = sum(v for k, v in result["memory_gib"].items() if k not in ("peak_phase", "total"))
    assert parts == pytest.approx(result["memory_gib"]["total"], rel=1e-9)
    assert result["seconds_per_iteration"] == pytest.approx(
        result["flops_total_per_gpu"] / (result["gpu_peak_tflops"] * 1e12 * result["mfu"]))
    assert result["flops_per_gpu"]["reward"] > 0 and result["memory_gib"]["rewards"] > 0  # pickscore's estimate
    methods = {row["method"]: row for row in result["baselines"]}
    assert methods["neighbor_grpo"]["cost_ratio_vs_neighbor_grpo"] == pytest.approx(1.0)
    assert methods["dance_grpo"]["cost_ratio_vs_neighbor_grpo"] > 1.0  # 25 SDE steps against 8 ODE steps
    assert "ngrpo plan: tracing" in done.stderr  # progress on stderr, never in the JSON


def test_exit_3_lists_the_options_that_fit(small_flux, monkeypatch, capsys):
    """On a card just too small (a test entry in the GPU table), the plan exits 3, and each option it lists fits
    when planned on its own."""
    monkeypatch.setitem(planner.GPUS, "test-2.2gib", (2.2, "h100"))
    args = ["plan", *run_args(small_flux), "rewards=[{name: jpeg_compressibility}]"]
    flags = ["--gpu", "test-2.2gib", "--quiet"]
    assert main([*args, *flags]) == 3
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "options that would (each alone):" in out
    assert main([*args, *flags, "--json"]) == 3
    result = json.loads(capsys.readouterr().out)
    assert not result["fits"] and result["fit_options"]
    labels = {o["option"] for o in result["fit_options"]}
    assert "gradient checkpointing" in labels
    for option in result["fit_options"]:
        assert option["peak_gib"] * planner.MARGIN + result["allowance_gib"] <= result["gpu_memory_gib"]
        assert option["peak_gib"] < result["memory_gib"]["total"]
    checkpointed = next(o for o in result["fit_options"] if o["option"] == "gradient checkpointing")
    assert main([*args, *checkpointed["overrides"], *flags]) == 0


@pytest.mark.parametrize("extra,message", [
    (["--gpu", "x100"], "--gpu: unknown 'x100'; choose from h100-80gb"),
    (["--gpus", "0"], "--gpus: expected an integer >= 1, got 0"),
    (["--mfu", "1.5"], "--mfu: expected a share in (0, 1], got 1.5"),
    (["model.path=arch:flux-pro"], "model.path: unknown architecture 'flux-pro'; choose from arch:flux-dev"),
    (["model.path=/nowhere"], "model.path: '/nowhere' is not a model the planner can read"),
    (["speed.micro_batch=zero"], "speed.micro_batch"),
    # issue 22 item 4: more GPUs than candidates planned 1 sample per GPU and every baseline at 1.00x
    (["--gpus", "500"], "--gpus 500: prompts_per_iteration: 8 prompts x neighbor_grpo.group_size=12 candidates cannot "
                        "be split over 500 processes"),
    (["--gpus", "100000000"], "cannot be split over 100000000 processes"),
])
def test_bad_input_is_one_line(extra, message, capsys):
    assert main(["plan", "model.path=arch:flux-dev", *extra, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ngrpo plan: error: ") and message in err and "\n" not in err


def test_old_torch_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(planner.torch, "__version__", "2.5.1+cpu")
    assert main(["plan", "model.path=arch:flux-dev", "--quiet"]) == 1
    assert "ngrpo plan needs torch >= 2.6" in capsys.readouterr().err


def test_every_option_at_once_is_offered_where_no_single_one_fits(small_flux, monkeypatch, capsys):
    """On a card that no single option makes room on, the plan lists all of them together (checkpointing, micro-
    batches and rollout chunks of one prompt, offloads...) when that fits, and that combination does fit."""
    args = ["plan", *run_args(small_flux), "rewards=[{name: jpeg_compressibility}]"]
    monkeypatch.setitem(planner.GPUS, "test-big", (80.0, "h100"))
    assert main([*args, "--gpu", "test-big", "--quiet", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    singles = []
    for label, overrides, gpus in planner.fit_candidates(load_config(None, run_args(small_flux)), 1, True):
        if gpus == 1 and label != "LoRA":
            assert main([*args, *overrides, "--gpu", "test-big", "--quiet", "--json"]) == 0
            singles.append(json.loads(capsys.readouterr().out)["memory_gib"]["total"])
    every = [o for label, group, n in planner.fit_candidates(load_config(None, run_args(small_flux)), 1, True)
             if n == 1 and label != "LoRA" for o in group]
    assert main([*args, *every, "--gpu", "test-big", "--quiet", "--json"]) == 0
    combined = json.loads(capsys.readouterr().out)["memory_gib"]["total"]
    assert combined < min(singles) < base["memory_gib"]["total"]
    room = (combined + min(singles)) / 2  # between the combination and the best single option
    monkeypatch.setitem(planner.GPUS, "test-tight", (room * planner.MARGIN + base["allowance_gib"], "h100"))
    assert main([*args, "--gpu", "test-tight", "--quiet", "--json"]) == 3
    options = json.loads(capsys.readouterr().out)["fit_options"]
    together = [o for o in options if o["option"].startswith("all of: ")]
    assert len(together) == 1 and together[0]["gpus"] == 1
    assert together[0]["peak_gib"] == pytest.approx(combined, rel=0.05)
    assert all(o["gpus"] > 1 or o is together[0] or "not supported" in o["option"] for o in options)


def test_a_baseline_the_trainer_would_refuse_on_these_gpus_is_an_error_row_not_a_cost(builtin_models, capsys):
    assert main(["plan", "prompts_per_iteration=1", "neighbor_grpo.group_size=24", "--gpus", "16", "--json",
                 "--quiet"]) == 0
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["baselines"]}
    refused = {m for m, row in rows.items() if "error" in row}
    assert {"flow_grpo", "dance_grpo"} <= refused and "neighbor_grpo" not in refused  # their groups < 16 GPUs
    assert all("cannot be split over 16 processes" in rows[m]["error"] for m in refused)


@pytest.mark.parametrize("args, words", [
    # issue 22 item 3: these allocated 25.6 PB on the CPU, or traced for minutes
    (["prompts_per_iteration=100000000", "neighbor_grpo.group_size=1000000"], "stored trajectories 429,153,442.4 GiB"),
    (["model.path=arch:flux-dev", "model.height=16384", "model.width=16384"], "one sample's saved block inputs 342.0 GiB"),
])
def test_a_size_no_gpu_holds_is_exit_3_from_shapes_before_any_trace(builtin_models, capsys, monkeypatch, args, words):
    traced = []
    monkeypatch.setattr(planner.Tracer, "call", lambda *a, **k: traced.append(a) or pytest.fail("traced"))
    assert main(["plan", *args, "--quiet"]) == 3
    out = capsys.readouterr().out.strip()
    assert "does not fit before any trace" in out and words in out and "\n" not in out and not traced
    assert main(["plan", *args, "--quiet", "--json"]) == 3
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is False and result["lower_bound_gib"]["stored trajectories"] > 0


def test_the_shape_bound_stays_below_a_plan_that_fits(small_flux):
    from neighbor_grpo.plan.bounds import shape_lower_bound

    config = load_config(None, run_args(small_flux))
    tracer = planner.Tracer(planner.resolve_model(config.model.path, {}))
    result = planner.plan(config, tracer=tracer)
    latent = tracer.traced_model(config).adapter.latent_shape()
    bound = shape_lower_bound(config.algorithm, config.algorithm_config.rollout_steps, result["samples_per_gpu"],
                              latent, 128, 128, json.loads((small_flux / "transformer" / "config.json").read_text()), 2)
    assert bound["stored trajectories"] == pytest.approx(result["memory_gib"]["trajectories"] * planner.GIB)
    assert max(bound["decoded images"], bound["one sample's saved block inputs"]) / planner.GIB \
        <= result["memory_gib"]["activations_peak"]
