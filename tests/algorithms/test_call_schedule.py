"""Every algorithm's `call_schedule` (algorithms.common.Phase) against the velocity-net passes one real CPU
`train_iteration` makes: a ModelCallCounter on each network (the policy, the full fine-tune's frozen reference copy,
each of the algorithm's `networks`), cost.CountedReference around the reference velocity, and the largest call each
network saw. Then the cost of every method at the benchmark's settings against the spec (issues #16 and #17)."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import re

import pytest
import torch

from neighbor_grpo.algorithms import ALGORITHMS, FlowGRPO, FlowGRPOConfig, NeighborGRPO, NeighborGRPOConfig
from neighbor_grpo.algorithms.common import solver_evaluations
from neighbor_grpo.bench.compare import PAPER_SETTINGS
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import CountedReference, config_schedule, forward_equivalents, schedule_forward_equivalents
from neighbor_grpo.training.iteration import ModelCallCounter, train_iteration, training_counter
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.training.parts import build_training_parts
from neighbor_grpo.rewards import WeightedRewards

PROMPTS = [str(digit) for digit in range(10)]
# a few steps per algorithm, keeping what its paper settings need (Flow-GRPO-Fast's window of 3 in the first N // 2
# steps, MixGRPO's window of 4 below N - 2, AWM's strata); an algorithm missing here runs at its defaults
SMALL = {"neighbor_grpo": ["rollout_steps=4"], "flow_grpo": ["rollout_steps=6"], "dance_grpo": ["rollout_steps=5"],
         "mix_grpo": ["rollout_steps=7"], "diffusion_nft": ["rollout_steps=4"], "awm": ["rollout_steps=4", "num_times=2"],
         "dgpo": ["rollout_steps=4", "trunc_steps=3", "num_times=2"]}
CHUNKED = ("speed.rollout_chunk=1", "speed.micro_batch=1")  # (the old-policy recompute is not micro-batched)
# every registered algorithm at its defaults (a new one without a schedule fails here), and every compared variant
CASES = {**{f"{name}-defaults": [f"algorithm={name}"] for name in ALGORITHMS}, **PAPER_SETTINGS}


def section(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("algorithm="))


def small_config(overrides: list[str], extra: tuple[str, ...] = (), speed: tuple[str, ...] = ()):
    """2 prompts x G 12 (every minibatch split even, so each phase's calls are all of its `batch`), a few steps."""
    name = section(overrides)
    return load_config(None, [*overrides, "prompts_per_iteration=2", "optim.finetune=full", f"{name}.group_size=12",
                              *(f"{name}.{o}" for o in (*SMALL.get(name, []), *extra)), *speed])


def brightness_rewards() -> WeightedRewards:
    return WeightedRewards({"brightness_for_test": lambda images, prompts: images.mean(dim=(1, 2, 3))},
                           {"brightness_for_test": 1.0})


def measure(config, iteration: int = 0) -> dict:
    """{(network, grad): samples}, {(network, grad, call size): calls} and the CountedReference's samples of one
    real iteration on a tiny digits model."""
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    parts = build_training_parts(config, adapter)
    nets = {"policy": adapter.net, "reference": parts.reference_net, **parts.algorithm_nets}
    nets = {name: net for name, net in nets.items() if net is not None}
    counters = {name: ModelCallCounter(net) for name, net in nets.items()}
    calls: Counter = Counter()

    def record(name):
        def hook(module, inputs, output):
            calls[(name, torch.is_grad_enabled(), int(inputs[0].shape[0]))] += 1
        return hook

    handles = [net.register_forward_hook(record(name)) for name, net in nets.items()]
    reference = CountedReference(parts.reference_velocity, counters["policy"])
    _, skipped = train_iteration(config, adapter, brightness_rewards(), parts.algorithm, parts.optimizer, parts.params,
                                 parts.ema, reference, PROMPTS, iteration, lambda event: None, parts=parts)
    assert skipped == ""
    for handle in handles:
        handle.remove()
    samples = Counter()
    for name, counter in counters.items():
        no_grad, with_grad = counter.reset()
        samples[(name, False)], samples[(name, True)] = no_grad, with_grad
    return {"samples": +samples, "calls": calls, "reference": reference.samples}


def declared(config, iteration: int = 0) -> dict:
    """The same from the algorithm's schedule: a phase of `samples` is samples / batch calls of `batch`."""
    schedule = config_schedule(config, iteration=iteration)
    samples, calls = Counter(), Counter()
    for phase in schedule:
        assert phase.samples % phase.batch == 0, f"{phase}: uneven calls at these test settings"
        samples[(phase.network, phase.grad)] += phase.samples
        calls[(phase.network, phase.grad, phase.batch)] += phase.samples // phase.batch
    return {"samples": +samples, "calls": +calls,
            "reference": sum(p.samples for p in schedule if p.network == "reference")}


@pytest.mark.parametrize("speed", [(), CHUNKED], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_is_what_an_iteration_runs(case, speed, single_thread):
    """Per network and grad mode: the samples of one iteration and the size of every call, as declared."""
    config = small_config(CASES[case], speed=speed)
    assert measure(config) == declared(config)


def held_per_backward(config, monkeypatch) -> list[int]:
    """The policy's with-grad calls made before each backward() of one real iteration: the calls whose saved
    activations are alive together (what Phase.held declares)."""
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    parts = build_training_parts(config, adapter)
    alive, held = [0], []

    def count(module, inputs, output):
        alive[0] += torch.is_grad_enabled()

    backward = torch.Tensor.backward

    def counted_backward(self, *args, **kwargs):
        held.append(alive[0])
        alive[0] = 0
        return backward(self, *args, **kwargs)

    handle = adapter.net.register_forward_hook(count)
    monkeypatch.setattr(torch.Tensor, "backward", counted_backward)
    try:
        _, skipped = train_iteration(config, adapter, brightness_rewards(), parts.algorithm, parts.optimizer,
                                     parts.params, parts.ema, parts.reference_velocity, PROMPTS, 0, lambda event: None,
                                     parts=parts)
    finally:
        handle.remove()
    assert skipped == ""
    return held


# settings that change how many trained calls one backward holds
HELD_CHANGES = {"flow_grpo-by-steps": ["algorithm=flow_grpo", "flow_grpo.minibatch_by=steps"],
                "dance_grpo-all-steps": ["algorithm=dance_grpo", "dance_grpo.train_step_fraction=1.0"],
                "dgpo-2-minibatches": ["algorithm=dgpo", "dgpo.num_times=4", "dgpo.num_minibatches=2"],
                "awm-1-time": ["algorithm=awm", "awm.num_times=1"],
                "diffusion_nft-half": ["algorithm=diffusion_nft", "diffusion_nft.timestep_fraction=0.5"]}


@pytest.mark.parametrize("speed", [(), CHUNKED], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", sorted({**CASES, **HELD_CHANGES}))
def test_held_is_what_one_backward_holds(case, speed, monkeypatch, single_thread):
    """Phase.held of the with-grad phase: the most with-grad policy calls a real iteration makes between two
    backward() calls (the planner holds that many calls' saved activations at the peak), whole or micro-batched."""
    config = small_config({**CASES, **HELD_CHANGES}[case], speed=speed)
    held = held_per_backward(config, monkeypatch)
    trained = [phase for phase in config_schedule(config) if phase.grad]
    assert len(trained) == 1 and held, (trained, held)
    assert max(held) == trained[0].held, held
    assert sum(held) == trained[0].samples // trained[0].batch  # every trained call is before some backward


def chunked_config(name: str, extra: tuple[str, ...] = ()):
    return small_config([f"algorithm={name}"], extra, CHUNKED)


def by_grad(samples: Counter) -> dict[bool, int]:
    return {grad: sum(n for (_, g), n in samples.items() if g == grad) for grad in (False, True)}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_lora_totals_are_the_schedules(name, single_thread):
    """With LoRA the reference is the policy with its adapters off: the same module, so only the totals and the
    CountedReference's share can be told apart."""
    config = small_config([f"algorithm={name}", "optim.finetune=lora"])
    measured, schedule = measure(config), declared(config)
    assert by_grad(measured["samples"]) == by_grad(schedule["samples"])
    assert measured["reference"] == schedule["reference"]


@lru_cache(maxsize=None)
def measured_small(name: str, extra: tuple[str, ...], iteration: int) -> dict:
    return measure(chunked_config(name, extra), iteration)


# settings that change the counts: (algorithm, overrides of its section, iteration)
CHANGES = [("neighbor_grpo", ("ref_beta=0",), 0), ("neighbor_grpo", ("old_policy=recompute",), 0),
           ("neighbor_grpo", ("rollout_solver=heun",), 0), ("neighbor_grpo", ("step_selection=all",), 0),
           ("neighbor_grpo", ("num_anchors=2", "train_step_fraction=0.25"), 0),
           ("flow_grpo", ("kl_beta=0.04",), 0), ("flow_grpo", ("old_policy=recompute", "minibatch_by=steps"), 0),
           ("flow_grpo", ("fast_window_size=2",), 0), ("flow_grpo", ("train_step_fraction=0.5",), 0),
           ("dance_grpo", ("train_step_fraction=1.0",), 0), ("dance_grpo", ("old_policy=recompute",), 0),
           ("mix_grpo", ("window_size=2",), 0), ("mix_grpo", ("flash=true",), 0),
           ("mix_grpo", ("window_interval=1",), 4),  # the window at steps 4-4: cut at N - 2
           ("mix_grpo", ("flash=true", "window_interval=1"), 3), ("mix_grpo", ("old_policy=recompute",), 0),
           ("diffusion_nft", ("kl_beta=0",), 0), ("diffusion_nft", ("rollout_policy=current",), 0),
           ("diffusion_nft", ("rollout_solver=heun",), 0), ("diffusion_nft", ("timestep_fraction=0.5",), 0),
           ("awm", ("kl_beta=0",), 0), ("awm", ("ema_beta=0",), 0), ("awm", ("num_times=1",), 0),
           ("awm", ("rollout_solver=heun",), 0),
           ("dgpo", ("clip_range=0",), 0), ("dgpo", ("use_ema_ref=true", "kl_beta=0"), 0),
           ("dgpo", ("num_times=4", "num_minibatches=2"), 0), ("dgpo", ("rollout_solver=heun",), 0),
           ("dgpo", ("switch_ema_ref=0",), 1)]  # iteration 1: past the switch, the EMA-old rolls out


@pytest.mark.parametrize("name, extra, iteration", CHANGES)
def test_a_setting_changes_schedule_and_counts_alike(name, extra, iteration, single_thread):
    base, changed = measured_small(name, (), 0), measured_small(name, extra, iteration)
    assert changed == declared(chunked_config(name, extra), iteration)
    assert base == declared(chunked_config(name))
    assert changed["samples"] != base["samples"]


def test_every_algorithm_is_covered():
    assert {section(o) for o in CASES.values()} == set(ALGORITHMS)
    assert {name for name, _, _ in CHANGES} == set(ALGORITHMS), "give every algorithm a setting that changes its counts"


def test_settings_without_a_schedule_are_refused():
    with pytest.raises(ValueError, match="rollout_solver"):
        solver_evaluations("rk4", 8)
    with pytest.raises(ValueError, match="old_policy"):  # (load_config refuses these first)
        NeighborGRPO(NeighborGRPOConfig(old_policy="cached")).call_schedule(2)
    with pytest.raises(ValueError, match="fast_window_end"):
        FlowGRPO(FlowGRPOConfig(rollout_steps=6, fast_window_size=3, fast_window_end=8)).call_schedule(2)


# ---- issue #16: each method's cost at the benchmark's settings against the spec ----------------------------------
# P 8 prompts x G 12, no CFG, full fine-tune (b = 2: a trained forward costs 3); per iteration, forward-equivalents
P, G = 8, 12
SPEC_COST = {
    # algorithms.md 1 (paper's setup): DPM-Solver++ 8 steps; B = 4 anchors at K = 4 of 8 steps, forward+backward
    "neighbor_grpo": P * G * 8 + 3 * P * 4 * 4,  # 1152
    # the library's defaults add reference anchoring (ref_beta 1, docs/design.md): one reference forward per trained unit
    "neighbor_grpo_defaults": P * G * 8 + 3 * P * 4 * 4 + P * 4 * 4,  # 1280
    # the clean-sample policy (policy_space x0, the few-step ablation's row) makes the same calls as the paper's
    "neighbor_grpo_x0": P * G * 8 + 3 * P * 4 * 4,  # 1152
    # competitors.md 4.4 without CFG (GRPO-Guard = Flow-GRPO with KL off): rollout 10, steps 0-8 x 3 = 37 per sample
    "flow_grpo": P * G * 10 + 3 * P * G * 9,  # 3552
    # algorithms.md 1: 25-step SDE rollout, NFE_theta = 14 trained steps (int(0.6 x 24), the code; the spec's
    # "int(25 x 0.6) = 15" disagrees: the reference drops the last step first, dance_grpo.minibatches)
    "dance_grpo": P * G * 25 + 3 * P * G * 14,  # 6432
    # algorithms.md 2: 25 steps, the SDE window of 4 (MixGRPO's recipe) trained
    "mix_grpo": P * G * 25 + 3 * P * G * 4,  # 3552
    # Flash (no spec figure; the code): window steps 0-3 on the full grid, then int(0.4 x (25 - 3)) = 8 grid points
    # to s = 0, 7 DPM-Solver++ steps: 11 evaluations
    "mix_grpo_flash": P * G * (4 + 7) + 3 * P * G * 4,  # 2208
    # competitors.md 3.4 (Fast + CPS, SD3 no CFG): rollout 10, 3 window steps x 3: 19 per sample
    "flow_grpo_cps": P * G * (10 + 3 * 3),  # 1824
    # competitors.md 4.4: 74 per sample with CFG; without it rollout 10 + 9 steps x 3 = 37 (RatioNorm is free)
    "grpo_guard": P * G * (10 + 9 * 3),  # 3552
    # competitors.md 1.4: rollout 10 + K_t = 9 times x (old 1 + trained 3 + reference 1) = 55 per sample
    "diffusion_nft": P * G * (10 + 9 * 5),  # 5280
    # competitors.md 2.3: rollout 14 + T = 6 times x (trained 3 + reference 1 + EMA policy 1) = 44 per sample
    "awm": P * G * (14 + 6 * 5),  # 4224
    # competitors.md 5.3 without CFG (PickScore config, kl_cfg 1): rollout 10 + M = 4 times x (trained 3 +
    # reference 1 + EMA-old 1) = 30 per sample (the spec's 34 CFG-free counts the reference with kl_cfg 4.5 as 2)
    "dgpo": P * G * (10 + 4 * 5),  # 2880
}


def test_every_method_has_its_spec_cost():
    """Every row of the comparison at G 12 (the authors'-G rows differ only in G, which the test sets)."""
    assert {m for m in PAPER_SETTINGS if not re.search(r"_g\d+$", m)} == set(SPEC_COST)


@pytest.mark.parametrize("method", sorted(SPEC_COST))
def test_cost_at_the_benchmark_settings_is_the_specs(method, single_thread):
    """The forwards the trainer and `ngrpo compare` count (iteration.training_counter) in one real iteration of
    P 8 x G 12 on the tiny model, and the algorithm's schedule, both equal the spec's figure."""
    config = load_config(None, [*PAPER_SETTINGS[method], f"prompts_per_iteration={P}", "optim.finetune=full",
                                f"{section(PAPER_SETTINGS[method])}.group_size={G}"])
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    parts = build_training_parts(config, adapter)
    counter = training_counter(adapter, parts)
    _, skipped = train_iteration(config, adapter, brightness_rewards(), parts.algorithm, parts.optimizer, parts.params,
                                 parts.ema, parts.reference_velocity, PROMPTS, 0, lambda event: None, parts=parts)
    assert skipped == ""
    no_grad, with_grad = counter.reset()
    assert forward_equivalents(no_grad, with_grad, "full") == SPEC_COST[method]
    assert schedule_forward_equivalents(config_schedule(config), "full") == SPEC_COST[method]
