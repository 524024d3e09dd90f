"""benchmarks/throughput.py on a tiny random digits model: the JSON schema, the counts, and the forward-pass ratio
against the count the settings imply."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
FIGURES = {"s_per_iter", "rollout_images_per_s", "train_samples_per_s", "peak_mem_gb", "mfu"}

# Tiny settings: P prompts of G candidates; Neighbor GRPO N steps, B anchors, K = round(0.5 N) trained steps;
# DanceGRPO N_D steps, int(fraction * (N_D - 1)) trained steps.
P, G, N, B, N_D, FRACTION = 2, 4, 4, 2, 6, 0.6


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def result(throughput, tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("throughput") / "results.json"
    throughput.main(["--arch", "tiny-digits", "--device", "cpu", "--group-size", str(G), "--prompts", str(P),
                     "--iters", "2", "--warmup", "1", "--methods", "neighbor_grpo", "neighbor_grpo_no_ref", "dance_grpo",
                     "--set", f"neighbor_grpo.rollout_steps={N}", "--set", f"neighbor_grpo.num_anchors={B}",
                     "--set", f"dance_grpo.rollout_steps={N_D}", "--set", f"dance_grpo.train_step_fraction={FRACTION}",
                     "--out", str(out)])
    return json.loads(out.read_text())


def expected_forward_equivalents(backward: float = 2.0) -> tuple[float, float, float]:
    """Per iteration, from the settings alone: rollout forwards + reference forwards (Neighbor GRPO's default
    ref_beta 1; none without it) + (1 + backward) per trained sample."""
    K = round(0.5 * N)
    no_ref = P * G * N + (1 + backward) * P * B * K
    dance = P * G * N_D + (1 + backward) * P * G * int(FRACTION * (N_D - 1))
    return no_ref + P * B * K, no_ref, dance


def test_schema_and_cpu_nulls(result):
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    assert set(result["methods"]) == {"neighbor_grpo", "neighbor_grpo_no_ref", "dance_grpo"}
    for figures in result["methods"].values():
        assert set(figures) == FIGURES
        assert figures["peak_mem_gb"] is None and figures["mfu"] is None  # GPU-only figures
        for key in ("s_per_iter", "rollout_images_per_s", "train_samples_per_s"):
            assert figures[key] > 0


def test_counts_are_positive_and_match_the_settings(result):
    neighbor, dance = (result["details"][m] for m in ("neighbor_grpo", "dance_grpo"))
    K = round(0.5 * N)
    assert neighbor["forwards"] == {"rollout": P * G * N, "train_with_grad": P * B * K, "reference": P * B * K,
                                    "other_no_grad": 0}
    assert dance["forwards"] == {"rollout": P * G * N_D, "train_with_grad": P * G * int(FRACTION * (N_D - 1)),
                                 "reference": 0, "other_no_grad": 0}
    assert neighbor["images_per_iter"] == dance["images_per_iter"] == P * G
    flops = result["flops"]
    assert flops["batch"] == P * G and flops["forward_at_batch"] > 0
    assert flops["forward_per_sample"] == pytest.approx(flops["forward_at_batch"] / (P * G))


def test_forward_ratio_matches_the_analytic_count(result):
    neighbor, no_ref, dance = expected_forward_equivalents()
    details = result["details"]
    assert details["neighbor_grpo"]["forward_equivalents"] == neighbor
    assert details["neighbor_grpo_no_ref"]["forward_equivalents"] == no_ref
    assert details["neighbor_grpo_no_ref"]["forwards"]["reference"] == 0
    assert details["dance_grpo"]["forward_equivalents"] == dance
    for label, ours in (("neighbor", neighbor), ("neighbor_no_ref", no_ref)):
        ratio = result["ratios"][f"dance_over_{label}_forward_equivalents"]
        assert ratio["measured"] == ratio["analytic"] == dance / ours
        wall = result["ratios"][f"dance_over_{label}_wall_clock"]
        assert wall["ratio_of_medians"] > 0 and wall["paired_min"] <= wall["median_of_paired"] <= wall["paired_max"]
