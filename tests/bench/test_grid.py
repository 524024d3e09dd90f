"""`ngrpo compare`'s tuning grid, x3 rule, worker processes, final models, throughput measurement and reference
EMA, on the tiny built-in model at a tiny budget (real runs, no fakes)."""

import json

import pytest

from neighbor_grpo.cli import build_parser, main
from neighbor_grpo.runs.io import sha256_file

BUDGET = 4000.0  # 4 iterations of Neighbor GRPO: 3 held-out evaluations after the base


def _compare(out, workers: int) -> dict:
    from neighbor_grpo.bench.compare import compare

    compare(out, budget_fe=BUDGET, lrs=(1e-4, 3e-4), methods=["neighbor_grpo"], seeds=(0, 1), evals_per_run=3,
            eval_samples=2, progress=False, workers=workers, throughput_iters=1, throughput_warmup=0)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def grid_runs(builtin_models, tmp_path_factory, single_thread):
    folder = tmp_path_factory.mktemp("grid")
    return {workers: (folder / f"w{workers}" / "r.json", _compare(folder / f"w{workers}" / "r.json", workers))
            for workers in (1, 2)}


def _all_runs(saved: dict) -> dict:
    """Every run of a comparison, keyed by what it ran: (lr, knob, seed)."""
    runs = [run for by_seed in saved["runs"].values() for run in by_seed.values()]
    runs += [run for row in saved["tuning_runs"].values() for run in row]
    return {(run["lr"], run["knob"], run["seed"]): run for run in runs}


def test_two_workers_give_the_same_runs_as_one(grid_runs):
    one, two = _all_runs(grid_runs[1][1]), _all_runs(grid_runs[2][1])
    assert one.keys() == two.keys() and len(one) == 6  # 2 lrs x 2 knobs + the x3 point on seed 0, then seed 1
    measured = lambda run: [{k: v for k, v in r.items() if k != "train_s"} for r in run["curve"]]  # noqa: E731
    for key in one:
        assert measured(one[key]) == measured(two[key]), key  # every held-out number, bit for bit (not the seconds)
        assert one[key]["model"]["sha256"] == two[key]["model"]["sha256"], key
    assert grid_runs[1][1]["selection"] == grid_runs[2][1]["selection"]


def test_the_grid_then_the_x3_point_then_the_other_seeds(grid_runs):
    _, saved = grid_runs[2]
    selection = saved["selection"]["neighbor_grpo"]
    candidates = selection["candidates"]
    grid = [(c["lr"], c["knob"]) for c in candidates[:4]]
    assert sorted(grid) == sorted((lr, k) for lr in (1e-4, 3e-4) for k in ("tau_rel=0.1", "tau_rel=0.3"))
    # the grid's choice (by proxy area) was at an end of the lr grid, so the next x3 point ran at its knob
    grid_best = max(candidates[:4], key=lambda c: (c["proxy_auc"], -c["lr"]))
    extra = candidates[4]
    assert extra["lr"] == pytest.approx(grid_best["lr"] * 3 if grid_best["lr"] == 3e-4 else grid_best["lr"] / 3, rel=1e-2)
    assert extra["knob"] == grid_best["knob"] and selection["x3"]["lr"] == extra["lr"]
    best = max(candidates, key=lambda c: (c["proxy_auc"], -c["lr"]))
    assert (selection["chosen_lr"], selection["chosen_knob"]) == (best["lr"], best["knob"])
    for run in saved["runs"]["neighbor_grpo"].values():
        assert (run["lr"], run["knob"]) == (best["lr"], best["knob"])
    assert saved["settings"]["knobs"]["neighbor_grpo"][1]["value"] == 0.3


def test_every_run_writes_its_final_weights_with_their_sha256(grid_runs):
    from neighbor_grpo.runs.io import load_safetensors
    from neighbor_grpo.runs.ownership import marker_kind

    out, saved = grid_runs[2]
    folder = out.parent / "r_models"
    assert marker_kind(folder) == "compare"
    runs = _all_runs(saved).values()
    assert len({run["model"]["path"] for run in runs}) == 6
    for run in runs:
        assert sha256_file(run["model"]["path"]) == run["model"]["sha256"]
    weights = load_safetensors(saved["runs"]["neighbor_grpo"]["1"]["model"]["path"])
    assert weights and all(t.dtype.is_floating_point for t in weights.values())


def test_wall_clock_to_target_uses_the_interleaved_throughput_measurement(grid_runs):
    _, saved = grid_runs[2]
    t = saved["throughput"]
    assert t["workers"] == 2 and len(t["seconds_each"]["neighbor_grpo"]) == 2  # 1 timed iteration per worker
    assert len(t["load_average_1min_before_after"]) == 2 and saved["machine"]["cpus"] >= 1
    s_per_iter = t["s_per_iter"]["neighbor_grpo"]
    method = saved["methods"]["neighbor_grpo"]
    assert method["median_s_per_iter"] == s_per_iter and method["s_per_iter_source"] == "throughput"
    for reached, run in zip(method["time_to_target"], saved["runs"]["neighbor_grpo"].values()):
        assert reached["budget_wall_s"] == pytest.approx(run["iterations"] * s_per_iter)
        if reached["iterations"] is not None:
            assert reached["wall_s"] == pytest.approx(reached["iterations"] * s_per_iter)


def test_the_reference_ema_is_scored_at_the_last_points_and_never_changes_training(builtin_models, single_thread):
    from neighbor_grpo.bench import rules as rules
    from neighbor_grpo.bench.method_run import ReferenceEMA, load_rewards, run_method
    from neighbor_grpo.bench.settings import PAPER_SETTINGS
    from neighbor_grpo.builtin.pretrain import ensure_base_model

    context = {"budget_fe": BUDGET, "points": rules.evaluation_points(BUDGET, 4), "base_path": str(ensure_base_model()),
               "device": "cpu", "eval_prompts": ["3", "7"], "eval_samples": 2,
               "common": ["device=cpu", "prompts_per_iteration=8"]}
    spec = {"overrides": PAPER_SETTINGS["neighbor_grpo"], "lr": 3e-4, "seed": 0}
    proxy, gold = load_rewards("cpu")
    live = run_method(spec, context, proxy, gold)
    with_ema = run_method({**spec, "ema": (0.9, 2)}, context, proxy, gold)
    untimed = lambda curve: [{k: v for k, v in r.items() if k not in ("ema", "train_s")} for r in curve]  # noqa: E731
    assert untimed(with_ema["curve"]) == untimed(live["curve"])
    scored = [r for r in with_ema["curve"] if "ema" in r]
    assert 1 <= len(scored) <= 3 and scored[-1] is with_ema["curve"][-1]
    assert all(r["fe"] >= context["points"][-3] for r in scored)
    assert scored[-1]["ema"]["gold"] != scored[-1]["gold"]  # other weights, other samples
    # the decay schedule: min((1 + k) / (10 + k), decay), applied every `every` optimizer steps
    import torch

    net = torch.nn.Linear(1, 1, bias=False)
    ema = ReferenceEMA(net, 0.9, 2)
    assert [ema.current_decay(k) for k in (0, 8, 100)] == pytest.approx([0.1, 0.5, 0.9])
    with torch.no_grad():
        net.weight.fill_(1.0)
    start = float(ema.shadow["weight"])
    ema.update(net)  # step 0: not applied (every 2)
    assert float(ema.shadow["weight"]) == start
    ema.update(net)  # step 1: decay 2/11
    assert float(ema.shadow["weight"]) == pytest.approx(start + (1 - 2 / 11) * (1.0 - start))
    with ema.applied(net):
        assert float(net.weight.detach()) == pytest.approx(float(ema.shadow["weight"]))
    assert float(net.weight.detach()) == 1.0


def test_help_documents_every_new_flag():
    text = build_parser()._subparsers._group_actions[0].choices["compare"].format_help()
    for flag in ("--base", "--workers", "--no-grid", "--throughput-iters", "--throughput-warmup", "--lrs"):
        assert flag in text
    assert "unet" in text and "x3" in text


@pytest.mark.parametrize("argv, words", [
    (["--workers", "0"], "--workers: expected >= 1"),
    (["--throughput-iters", "-1"], "--throughput-iters: expected >= 0"),
    (["--throughput-warmup", "-1"], "--throughput-warmup: expected >= 0"),
    (["--base", "builtin:nope"], "--base 'builtin:nope': unknown built-in model"),
    (["--base", "no/such/folder"], "--base 'no/such/folder': expected builtin:NAME or a model folder"),
    (["--lrs", "1e-4", "1e-4"], "--lrs: expected distinct learning rates"),
    (["--methods", "awm", "dgpo"], "--methods: must include neighbor_grpo (every comparison is paired against it"),
    (["--methods", "neighbor_grpo", "awm", "--reference", "dgpo"], "--methods: must include dgpo"),
    # DanceGRPO's 6432 forward-equivalents per iteration: known from its settings, refused before any run
    (["--methods", "neighbor_grpo", "dance_grpo", "--budget-fe", "12000"],
     "--budget-fe: dance_grpo costs 6432 forward-equivalents per iteration, so 12000 gives it 2 held-out"),
])
def test_bad_new_flags_get_one_line_errors(tmp_path, capsys, argv, words):
    code = main(["compare", "--out", str(tmp_path / "r.json"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r_models").exists()


def test_no_x3_keeps_the_grid_and_never_extends_it(builtin_models, tmp_path, single_thread):
    from neighbor_grpo.bench.compare import compare

    out = tmp_path / "r.json"
    compare(out, budget_fe=BUDGET, lrs=(1e-4, 3e-4), methods=["neighbor_grpo"], seeds=(0,), evals_per_run=3,
            eval_samples=2, progress=False, throughput_iters=0, x3=False)
    saved = json.loads(out.read_text())
    selection = saved["selection"]["neighbor_grpo"]
    assert len(selection["candidates"]) == 4 and selection["x3"] is None  # 2 lrs x 2 knobs, no extension
    assert saved["settings"]["grid"] and not saved["settings"]["x3"]
    assert selection["chosen_lr"] in (1e-4, 3e-4)
    assert "x3 rule" not in out.with_suffix(".md").read_text().split("\n")[1]
