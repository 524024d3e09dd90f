"""benchmarks/gpu_check.py on a CPU with --tiny (a tiny random FLUX): the JSON has every field with finite positive
numbers, MFU per phase is the counted FLOPs over the measured seconds, the time budget cuts iterations and runs and
says so, and the carried wheel is installed with pip --no-deps."""

import base64
import hashlib
import importlib.util
import json
import math
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
RUNS = {"neighbor_grpo/lora", "dance_grpo/lora", "neighbor_grpo/full", "dance_grpo/full"}
POSITIVE = ("s_per_iter", "rollout_images_per_s", "train_samples_per_s", "peak_memory_allocated_gb", "mfu",
            "mfu_rollout", "mfu_train", "achieved_tflops", "achieved_tflops_rollout", "achieved_tflops_train",
            "rollout_s", "train_s", "forward_equivalents", "model_flops_per_iter")
# Tiny settings: G candidates, Neighbor GRPO N steps (B 4 anchors, K = N/2 trained steps), DanceGRPO N_D steps.
G, N, N_D, PEAK_TFLOPS = 4, 4, 6, 0.5
TINY = ["--tiny", "--device", "cpu", "--group-size", str(G), "--set", f"neighbor_grpo.rollout_steps={N}",
        "--set", f"dance_grpo.rollout_steps={N_D}"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def result(gpu_check, tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    returned = gpu_check.main([*TINY, "--iters", "1", "--peak-tflops", str(PEAK_TFLOPS), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["runs"].keys() == returned["runs"].keys()
    return written


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_field_is_there_and_positive(result):
    assert result["complete"] is True
    env = result["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["diffusers"] and env["transformers"] and env["peft"]
    assert env["command"][0] == "benchmarks/gpu_check.py" and "--tiny" in env["command"]
    assert env["install"]["action"].startswith("none")  # diffusers imports here: nothing installed
    assert result["settings"]["group_size"] == G and result["settings"]["prompts_per_iteration"] == 1
    flops = result["flops"]
    assert finite_positive(flops["forward_per_sample"]) and finite_positive(flops["transformer_parameters"])
    assert flops["peak_tflops_bf16_dense"] == PEAK_TFLOPS
    assert set(result["runs"]) == RUNS
    for label, entry in result["runs"].items():
        assert entry["status"] == "measured", (label, entry.get("reason"))
        measured = entry["measured"]
        for key in POSITIVE:
            assert finite_positive(measured[key]), (label, key, measured[key])
        assert measured["peak_memory_reserved_gb"] is None  # no caching allocator on a CPU
        assert measured["iterations_timed"] == 1 and measured["warmup_iterations"] == 1  # CPU: memory in the warm-up
        assert not measured["cut_by_budget"] and not measured["measured_on_warmup"]
        predicted = entry["predicted"]  # the planner's, for the tiny FLUX's config files
        assert predicted is not None, entry["prediction_note"]
        assert entry["prediction_note"] is None and predicted["fits"] is True
        for key in ("s_per_iter", "peak_memory_gb", "peak_memory_gib", "flops_per_iter"):
            assert finite_positive(predicted[key]), (label, key)
        for key in ("s_per_iter", "peak_memory", *(["velocity_flops"] if predicted["flops_by_phase"] else [])):
            assert finite_positive(entry["measured_over_predicted"][key]), (label, key)
        if predicted["flops_by_phase"]:  # the plan's own method: MFU per phase with the planner's FLOPs too
            phases = predicted["flops_by_phase"]
            rollout = phases["rollout"] + phases["decode"] + phases["reward"]
            assert entry["mfu_from_plan"]["rollout"] == pytest.approx(
                rollout / measured["rollout_s"] / (PEAK_TFLOPS * 1e12))
            assert finite_positive(entry["mfu_from_plan"]["train"])
        else:
            assert entry["mfu_from_plan"] is None
    assert result["budget"]["cut"] is False and result["budget"]["cuts"] == []
    for finetune in ("lora", "full"):
        ratio = result["ratios"][f"dance_over_neighbor_s_per_iter/{finetune}"]
        assert finite_positive(ratio["measured"]) and finite_positive(ratio["predicted"])
    assert set(result["plans"]) == {"lora@1xh100-80gb", "full@1xh100-80gb"}


def test_forwards_follow_the_settings(result):
    runs = result["runs"]
    K = N // 2
    for finetune in ("lora", "full"):
        neighbor, dance = runs[f"neighbor_grpo/{finetune}"]["measured"], runs[f"dance_grpo/{finetune}"]["measured"]
        assert neighbor["forwards"] == {"rollout": G * N, "train_with_grad": 4 * K, "reference": 4 * K,
                                        "other_no_grad": 0}
        assert dance["forwards"] == {"rollout": G * N_D, "train_with_grad": G * int(0.6 * (N_D - 1)),
                                     "reference": 0, "other_no_grad": 0}


def test_mfu_per_phase_is_counted_flops_over_measured_seconds(result):
    per_sample = result["flops"]["forward_per_sample"]
    for label, entry in result["runs"].items():
        m, backward = entry["measured"], 1.0 if label.endswith("lora") else 2.0
        rollout = m["forwards"]["rollout"] * per_sample
        train = ((1 + backward) * m["forwards"]["train_with_grad"] + m["forwards"]["reference"]) * per_sample
        assert m["achieved_tflops_rollout"] == pytest.approx(rollout / m["rollout_s"] / 1e12)
        assert m["achieved_tflops_train"] == pytest.approx(train / m["train_s"] / 1e12)
        assert m["mfu_rollout"] == pytest.approx(m["achieved_tflops_rollout"] / PEAK_TFLOPS)
        assert m["mfu_train"] == pytest.approx(m["achieved_tflops_train"] / PEAK_TFLOPS)
        assert m["model_flops_per_iter"] == pytest.approx(rollout + train)


def test_the_budget_cuts_iterations_and_runs_and_says_so(gpu_check, tmp_path, single_thread):
    out = tmp_path / "cut.json"
    result = gpu_check.main([*TINY, "--finetune", "lora", "--iters", "3", "--budget-s", "0", "--out", str(out)])
    assert json.loads(out.read_text())["complete"] is True
    first, second = result["runs"]["neighbor_grpo/lora"], result["runs"]["dance_grpo/lora"]
    # the check's first iteration always runs; nothing after it fits in a budget of 0 s
    assert first["status"] == "measured" and first["measured"]["cut_by_budget"] is True
    assert first["measured"]["iterations_timed"] == 1 and first["measured"]["measured_on_warmup"] is True
    assert finite_positive(first["measured"]["s_per_iter"])
    assert second["status"] == "skipped" and second["reason"].startswith("time budget")
    assert second["measured"] is None
    assert result["budget"]["cut"] is True
    assert any("neighbor_grpo/lora iteration 2 of 4" in cut for cut in result["budget"]["cuts"])
    assert any("dance_grpo/lora (not started)" in cut for cut in result["budget"]["cuts"])


def probe_wheel(folder: Path, name: str = "ngrpo_probe_wheel") -> Path:
    """A minimal pure-Python wheel (one module) pip can install offline."""
    files = {f"{name}/__init__.py": b"VALUE = 7\n",
             f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
             f"{name}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for path, data in files.items()]
    files[f"{name}-0.1.dist-info/RECORD"] = ("\n".join(record + [f"{name}-0.1.dist-info/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def test_a_carried_wheel_is_installed_with_pip_no_deps(gpu_check, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    probe_wheel(wheels)
    target = str(tmp_path / "site")
    try:
        done = gpu_check.ensure_module("ngrpo_probe_wheel", str(wheels), target)  # a folder holding the wheel
        assert done["action"] == "pip install --no-deps --no-index" and done["wheel"].endswith(".whl")
        assert importlib.import_module("ngrpo_probe_wheel").VALUE == 7
        assert gpu_check.ensure_module("ngrpo_probe_wheel", str(wheels), target)["action"].startswith("none")
    finally:
        sys.modules.pop("ngrpo_probe_wheel", None)
        if target in sys.path:
            sys.path.remove(target)


def test_a_missing_module_without_a_usable_wheel_is_a_clear_error(gpu_check, tmp_path):
    with pytest.raises(SystemExit, match="pass --wheel PATH"):
        gpu_check.ensure_module("ngrpo_not_installed_anywhere", None)
    with pytest.raises(SystemExit, match=r"--wheel .*no such \.whl file"):
        gpu_check.ensure_module("ngrpo_not_installed_anywhere", str(tmp_path / "missing.whl"))
    with pytest.raises(SystemExit, match="expected exactly one"):
        gpu_check.ensure_module("ngrpo_not_installed_anywhere", str(tmp_path))


def plan_of(method: str, seconds: float, peak_gib: float, fits: bool, dance_peak_gib: float = 5.0) -> dict:
    """A plan in the shape neighbor_grpo.plan.planner.plan returns (the fields the check reads)."""
    return {"algorithm": method, "seconds_per_iteration": seconds, "memory_gib": {"total": peak_gib, "weights": 1.0},
            "fits": fits, "flops_total_per_gpu": 3e12, "flops_per_gpu": {"rollout": 2e12, "train": 1e12, "decode": 1e9},
            "gpu_memory_gib": 139.8, "margin": 1.1, "allowance_gib": 2.0,
            "baselines": [{"method": "dance_grpo", "seconds_per_iteration": 4 * seconds, "peak_gib": dance_peak_gib,
                           "fits": dance_peak_gib < 100, "flops_per_gpu": 12e12}]}


def test_the_prediction_of_each_method_comes_from_the_plan_or_its_baselines(gpu_check):
    from gpu_check_plan import comparison, prediction_summary

    plan = plan_of("neighbor_grpo", 2.0, 30.0, True, dance_peak_gib=31.0)
    ours, dance = prediction_summary(plan, "neighbor_grpo", "lora@1xh200"), prediction_summary(plan, "dance_grpo", "k")
    assert ours["s_per_iter"] == 2.0 and ours["flops_by_phase"]["rollout"] == 2e12 and ours["fits"] is True
    assert ours["peak_memory_gb"] == pytest.approx(30.0 * 2**30 / 1e9)
    assert dance["s_per_iter"] == 8.0 and dance["peak_memory_gib"] == 31.0 and dance["flops_by_phase"] is None
    assert prediction_summary(plan, "mix_grpo", "k") is None and prediction_summary(None, "dance_grpo", "k") is None
    measured = {"s_per_iter": 3.0, "peak_memory_allocated_gb": ours["peak_memory_gb"] / 2,
                "velocity_flops_executed": 1.5e12}
    assert comparison(measured, ours) == pytest.approx({"s_per_iter": 1.5, "peak_memory": 0.5, "velocity_flops": 0.5})


def test_full_finetune_runs_only_where_predicted_to_fit(gpu_check):
    from gpu_check_plan import full_finetune_gate

    args = SimpleNamespace(force_full=False, gpus=1)
    fits = plan_of("neighbor_grpo", 9.0, 70.0, True)
    too_big = plan_of("neighbor_grpo", 9.0, 131.5, False)
    assert full_finetune_gate(fits, "neighbor_grpo", args, cuda=True) is None
    reason = full_finetune_gate(too_big, "neighbor_grpo", args, cuda=True)
    assert "does not fit" in reason and "131.5 GiB x 1.1 + 2.0 GiB allowance > 139.8 GiB" in reason
    assert full_finetune_gate(too_big, "dance_grpo", args, cuda=True) is None  # its baselines row: 5 GiB fits
    assert "--force-full" in full_finetune_gate(None, "neighbor_grpo", args, cuda=True)
    assert full_finetune_gate(None, "neighbor_grpo", args, cuda=False) is None  # the tiny CPU model
    assert full_finetune_gate(too_big, "neighbor_grpo", SimpleNamespace(force_full=True, gpus=1), cuda=True) is None


def test_flux_dev_needs_a_gpu(gpu_check, capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    assert "use --tiny" in capsys.readouterr().err


def test_predictions_from_a_file_decide_the_full_fine_tune(gpu_check, tmp_path, single_thread):
    """A --predictions file (as --predict-only writes it) is used as it is: a full fine-tune predicted not to fit
    is skipped with the predicted peak; the LoRA run carries its prediction beside its measurement."""
    lora, too_big = plan_of("neighbor_grpo", 0.25, 0.5, True), plan_of("neighbor_grpo", 0.5, 197.0, False)
    saved = tmp_path / "predictions.json"
    saved.write_text(json.dumps({"predictions": {"lora@1xh200": [lora, None], "full@1xh200": [too_big, None]}}))
    out = tmp_path / "with_predictions.json"
    result = gpu_check.main([*TINY, "--methods", "neighbor_grpo", "--iters", "1", "--plan-gpu", "h200",
                             "--predictions", str(saved), "--out", str(out)])
    run, full = result["runs"]["neighbor_grpo/lora"], result["runs"]["neighbor_grpo/full"]
    assert run["status"] == "measured" and run["predicted"]["s_per_iter"] == 0.25
    assert run["predicted"]["peak_memory_gib"] == 0.5 and result["plans"]["lora@1xh200"] == lora
    ratio = run["measured_over_predicted"]
    assert ratio["s_per_iter"] == pytest.approx(run["measured"]["s_per_iter"] / 0.25)
    assert ratio["velocity_flops"] == pytest.approx(run["measured"]["velocity_flops_executed"] / 3e12)
    assert full["status"] == "skipped" and "does not fit" in full["reason"] and "197.0 GiB" in full["reason"]
    assert full["measured"] is None and full["predicted"]["fits"] is False
    assert result["settings"]["planner"]["predictions_file"] == str(saved)


def test_predict_only_writes_what_predictions_reads(gpu_check, tmp_path, single_thread):
    saved = tmp_path / "predictions.json"
    written = gpu_check.main([*TINY, "--predict-only", "--finetune", "lora", "--plan-gpu", "h100-80gb", "h200",
                              "--out", str(saved)])
    plans = json.loads(saved.read_text())["predictions"]
    assert plans == json.loads(json.dumps(written["predictions"]))
    assert set(plans) == {"lora@1xh100-80gb", "lora@1xh200"}
    for plan, note in plans.values():
        assert note is None and plan["algorithm"] == "neighbor_grpo" and plan["finetune"] == "lora"
        assert plan["model"].startswith(tempfile.gettempdir()) and plan["resolution"] == 32  # the tiny FLUX's folder
    assert plans["lora@1xh200"][0]["gpu_memory_gib"] > plans["lora@1xh100-80gb"][0]["gpu_memory_gib"]
    result = gpu_check.main([*TINY, "--methods", "neighbor_grpo", "--finetune", "lora", "--iters", "1",
                             "--plan-gpu", "h200", "--predictions", str(saved), "--out", str(tmp_path / "r.json")])
    assert result["plans"]["lora@1xh200"] == plans["lora@1xh200"][0]
    assert result["runs"]["neighbor_grpo/lora"]["predicted"]["s_per_iter"] == plans["lora@1xh200"][0]["seconds_per_iteration"]


def test_background_predictions_wait_then_answer_like_inline_ones(gpu_check):
    from gpu_check_plan import Predictions, predict, prediction_config

    from neighbor_grpo.config.train_config import load_config

    # an unknown GPU makes plan() fail at once: the answer (None and why) must come back from the spawned process
    config = prediction_config(load_config(None, ["algorithm=neighbor_grpo"]), "builtin:digits", 16, 16, cuda=False)
    job = ("lora@1xno-such-gpu", config, 1, "no-such-gpu")
    background = Predictions([job], 0.4, background=True)
    try:
        prediction, note = background.get(job[0], timeout=0.0)  # the spawned planner cannot have answered yet
        assert prediction is None and "had not finished" in note and "--predict-only" in note
        answer = background.get(job[0], timeout=120.0)
        assert answer == predict(config, 1, "no-such-gpu", 0.4)
        assert answer[0] is None and "unknown 'no-such-gpu'" in answer[1]
    finally:
        background.close()
    assert background.process is None
