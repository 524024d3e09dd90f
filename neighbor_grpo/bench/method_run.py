"""One run of `ngrpo compare`: a method at one (lr, knob, seed) trained to the forward-equivalent budget, with
held-out evaluations at the shared points, the reference's evaluation EMA scored at the last points, and its final
weights written with their sha256. Runs are independent: a run's numbers depend only on its spec (never on which
process ran it, or what ran before).

Held-out samples come from the evaluation sampler of `context["eval_sampler"]` (the headline: a many-step Euler
ODE, as the references evaluate; default: the 8-step DPM-Solver++ of earlier tables); with
`context["side_sampler"]` the gold and proxy are scored on that sampler's samples too (`side_gold`, `side_proxy`).
What is trained and scored is the task's (`context["task"]`, bench/tasks.py; default digits): its proxy, its gold
(with its components where it has them), its training prompts and its realism reference (digits: split A's real
digits, data the gold never reads; words: clean renders of the training words). Optimizer steps are counted.
With `spec["gold_at"]` "final" (tuning runs on seeds never reported, `ngrpo compare --tuning-gold final`) the gold is
scored only at the last rules.FINAL_EVALUATIONS evaluations, after the run, on the images those evaluations kept;
earlier records hold None there (never scored, not 0)."""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from neighbor_grpo.bench import rules, tasks
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import forward_equivalents
from neighbor_grpo.runs.io import save_safetensors, sha256_file
from neighbor_grpo.training.iteration import train_iteration, training_counter
from neighbor_grpo.models.lora import EMA
from neighbor_grpo.training.monitors import evaluate, generate
from neighbor_grpo.training.parts import build_training_parts, load_model, read_prompts

GOLD_REWARD = "digit_gold"  # the digits task's gold (bench/tasks.py holds every task's)
PROBE_SEED = 20260  # the fixed held-out states of the distance from the base (the same for every method and seed)
PROBE_PER_PROMPT = 8
EMA_EVALUATIONS = 3  # the EMA weights are scored at the last evaluations, those the final value averages
DEFAULT_SAMPLER = ("dpm++2m", 8)  # the evaluation sampler of the tables before issue #23
NEUTRAL_SAMPLER = ("euler", 40)  # the references' evaluation: a 40-step Euler ODE (spec competitors.md 1.3, 3.3)
# Where a run scores the gold: at every evaluation, or only at the last rules.FINAL_EVALUATIONS (the final value;
# tuning runs on seeds never reported: the selection never reads the gold, so only the final value is ever read)
GOLD_AT = ("all", "final")
# The base model's held-out evaluation and distance probe, once per process for every run that starts from the same
# base under the same evaluation (base_evaluation_key): at iteration 0 every run's model is the base (full weights,
# or LoRA whose B factors start at zero), so each run would recompute the same samples and scores
_BASE_EVALUATIONS: dict[str, dict] = {}


def load_gold(device: str):
    """The digits task's gold reward object (with `components`), built from the reward registry."""
    return load_rewards(device)[1]


def load_rewards(device: str, task: str = "digits") -> tuple:
    """(proxy, gold) of a task of bench/tasks.py: the trained-on reward and the held-out gold."""
    return tasks.load_rewards(tasks.TASKS[task](), device)


class ReferenceEMA(EMA):
    """A reference repository's evaluation EMA (flow_grpo/ema.py EMAModuleWrapper): at optimizer step k (from 0)
    the decay is min((1 + k) / (10 + k), decay), applied every `every` steps. lora.EMA's shadow and `applied`, so
    train_iteration steps it after every optimizer step; it never feeds back into training."""

    def __init__(self, net: torch.nn.Module, decay: float, every: int):
        super().__init__(net, decay)
        self.every, self.steps = every, 0

    def current_decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        if (self.steps + 1) % self.every == 0:
            weight = 1.0 - self.current_decay(self.steps)
            for name, param in net.named_parameters():
                if name in self.shadow:
                    self.shadow[name].lerp_(param.detach(), weight)
        self.steps += 1


class DistanceProbe:
    """Distance from the base model: mean over fixed held-out states of ||v_theta - v_ref||^2 / latent dims.
    States are points on straight paths from the base model's held-out samples to fixed noise, at fixed sigmas."""

    def __init__(self, adapter, prompts: list[str], seed: int, shift: float):
        latents, _ = generate(adapter, prompts, PROBE_PER_PROMPT, seed, "dpm++2m", 8, shift)  # the base model's
        generator = torch.Generator().manual_seed(PROBE_SEED)
        x0 = latents.flatten(0, 1).float().cpu()
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = 0.05 + 0.9 * torch.rand(x0.shape[0], generator=generator)
        s = sigmas.view(-1, *[1] * (x0.dim() - 1))
        self.states = ((1 - s) * x0 + s * noise).to(latents)
        self.sigmas = sigmas.to(latents)
        self.prompts = [p for p in prompts for _ in range(PROBE_PER_PROMPT)]
        self.reference = self._velocity(adapter)

    @torch.no_grad()
    def _velocity(self, adapter) -> torch.Tensor:
        # encoded by the adapter probed: a conditioning can be rows of that adapter's own prompt cache (diffusers
        # adapters), which another adapter (a run reading the shared base evaluation) numbers differently
        return adapter.velocity(self.states, self.sigmas, adapter.encode_prompts(self.prompts)).float()

    def __call__(self, adapter) -> float:
        return float((self._velocity(adapter) - self.reference).pow(2).mean())


def heldout_scores(adapter, proxy, gold, probe, prompts, samples, seed, shift, sampler=DEFAULT_SAMPLER,
                   side_sampler=None, realism_reference=tasks.split_a_digits, score_gold=True) -> tuple[dict, dict]:
    """(record, images): `heldout_record`'s record; with `score_gold` False its gold fields are None (absent, not
    0) and `images` holds what they would read ({field: (images, prompts)}) for `score_gold_into` later."""
    from neighbor_grpo.training.monitors import nearest_real_distance

    metrics, images = evaluate(adapter, proxy, prompts, samples, seed, *sampler, shift)
    flat = images.flatten(0, 1).clamp(0, 1)
    flat_prompts = [p for p in prompts for _ in range(samples)]
    reference = realism_reference(adapter)
    realism = nearest_real_distance(flat, reference) if reference is not None else None
    record = {"proxy": metrics["reward"], "out_of_range": metrics["out_of_range"], "diversity": metrics["diversity"],
              "realism": realism, "distance": probe(adapter)}
    unscored = {"gold": (flat, flat_prompts)}
    if side_sampler is not None:
        side, side_images = evaluate(adapter, proxy, prompts, samples, seed, *side_sampler, shift)
        record["side_proxy"] = side["reward"]
        unscored["side_gold"] = (side_images.flatten(0, 1).clamp(0, 1), flat_prompts)
    if score_gold:
        score_gold_into(record, unscored, gold)
        return record, {}
    record.update(dict.fromkeys(unscored))  # the gold's own fields; a digits gold's components come when scored
    return record, unscored


def score_gold_into(record: dict, unscored: dict, gold) -> None:
    """The gold (and its components, on the headline sampler's images) of `heldout_scores`' unscored images."""
    for field, (images, prompts) in unscored.items():
        if field == "gold":
            record.update({k: float(v.float().mean()) for k, v in tasks.gold_components(gold, images, prompts).items()})
        else:
            record[field] = float(gold(images, prompts).float().mean())


def heldout_record(adapter, proxy, gold, probe, prompts, samples, seed, shift, sampler=DEFAULT_SAMPLER,
                   side_sampler=None, realism_reference=tasks.split_a_digits) -> dict:
    """Proxy, gold (and its components), monitors and distance on `samples` held-out samples of each prompt;
    `realism_reference(adapter)`: the images the realism monitor reads (None: no realism)."""
    return heldout_scores(adapter, proxy, gold, probe, prompts, samples, seed, shift, sampler, side_sampler,
                          realism_reference)[0]


def folder_fingerprint(path: str) -> list:
    """(relative path, size, mtime_ns) of every file under a base model's folder (or of the file itself): a base
    rebuilt at the same path is a different base."""
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root] if root.exists() else []
    return [(str(f.relative_to(root)) if root.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in files]


def base_evaluation_key(context: dict, config, shift: float, scoring: dict) -> str:
    """What the base model's held-out evaluation and probe depend on: the base (its folder's files), the held-out
    prompts, samples, seed, samplers and realism reference, the model, fine-tuning and precision settings. Two
    runs with the same key get the same base record (tests/bench/test_base_evaluation.py checks every method)."""
    return json.dumps({
        "base": str(context["base_path"]), "files": folder_fingerprint(str(context["base_path"])),
        "task": context.get("task", "digits"), "prompts": list(context["eval_prompts"]),
        "samples": context["eval_samples"], "seed": config.eval.seed, "shift": float(shift),
        "sampler": list(scoring["sampler"]), "side_sampler": scoring["side_sampler"],
        "realism": getattr(scoring["realism_reference"], "__qualname__", repr(scoring["realism_reference"])),
        "device": config.device, "model": dataclasses.asdict(config.model), "speed": dataclasses.asdict(config.speed),
        "finetune": [config.optim.finetune, config.optim.lora_rank, config.optim.lora_alpha,
                     list(config.optim.lora_targets)],
    }, sort_keys=True, default=str)


def base_evaluation(key: str, make_probe, score) -> dict:
    """The cached (or, the first time, computed) base evaluation of `key`: {"probe", "scores", "images"}; `score()`
    -> `heldout_scores`' (record, images) with the gold unscored."""
    entry = _BASE_EVALUATIONS.get(key)
    if entry is None:
        probe = make_probe()
        scores, images = score(probe)
        entry = _BASE_EVALUATIONS[key] = {"probe": probe, "scores": scores, "images": images, "scored": None}
    return entry


def base_scores(entry: dict, gold, with_gold: bool) -> tuple[dict, dict]:
    """The base record as `heldout_scores` gives it: with the gold scored (once per entry) or unscored (its images
    beside it, for a run that scores only its last evaluations)."""
    if not with_gold:
        return copy.deepcopy(entry["scores"]), dict(entry["images"])
    if entry["scored"] is None:
        scored = copy.deepcopy(entry["scores"])
        score_gold_into(scored, entry["images"], gold)
        entry["scored"] = scored
    return copy.deepcopy(entry["scored"]), {}


def run_method(spec: dict, context: dict, proxy, gold) -> dict:
    """Train spec["overrides"] at spec["lr"] and spec["seed"] until context["budget_fe"] forward-equivalents; a
    held-out evaluation at the first iteration boundary at or past each of context["points"] (points passed within
    one iteration share one evaluation). With spec["ema"] = (decay, every), the reference's EMA weights are scored
    too at the evaluations from the third-last point on; with spec["model_path"], the final live weights are
    written there (safetensors) and their sha256 recorded."""
    started, seed = time.perf_counter(), spec["seed"]
    task = tasks.TASKS[context.get("task", "digits")]()
    torch.manual_seed(seed)  # nothing should read the global generator; if something does, it reads the same
    config = load_config(None, context["common"] + spec["overrides"] + [f"optim.lr={spec['lr']!r}", f"seed={seed}"])
    adapter = load_model(context["base_path"], config.device, progress=False)
    parts = build_training_parts(config, adapter)
    ema = ReferenceEMA(adapter.net, *spec["ema"]) if spec.get("ema") else None
    counter = training_counter(adapter, parts)  # the algorithm's own networks too (an old policy, an EMA copy)
    prompts = list(context["train_prompts"]) if context.get("train_prompts") else read_prompts(config)
    points, budget = context["points"], context["budget_fe"]
    ema_from = points[-min(EMA_EVALUATIONS, len(points))]
    curve: list[dict] = []
    state = {"fe": 0.0, "iteration": 0, "train_s": 0.0, "optimizer_steps": 0}
    scoring = {"sampler": tuple(context.get("eval_sampler", DEFAULT_SAMPLER)),
                "side_sampler": tuple(context["side_sampler"]) if context.get("side_sampler") else None,
                "realism_reference": task.realism_reference}

    def count_step(*_) -> None:  # the optimizer's own hook: steps skipped for non-finite gradients never count
        state["optimizer_steps"] += 1

    step_hook = parts.optimizer.register_step_post_hook(count_step)

    gold_at = spec.get("gold_at", "all")
    if gold_at not in GOLD_AT:
        raise ValueError(f"gold_at: expected one of {GOLD_AT}, got {gold_at!r}")
    unscored: list[tuple[dict, dict]] = []  # gold_at "final": the last evaluations' images, scored after the run

    def held_out(probe, base: dict | None = None) -> None:
        counter.reset()
        args = (proxy, gold, probe, context["eval_prompts"], context["eval_samples"], config.eval.seed, parts.shift)
        if base is not None:
            scores, images = base_scores(base, gold, with_gold=gold_at == "all")
        else:
            scores, images = heldout_scores(adapter, *args, **scoring, score_gold=gold_at == "all")
        record = {**state, **scores}
        if images:
            unscored[:] = [*unscored, (record, images)][-rules.FINAL_EVALUATIONS:]
        if ema is not None and state["fe"] >= ema_from:  # at most the last 3 evaluations: scored in full
            with ema.applied(adapter.net):
                record["ema"] = heldout_record(adapter, *args, **scoring)
        counter.reset()  # evaluation is not training cost
        curve.append(record)

    def base_score(probe):
        args = (proxy, gold, probe, context["eval_prompts"], context["eval_samples"], config.eval.seed, parts.shift)
        return heldout_scores(adapter, *args, **scoring, score_gold=False)

    base = None
    if context.get("share_base_evaluation", True):
        base = base_evaluation(base_evaluation_key(context, config, parts.shift, scoring),
                               lambda: DistanceProbe(adapter, context["eval_prompts"], config.eval.seed, parts.shift),
                               base_score)
        probe = base["probe"]
    else:
        probe = DistanceProbe(adapter, context["eval_prompts"], config.eval.seed, parts.shift)
    held_out(probe, base)
    s_per_iter: list[float] = []
    pending = list(points)
    while state["fe"] < budget:
        tick = time.perf_counter()
        train_iteration(config, adapter, proxy, parts.algorithm, parts.optimizer, parts.params, ema,
                        parts.reference_velocity, prompts, state["iteration"], lambda point: None, parts=parts)
        s_per_iter.append(time.perf_counter() - tick)
        state["train_s"] += s_per_iter[-1]
        no_grad, with_grad = counter.reset()
        state["fe"] += forward_equivalents(no_grad, with_grad, config.optim.finetune)
        state["iteration"] += 1
        if pending and state["fe"] >= pending[0]:
            held_out(probe)
            pending = [p for p in pending if p > state["fe"]]
    if pending or curve[-1]["iteration"] != state["iteration"]:
        held_out(probe)
    for record, images in unscored:  # the final value's evaluations: the only gold a tuning run is read for
        score_gold_into(record, images, gold)
    counter.remove()
    step_hook.remove()
    run = {"lr": spec["lr"], "seed": seed, "knob": spec.get("knob"), "iterations": state["iteration"],
           "optimizer_steps": state["optimizer_steps"], "median_s_per_iter": statistics.median(s_per_iter), "fe_per_iter": state["fe"] / state["iteration"],
           "finetune": config.optim.finetune, "gold_at": gold_at, "curve": curve, "run_s": time.perf_counter() - started}
    if spec.get("model_path"):
        path = Path(spec["model_path"])
        save_safetensors(dict(adapter.net.state_dict()), path)
        run["model"] = {"path": str(path), "sha256": sha256_file(path), "weights": "live (not EMA)"}
    return run


def load_final_model(base_path: str, weights: str | Path, settings: list[str]):
    """(adapter, config): a comparison's saved final weights (a run's `model.path`) on its base, with the LoRA layers
    the run trained where `settings` (the task's and the row's overrides) fine-tune LoRA."""
    from neighbor_grpo.models.lora import apply_lora
    from neighbor_grpo.runs.io import load_safetensors
    from neighbor_grpo.training.parts import lora_targets

    config = load_config(None, ["device=cpu", *settings])
    adapter = load_model(base_path, "cpu", progress=False)
    if config.optim.finetune == "lora":
        adapter.net = apply_lora(adapter.net, config.optim.lora_rank, config.optim.lora_alpha,
                                 lora_targets(config, adapter))
    adapter.net.load_state_dict(load_safetensors(weights))
    return adapter, config


def final_model_images(base_path: str, weights: str | Path | None, settings: list[str], prompts: list[str],
                       samples: int, sampler: tuple[str, int] = ("euler", 40)) -> torch.Tensor:
    """The held-out images (prompts x samples x C x H x W, clamped) of the base (`weights` None) or a final model,
    drawn as the comparison's evaluation draws them: its noise seed, its sampler, its shift."""
    from neighbor_grpo.training.parts import model_shift

    if weights is None:
        adapter, config = load_model(base_path, "cpu", progress=False), load_config(None, ["device=cpu", *settings])
    else:
        adapter, config = load_final_model(base_path, weights, settings)
    with torch.no_grad():
        _, images = generate(adapter, list(prompts), samples, config.eval.seed, *sampler, model_shift(config, adapter))
    return images.clamp(0, 1)
