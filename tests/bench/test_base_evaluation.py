"""The base model's held-out evaluation and distance probe are computed once per process and shared by every run
of `ngrpo compare` with the same base and evaluation (bench/method_run.py): for every method of the harness, a run
that reads the shared evaluation gives exactly (bitwise) the run it gives when it computes its own, on the tiny
built-in model (full fine-tuning) and on a tiny random words pipeline (LoRA)."""

import dataclasses
import os

import pytest

from neighbor_grpo.bench import method_run, rules
from neighbor_grpo.bench.method_run import load_rewards, run_method
from neighbor_grpo.bench.settings import PAPER_SETTINGS

pytestmark = pytest.mark.usefixtures("single_thread")
HARNESS = ["neighbor_grpo", "neighbor_grpo_defaults", "neighbor_grpo_x0", "flow_grpo", "flow_grpo_cps", "grpo_guard",
           "dance_grpo", "mix_grpo", "mix_grpo_flash", "diffusion_nft", "awm", "dgpo"]


def _untimed(run: dict) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "train_s"} for record in run["curve"]]


@pytest.fixture
def empty_cache(monkeypatch):
    cache: dict = {}
    monkeypatch.setattr(method_run, "_BASE_EVALUATIONS", cache)
    return cache


def _neighbor_iterations(count: int) -> float:
    """The forward-equivalents of `count` Neighbor GRPO iterations at the test's 2 prompts."""
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.cost import config_schedule, schedule_forward_equivalents

    config = load_config(None, ["device=cpu", "prompts_per_iteration=2", *PAPER_SETTINGS["neighbor_grpo"]])
    return count * schedule_forward_equivalents(config_schedule(config), config.optim.finetune)


def _digits_context(share: bool, budget: float = 1.0) -> dict:
    from neighbor_grpo.builtin.pretrain import ensure_base_model

    return {"budget_fe": budget, "points": rules.evaluation_points(budget, 3), "base_path": str(ensure_base_model()),
            "device": "cpu", "eval_prompts": ["3", "7"], "eval_samples": 2,
            "common": ["device=cpu", "prompts_per_iteration=2"], "share_base_evaluation": share}


@pytest.mark.parametrize("gold_at, methods", [("all", HARNESS), ("final", ["neighbor_grpo", "flow_grpo"])])
def test_every_method_gives_the_same_run_from_another_methods_base_evaluation(builtin_models, empty_cache, gold_at,
                                                                              methods):
    proxy, gold = load_rewards("cpu")
    budget = 1.0 if gold_at == "all" else _neighbor_iterations(3)  # "final": 3 evaluations after the base's
    shared, own = _digits_context(True, budget), _digits_context(False, budget)
    for method in methods:  # the first computes the shared evaluation, every later method reads it
        spec = {"overrides": PAPER_SETTINGS[method], "lr": 3e-4, "seed": 0, "gold_at": gold_at}
        alone = run_method(spec, own, proxy, gold)
        assert alone["curve"][0]["fe"] == 0 and alone["curve"][0]["distance"] == 0.0
        assert _untimed(run_method(spec, shared, proxy, gold)) == _untimed(alone), method
        assert len(empty_cache) == 1  # the key holds what the base evaluation depends on, nothing a method sets
        if gold_at == "final" and method == "neighbor_grpo":
            assert len(alone["curve"]) == 4 and alone["curve"][0]["gold"] is None  # unscored, as without sharing


def test_a_cached_record_is_never_changed_by_a_run(builtin_models, empty_cache):
    proxy, gold = load_rewards("cpu")
    context = _digits_context(True)
    spec = {"overrides": PAPER_SETTINGS["neighbor_grpo"], "lr": 3e-4, "seed": 0, "gold_at": "final"}
    first = run_method(spec, context, proxy, gold)
    first["curve"][0]["proxy"] = -1.0
    (entry,) = empty_cache.values()
    assert entry["scores"]["proxy"] != -1.0
    scored = run_method({**spec, "gold_at": "all"}, context, proxy, gold)
    assert scored["curve"][0]["gold"] is not None and entry["scores"]["gold"] is None


def test_another_evaluation_or_a_rebuilt_base_is_another_entry(builtin_models, empty_cache, tmp_path):
    import shutil

    proxy, gold = load_rewards("cpu")
    context = _digits_context(True)
    spec = {"overrides": PAPER_SETTINGS["neighbor_grpo"], "lr": 3e-4, "seed": 0}
    run_method(spec, context, proxy, gold)
    run_method(spec, {**context, "eval_samples": 3}, proxy, gold)
    copy = tmp_path / "base"
    shutil.copytree(context["base_path"], copy)
    run_method(spec, {**context, "base_path": str(copy)}, proxy, gold)
    assert len(empty_cache) == 3
    weights = max((f for f in copy.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rebuilt in place
    run_method(spec, {**context, "base_path": str(copy)}, proxy, gold)
    assert len(empty_cache) == 4


def test_lora_runs_on_a_words_pipeline_give_the_same_run(words_folder, empty_cache):
    from neighbor_grpo.bench import tasks
    from neighbor_grpo.builtin.words import HELDOUT_PROMPTS, TRAIN_PROMPTS

    task = tasks.TASKS["words"]()
    jpeg = {"name": "jpeg_compressibility"}  # rewards that read something on a random model's samples
    proxy, gold = tasks.load_rewards(dataclasses.replace(task, proxy=jpeg, gold=jpeg), "cpu")
    common = ["device=cpu", *(s if not s.startswith("prompts_per_iteration=") else "prompts_per_iteration=1"
                              for s in task.settings)]
    context = {"budget_fe": 1.0, "points": rules.evaluation_points(1.0, 3), "base_path": str(words_folder),
               "device": "cpu", "task": "words", "eval_prompts": list(HELDOUT_PROMPTS[:2]), "eval_samples": 2,
               "train_prompts": list(TRAIN_PROMPTS[:4]), "common": common, "eval_sampler": ("euler", 4)}
    for method in ["neighbor_grpo", "flow_grpo", "dgpo"]:
        spec = {"overrides": PAPER_SETTINGS[method], "lr": 1e-3, "seed": 0}
        alone = run_method(spec, {**context, "share_base_evaluation": False}, proxy, gold)
        shared = run_method(spec, context, proxy, gold)
        assert _untimed(shared) == _untimed(alone), method
        assert alone["finetune"] == "lora"
    assert len(empty_cache) == 1


def test_a_saved_lora_run_reloads_to_its_last_evaluation(words_folder, empty_cache, tmp_path):
    """The words scripts (gold stability, sample grids) read a run's saved final weights through
    method_run.load_final_model: the LoRA layers come back and draw the last evaluation's images."""
    from neighbor_grpo.bench import tasks
    from neighbor_grpo.bench.method_run import final_model_images
    from neighbor_grpo.builtin.words import HELDOUT_PROMPTS, TRAIN_PROMPTS

    task = tasks.TASKS["words"]()
    jpeg = {"name": "jpeg_compressibility"}
    proxy, gold = tasks.load_rewards(dataclasses.replace(task, proxy=jpeg, gold=jpeg), "cpu")
    prompts = list(HELDOUT_PROMPTS[:2])
    context = {"budget_fe": 1.0, "points": rules.evaluation_points(1.0, 3), "base_path": str(words_folder),
               "device": "cpu", "task": "words", "eval_prompts": prompts, "eval_samples": 2,
               "train_prompts": list(TRAIN_PROMPTS[:4]), "common": ["device=cpu", *task.settings],
               "eval_sampler": ("euler", 4)}
    spec = {"overrides": PAPER_SETTINGS["neighbor_grpo"], "lr": 1e-2, "seed": 0,
            "model_path": str(tmp_path / "final.safetensors")}
    run = run_method(spec, context, proxy, gold)
    flat = [p for p in prompts for _ in range(2)]

    def mean_proxy(weights):
        images = final_model_images(str(words_folder), weights, list(task.settings), prompts, 2, ("euler", 4))
        return float(proxy.total(proxy.score(images.flatten(0, 1), flat)).mean())

    assert mean_proxy(spec["model_path"]) == pytest.approx(run["curve"][-1]["proxy"], abs=1e-6)
    assert mean_proxy(None) == pytest.approx(run["curve"][0]["proxy"], abs=1e-6)
    assert run["curve"][-1]["proxy"] != run["curve"][0]["proxy"]  # the run moved: the LoRA weights were read
