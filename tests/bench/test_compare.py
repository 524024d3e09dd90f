"""A short real comparison (the full one: benchmarks/compare_algorithms.py) and the CLI's refusals."""

import json

import re

import pytest

from neighbor_grpo.bench import rules as rules
from neighbor_grpo.cli import main
from neighbor_grpo.bench.compare import ABLATIONS, PAPER_SETTINGS, equal_steps_overrides
from neighbor_grpo.bench.settings import AUTHORS_GROUP_SIZE
from neighbor_grpo.config.train_config import load_config

BUDGET = 8000.0


@pytest.fixture(scope="module")
def short_comparison(builtin_models, tmp_path_factory, single_thread):
    from neighbor_grpo.bench.compare import compare

    out = tmp_path_factory.mktemp("compare") / "results.json"
    compare(out, budget_fe=BUDGET, lrs=(1e-4, 3e-4), methods=["neighbor_grpo", "mix_grpo_flash"], seeds=(0, 1),
            evals_per_run=3, eval_samples=2, progress=False, grid=False, throughput_iters=1, throughput_warmup=0)
    return out, json.loads(out.read_text())


def test_results_hold_every_seed_and_the_frozen_rules(short_comparison):
    out, saved = short_comparison
    assert saved["settings"]["backward_factor"] == 2.0 and "b = 2" in saved["settings"]["cost_note"]
    assert saved["rules"]["target_fraction"] == 0.8 and saved["rules"]["final_evaluations"] == 3
    for name in ("neighbor_grpo", "mix_grpo_flash"):
        assert saved["runs"][name].keys() == {"0", "1"}
        selection = saved["selection"][name]
        chosen = selection["chosen_lr"]
        assert chosen in (1e-4, 3e-4) and selection["x3"] is None  # --no-grid: no x3 rule
        aucs = {c["lr"]: c["proxy_auc"] for c in selection["candidates"]}
        assert aucs.keys() == {1e-4, 3e-4} and aucs[chosen] == max(aucs.values())  # on the proxy, never the gold
        assert all(run["lr"] == chosen for run in saved["runs"][name].values())
        assert len(saved["tuning_runs"][name]) == 1 and saved["tuning_runs"][name][0]["lr"] != chosen
    # seeds are different runs
    a, b = (saved["runs"]["neighbor_grpo"][s]["curve"][-1]["proxy"] for s in ("0", "1"))
    assert a != b
    for name in ("curves", "overoptimization"):
        assert (out.parent / f"results_{name}.png").is_file()
    assert "gold target" in (out.parent / "results.md").read_text()
    assert not (out.parent / "results.partial.json").exists()


def test_evaluations_sit_at_the_same_forward_equivalent_points(short_comparison):
    _, saved = short_comparison
    points = rules.evaluation_points(BUDGET, 3)
    assert saved["eval_points"] == pytest.approx(points)
    for by_seed in saved["runs"].values():
        for run in by_seed.values():
            fe = [r["fe"] for r in run["curve"]]
            assert fe[0] == 0.0 and fe[-1] >= BUDGET
            # each point is evaluated at the first iteration boundary at or past it
            for p in points:
                at = min(x for x in fe if x >= p)
                assert at - run["fe_per_iter"] < p


def test_forward_equivalents_per_iteration_follow_the_one_rule(short_comparison):
    _, saved = short_comparison
    c = load_config(None, []).neighbor_grpo
    P, G, N, B, K = 8, c.group_size, c.rollout_steps, c.num_anchors, c.trained_steps
    # rollout P*G*N no-grad + (1 + 2) x trained units; the paper's settings have no reference anchoring (ref_beta 0)
    expected = P * G * N + 3 * K * P * B
    assert saved["methods"]["neighbor_grpo"]["fe_per_iter"] == expected


def test_target_and_finals_are_recomputable_from_the_curves(short_comparison):
    _, saved = short_comparison
    base = saved["base"]["gold"]
    finals = {m: [sum(r["gold"] for r in run["curve"][-3:]) / 3 for run in by_seed.values()]
              for m, by_seed in saved["runs"].items()}
    best_gain = max(sum(v) / len(v) - base for v in finals.values())
    assert saved["target"]["gold"] == pytest.approx(base + 0.8 * best_gain)
    assert saved["target"]["frozen_from_earlier"] is None
    for m, values in finals.items():
        assert saved["methods"][m]["final"]["gold"]["per_seed"] == pytest.approx(values)
    record = saved["runs"]["neighbor_grpo"]["0"]["curve"][-1]
    assert 0.0 <= record["gold"] <= record["gold_class"] <= 1.0 and 0.0 <= record["typical"] <= 1.0
    assert saved["runs"]["neighbor_grpo"]["0"]["curve"][0]["distance"] == 0.0  # the base model is at distance 0
    assert record["distance"] > 0.0


def test_a_later_table_reports_against_the_frozen_target(short_comparison, tmp_path):
    from neighbor_grpo.bench.report import summarize

    out, saved = short_comparison
    frozen = saved["target"]["gold"] + 0.05
    again = summarize(saved, frozen)
    assert again["target"]["gold"] == frozen and again["target"]["recomputed"] == saved["target"]["recomputed"]


def test_an_existing_out_is_refused_before_anything_runs(short_comparison, capsys):
    out, _ = short_comparison
    code = main(["compare", "--out", str(out), "--budget-fe", "100", "--no-progress"])
    assert code == 2 and "exist(s); pass --overwrite to replace" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--budget-fe", "0"], "--budget-fe: expected > 0"),
    (["--seeds", "0", "0"], "--seeds: expected distinct"),
    (["--lrs", "-1"], "--lrs: expected distinct learning rates > 0"),
    (["--evals-per-run", "2"], "--evals-per-run: expected >= 3"),
    (["--methods", "flow_grpo"], "--methods: must include neighbor_grpo"),
    (["--methods", "neighbor_grpo", "sde"], "--methods: unknown ['sde']"),
    (["--frozen-target", "nope.json"], "--frozen-target 'nope.json'"),
    (["--equal-steps", "0"], "--equal-steps: expected >= 1"),
    (["--eval-sampler", "euler:0"], "--eval-sampler: expected"),
    (["--equal-steps", "1", "--methods", "neighbor_grpo", "flow_grpo"], "flow_grpo.rollout_steps: expected an integer >= 2"),
])
def test_bad_values_get_one_line_errors(tmp_path, capsys, argv, words):
    code = main(["compare", "--out", str(tmp_path / "r.json"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def _setting(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _assert_applied(config, overrides: list[str]) -> None:
    """Every `key=value` override is the loaded config's value (numbers compared as numbers)."""
    for override in overrides:
        key, _, text = override.partition("=")
        value = _setting(config, key)
        if isinstance(value, bool):
            assert value == (text.lower() == "true"), override
        elif isinstance(value, (int, float)):
            assert value == pytest.approx(float(text)), override
        else:
            assert str(value) == text, override


def test_every_method_and_ablation_builds_the_config_it_names():
    algorithm_of = {"neighbor_grpo": "neighbor_grpo", "neighbor_grpo_defaults": "neighbor_grpo",
                    "neighbor_grpo_x0": "neighbor_grpo", "flow_grpo": "flow_grpo", "dance_grpo": "dance_grpo",
                    "mix_grpo": "mix_grpo", "mix_grpo_flash": "mix_grpo", "flow_grpo_cps": "flow_grpo",
                    "grpo_guard": "flow_grpo", "diffusion_nft": "diffusion_nft", "awm": "awm",
                    "dgpo": "dgpo", "diffusion_nft_g24": "diffusion_nft", "awm_g24": "awm",
                    "flow_grpo_cps_g18": "flow_grpo", "grpo_guard_g24": "flow_grpo", "dgpo_g24": "dgpo"}
    assert set(PAPER_SETTINGS) == set(algorithm_of)
    for name, overrides in PAPER_SETTINGS.items():
        config = load_config(None, overrides)
        assert config.algorithm == algorithm_of[name]
        assert config.mix_grpo.flash == (name == "mix_grpo_flash")
        _assert_applied(config, overrides)
        short = load_config(None, equal_steps_overrides(name, 8))
        assert _setting(short, f"{algorithm_of[name]}.rollout_steps") == 8
        assert short.algorithm == config.algorithm
        if name.startswith("mix_grpo"):
            assert short.mix_grpo.window_size == 4  # min(4, 8 - 2)
        authors = re.fullmatch(r"(.+)_g(\d+)", name)  # the authors' group size as a second row
        size = int(authors.group(2)) if authors else 12
        assert authors is None or AUTHORS_GROUP_SIZE[authors.group(1)] == size
        assert _setting(config, f"{algorithm_of[name]}.group_size") == size, name
    assert load_config(None, equal_steps_overrides("mix_grpo", 5)).mix_grpo.window_size == 3
    for ablation, variants in ABLATIONS.items():
        for label, overrides in variants.items():
            config = load_config(None, overrides)
            assert config.algorithm == "neighbor_grpo", (ablation, label)
            _assert_applied(config, overrides)
    assert load_config(None, ABLATIONS["p"]["p=2.0"]).neighbor_grpo.quasi_norm_p == 2.0


# Each baseline's settings in its reference repository (docs/benchmarks.md cites file:line for each):
# (max grad norm, weight decay, adam betas, adam eps, PPO clip range, advantage clip)
REFERENCE_SETTINGS = {
    "flow_grpo": (1.0, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),       # yifan123/flow_grpo config/base.py:63-91
    "dance_grpo": (0.01, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),      # finetune_flux_grpo_8gpus.sh:46-55
    "mix_grpo": (1.0, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),         # finetune_flux_grpo_MixGRPO.sh:148-157
    "mix_grpo_flash": (1.0, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),   # finetune_flux_grpo_MixGRPO_Flash.sh:148-157
    "flow_grpo_cps": (1.0, 1e-4, (0.9, 0.999), 1e-8, 1e-5, 5.0),    # flow_grpo config/grpo.py:323-363
    "grpo_guard": (1.0, 1e-4, (0.9, 0.999), 1e-8, 4e-6, 5.0),       # flow_grpo config/grpo_guard.py:84-129
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SETTINGS))
def test_baselines_compare_with_their_references_optimizer_settings(name):
    import torch

    from neighbor_grpo.training.speed import make_optimizer

    max_grad_norm, weight_decay, betas, adam_eps, eps_clip, adv_clip = REFERENCE_SETTINGS[name]
    config = load_config(None, PAPER_SETTINGS[name])
    section = getattr(config, config.algorithm)
    assert config.optim.max_grad_norm == max_grad_norm
    assert config.optim.weight_decay == weight_decay
    assert (config.optim.beta1, config.optim.beta2) == betas
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config.optim.lr,
                               (config.optim.beta1, config.optim.beta2), config.optim.weight_decay, config.speed.optimizer)
    assert optimizer.defaults["eps"] == adam_eps and optimizer.defaults["weight_decay"] == weight_decay
    assert section.eps_clip == eps_clip and section.adv_clip == adv_clip


def test_saved_runs_re_render_and_a_partial_run_uses_only_finished_seeds(short_comparison, tmp_path):
    from neighbor_grpo.bench.report import render

    out, saved = short_comparison
    again = render(out, tmp_path / "again.json")
    assert again["target"] == saved["target"] and (tmp_path / "again.md").read_text() == (out.parent / "results.md").read_text()
    partial = {k: saved[k] for k in ("command", "settings", "rules", "selection", "tuning_runs", "eval_points")}
    partial["runs"] = {m: dict(by_seed) for m, by_seed in saved["runs"].items()}
    del partial["runs"]["mix_grpo_flash"]["1"]
    (tmp_path / "results.partial.json").write_text(json.dumps(partial))
    early = render(tmp_path / "results.partial.json", tmp_path / "early.json")
    assert early["settings"]["seeds"] == [0]
    assert all(by_seed.keys() == {"0"} for by_seed in early["runs"].values())
    assert (tmp_path / "early_overoptimization.png").is_file()


def _short(out, **extra):
    from neighbor_grpo.bench.compare import compare

    settings = dict(budget_fe=BUDGET, lrs=(1e-4, 3e-4), methods=["neighbor_grpo", "mix_grpo_flash"], seeds=(0, 1),
                    evals_per_run=3, eval_samples=2, progress=False, grid=False, throughput_iters=0)
    return compare(out, **{**settings, **extra})


def test_an_interrupted_comparison_resumes_to_the_uninterrupted_results(short_comparison, tmp_path, monkeypatch):
    """Interrupted after 3 of its 6 runs, then resumed with one saved model changed: the 2 intact runs are reused,
    the other 4 run, and every run, the selection and the table are the uninterrupted comparison's."""
    from neighbor_grpo.bench import method_run

    _, reference = short_comparison
    real, calls = method_run.run_method, []

    def interrupted_after_three(*args):
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        calls.append(args[0])
        return real(*args)

    out = tmp_path / "results.json"
    monkeypatch.setattr(method_run, "run_method", interrupted_after_three)
    with pytest.raises(RuntimeError, match="interrupted"):
        _short(out)
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert len(partial["finished_runs"]) == 3 and not out.exists()
    changed = partial["finished_runs"][0]["run"]["model"]["path"]
    with open(changed, "ab") as file:  # a saved model that is no longer the run's: that run is recomputed
        file.write(b"\0")

    with pytest.raises(ValueError, match=r"settings.eval_samples_per_prompt \(2; this command: 3\)"):
        _short(out, resume=True, eval_samples=3)  # other settings: refused before anything runs
    calls.clear()
    monkeypatch.setattr(method_run, "run_method", lambda *args: calls.append(args[0]) or real(*args))
    resumed = _short(out, resume=True)
    assert len(calls) == 4 and resumed["resumed"]["runs_reused"] == 2
    assert changed in {spec["model_path"] for spec in calls}
    assert not (tmp_path / "results.partial.json").exists()

    def numbers(results):  # everything but the timings and the model's path
        timings = ("run_s", "median_s_per_iter", "model", "train_s")

        def untimed(record):
            return {k: [untimed(r) for r in v] if k == "curve" else v for k, v in record.items() if k not in timings}

        runs = {row: {seed: untimed(run) for seed, run in by_seed.items()} for row, by_seed in results["runs"].items()}
        return runs, results["selection"], results["target"]

    assert numbers(resumed) == numbers(reference)
    for row, by_seed in resumed["runs"].items():
        for seed, run in by_seed.items():
            assert run["model"]["sha256"] == reference["runs"][row][seed]["model"]["sha256"]


def test_resume_refuses_without_a_partial_and_a_foreign_models_folder(tmp_path, capsys):
    code = main(["compare", "--out", str(tmp_path / "r.json"), "--budget-fe", "8000", "--resume", "--no-progress"])
    assert code == 2 and "r.partial.json' does not exist; nothing to continue" in capsys.readouterr().err
    (tmp_path / "r_models").mkdir()
    (tmp_path / "r_models" / "mine.txt").write_text("a user's file")
    code = main(["compare", "--out", str(tmp_path / "r.json"), "--budget-fe", "8000", "--resume", "--no-progress"])
    assert code == 2 and "r_models' was not made by ngrpo compare" in capsys.readouterr().err
    assert (tmp_path / "r_models" / "mine.txt").read_text() == "a user's file"
