"""What `ngrpo compare` runs: the paper's settings against the library's defaults, the knob grid, the [D] clip
scaling, the x3 rule and the selection (pure functions; the runs themselves: test_compare_grid.py)."""

import dataclasses
import math

import pytest

from neighbor_grpo.bench.grid import select, x3_point
from neighbor_grpo.bench.settings import (KNOBS, LIBRARY_DEFAULTS, MAIN_TABLE, PAPER_SETTINGS, REFERENCE_EMA,
                                            REFERENCE_LATENT_ELEMENTS, clip_scale, knob_grid)
from neighbor_grpo.config.train_config import load_config


def test_the_papers_neighbor_grpo_differs_from_the_defaults_in_reference_anchoring_only():
    paper = dataclasses.asdict(load_config(None, PAPER_SETTINGS["neighbor_grpo"]))
    defaults = dataclasses.asdict(load_config(None, LIBRARY_DEFAULTS))
    differ = {(section, key) for section in paper if isinstance(paper[section], dict)
              for key in paper[section] if paper[section][key] != defaults[section][key]}
    assert differ == {("neighbor_grpo", "ref_beta")}
    assert paper["neighbor_grpo"]["ref_beta"] == 0 and defaults["neighbor_grpo"]["ref_beta"] > 0
    assert MAIN_TABLE[:2] == ("neighbor_grpo", "neighbor_grpo_defaults")


def test_clip_scale_is_the_square_root_of_the_latent_size_ratio():
    assert clip_scale(16 * 64 * 64, 64) == 32.0
    assert clip_scale(16 * 90 * 90, 64) == 45.0
    assert clip_scale(100, 100) == 1.0
    with pytest.raises(ValueError, match="latent elements"):
        clip_scale(65536, 0)


@pytest.mark.parametrize("method", ["flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash", "grpo_guard"])
def test_clipped_sde_methods_tune_their_clip_at_the_reference_and_scaled_by_sqrt_d(method):
    elements = 64  # the built-in models' 1 x 8 x 8 latents
    grid = knob_grid(method, PAPER_SETTINGS[method], elements)
    config = load_config(None, PAPER_SETTINGS[method])
    reference = getattr(config, config.algorithm).eps_clip
    assert [entry["value"] for entry in grid] == pytest.approx(
        [reference, reference * math.sqrt(REFERENCE_LATENT_ELEMENTS[method] / elements)], rel=1e-3)
    scaled = load_config(None, PAPER_SETTINGS[method] + grid[1]["overrides"])
    assert getattr(scaled, scaled.algorithm).eps_clip == pytest.approx(grid[1]["value"])
    assert "(reference)" in grid[0]["label"] and "sqrt" in grid[1]["label"]


def test_every_method_has_a_two_point_knob_that_its_config_applies():
    for method, (key, _) in KNOBS.items():
        grid = knob_grid(method, PAPER_SETTINGS[method], 64)
        assert len(grid) == 2 and grid[0]["value"] != grid[1]["value"], method
        section, name = key.split(".")
        for entry in grid:
            config = load_config(None, PAPER_SETTINGS[method] + entry["overrides"])
            assert getattr(getattr(config, section), name) == pytest.approx(entry["value"]), method
    # the reference value first
    assert knob_grid("diffusion_nft", PAPER_SETTINGS["diffusion_nft"], 64)[0]["value"] == 1.0
    assert knob_grid("neighbor_grpo", PAPER_SETTINGS["neighbor_grpo"], 64)[0]["value"] == 0.1
    assert knob_grid("sigma=0.1", LIBRARY_DEFAULTS, 64) == [{"label": "reference", "key": None, "value": None,
                                                              "overrides": []}]
    assert set(REFERENCE_EMA) <= set(PAPER_SETTINGS) and "neighbor_grpo" not in REFERENCE_EMA


def test_the_x3_rule_extends_the_grid_only_from_its_ends():
    assert x3_point(3e-4, [1e-4, 3e-4]) == pytest.approx(9e-4)
    assert x3_point(1e-4, [1e-4, 3e-4]) == pytest.approx(3.33e-5)
    assert x3_point(3e-4, [1e-4, 3e-4, 1e-3]) is None
    assert x3_point(1e-4, [1e-4]) is None  # a single lr: no grid to extend


def _run(proxy: list[float]) -> dict:
    return {"curve": [{"fe": float(k), "proxy": p} for k, p in enumerate(proxy)]}


def test_selection_takes_the_highest_proxy_area_then_the_smaller_lr_then_the_first_knob():
    candidates = [{"lr": 1e-4, "knob_index": 0, "run": _run([0.5, 0.6, 0.7])},
                  {"lr": 3e-4, "knob_index": 1, "run": _run([0.5, 0.8, 0.8])},
                  {"lr": 3e-4, "knob_index": 0, "run": _run([0.5, 0.7, 0.9])}]
    assert select(candidates) is candidates[1]  # area 0.725 against 0.7
    tie = [{"lr": 3e-4, "knob_index": 0, "run": _run([0.5, 0.6])}, {"lr": 1e-4, "knob_index": 1, "run": _run([0.5, 0.6])},
           {"lr": 1e-4, "knob_index": 0, "run": _run([0.5, 0.6])}]
    assert select(tie) is tie[2]


def test_the_protocol_grid_crosses_knob_anchoring_and_warm_up_and_every_entry_applies():
    from neighbor_grpo.bench.settings import ANCHORING, protocol_grid

    iterations = 40
    for method in ("neighbor_grpo", "flow_grpo", "flow_grpo_cps", "diffusion_nft", "awm", "dgpo", "mix_grpo",
                   "dance_grpo", "grpo_guard"):
        grid = protocol_grid(method, PAPER_SETTINGS[method], 64, iterations)
        assert len({e["label"] for e in grid}) == len(grid), method
        for entry in grid:
            config = load_config(None, PAPER_SETTINGS[method] + entry["overrides"])  # every override is a real field
            if method in ANCHORING:
                key, values = ANCHORING[method]
                section, name = key.split(".")
                assert getattr(getattr(config, section), name) in values, (method, entry["label"])
    # the paper's row gets the library's anchoring as a candidate, and the overrides win over the row's own
    anchors = {load_config(None, PAPER_SETTINGS["neighbor_grpo"] + e["overrides"]).neighbor_grpo.ref_beta
               for e in protocol_grid("neighbor_grpo", PAPER_SETTINGS["neighbor_grpo"], 64, iterations)}
    assert anchors == {0.0, 1.0}
    # so does its clean-sample policy row (the few-step ablation's): anchoring parity within the method (the
    # defaults row is the anchored variant by definition)
    anchors = {load_config(None, PAPER_SETTINGS["neighbor_grpo_x0"] + e["overrides"]).neighbor_grpo.ref_beta
               for e in protocol_grid("neighbor_grpo_x0", PAPER_SETTINGS["neighbor_grpo_x0"], 64, iterations)}
    assert anchors == {0.0, 1.0}
    # CPS's clip is scaled like the other element-averaged clips: x sqrt(16 x 64 x 64 / 64) = x32
    clips = {load_config(None, PAPER_SETTINGS["flow_grpo_cps"] + e["overrides"]).flow_grpo.eps_clip
             for e in protocol_grid("flow_grpo_cps", PAPER_SETTINGS["flow_grpo_cps"], 64, iterations)}
    assert sorted(clips) == pytest.approx([1e-5, 3.2e-4])
    # DiffusionNFT: lr x anchoring only (its beta is no longer a knob)
    assert len(protocol_grid("diffusion_nft", PAPER_SETTINGS["diffusion_nft"], 64, iterations)) == 2
    # warm-ups: the authors' and the budget's; DGPO switches at a quarter of the run's optimizer steps
    switches = {load_config(None, PAPER_SETTINGS["dgpo"] + e["overrides"]).dgpo.switch_ema_ref
                for e in protocol_grid("dgpo", PAPER_SETTINGS["dgpo"], 64, iterations)}
    assert switches == {200, 10}
    intervals = {load_config(None, PAPER_SETTINGS["mix_grpo"] + e["overrides"]).mix_grpo.window_interval
                 for e in protocol_grid("mix_grpo", PAPER_SETTINGS["mix_grpo"], 64, iterations)}
    assert intervals == {25, 40 // 22}
