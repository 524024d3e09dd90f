"""One-line mutations of the code issue #22 items 10-13 touched, each run against the tests that concern it; prints
each mutation as killed (a test failed) or survived (every selected test passed), and the kill rate.

Every mutation runs in a temporary copy of neighbor_grpo/ and tests/ (the working tree is never changed): the
copy's file is mutated, the selected tests run with the copy first on PYTHONPATH, the file is restored. The issue's
own examples come first (marked "issue"), then fresh ones. A selection that collects no test, or an original line
that is not found exactly once, is reported as an error of this script, not as a kill.

Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/mutation_kill_rate.py [--only TEXT] [--list]
(about 30 minutes on the shared, busy 2-core machine; --only runs the mutations whose name contains TEXT)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SDE = "tests/algorithms/test_sde_baselines.py"
HALF = "tests/algorithms/test_half_precision_policies.py"
SPEED = "tests/training/test_speed.py"
TERMS = "tests/plan/test_memory_terms.py"
AWM = "tests/algorithms/test_awm.py"
HAND = ["-k", "bytes or adamw or ema_and or sharding or ddp"]  # test_memory_terms' hand-counted nets (fast)


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    origin: str = "fresh"


M = Mutation
MUTATIONS = [
    # ---- the examples (item 13) ----
    M("awm: Ahat loses / adv_clip", "neighbor_grpo/algorithms/awm.py", "/ c.adv_clip * c.advantage_max",
      "* c.advantage_max", (AWM, "-k", "adv_clip or kl_terms"), "issue"),
    M("awm: EMA KL against the reference", "neighbor_grpo/algorithms/awm.py",
      "kl_ema = kl_ema + (v - v_ema).pow(2).mean()", "kl_ema = kl_ema + (v - v_ref).pow(2).mean()",
      (AWM, "-k", "adv_clip or kl_terms"), "issue"),
    M("diffusion_nft: code scale inverted", "neighbor_grpo/algorithms/diffusion_nft.py",
      "scale = c.adv_clip / c.beta if", "scale = c.beta / c.adv_clip if", ("tests/algorithms/test_diffusion_nft.py", "-k", "code_loss_scale"),
      "issue"),
    M("forward_process: minibatch order keyed by prompt 0", "neighbor_grpo/algorithms/forward_process.py",
      "keyed_generator(seed, iteration, index, ROLE_MEMBERS)",
      "keyed_generator(seed, iteration, rollout.prompt_indices[0], ROLE_MEMBERS)",
      ("tests/algorithms/test_forward_process.py", "-k", "keyed"), "issue"),
    M("flow_grpo: CPS KL over 2 sigma^2", "neighbor_grpo/algorithms/flow_grpo.py", "if not self.cps:  # CPS",
      "if True:  # CPS", ("tests/algorithms/test_cps.py", "-k", "kl_is"), "issue"),
    M("checkpoint: a torn checkpoint counted as kept", "neighbor_grpo/runs/checkpoint.py",
      "good = [p for p in list_checkpoints(folder) if verify_checkpoint(p)]", "good = list_checkpoints(folder)",
      ("tests/runs/test_checkpoint.py",), "issue"),
    M("memory: one AdamW moment", "neighbor_grpo/plan/memory.py", "return 2 * tensors_bytes(trainable)",
      "return tensors_bytes(trainable)", (TERMS, *HAND), "issue"),
    M("memory: algorithm networks dropped", "neighbor_grpo/plan/memory.py",
      "return len(networks) * copy_bytes(net, dtype)", "return 0", (TERMS, *HAND), "issue"),
    M("memory: latents at 2 bytes", "neighbor_grpo/plan/memory.py", "return 4 * int(torch.Size(latent_shape)",
      "return 2 * int(torch.Size(latent_shape)", (TERMS, *HAND), "issue"),
    M("memory: gradients counted twice", "neighbor_grpo/plan/memory.py",
      '"""One gradient per trainable parameter, in its dtype (kept from one optimizer step to the next)."""\n'
      "    return trainable_bytes(net)",
      '"""One gradient per trainable parameter, in its dtype (kept from one optimizer step to the next)."""\n'
      "    return 2 * trainable_bytes(net)", (TERMS, *HAND), "issue"),
    M("planner: a no-grad call inside the loss adds no saved activations", "neighbor_grpo/plan/planner.py",
      "peaks[phase.name] = (peak + saved, grads)", "peaks[phase.name] = (peak, grads)", (TERMS, "-k", "composes"),
      "issue"),
    M("planner: dtype bytes always float32", "neighbor_grpo/plan/planner.py",
      "dtype_bytes = torch.finfo(gpu_dtype(config)).bits // 8", "dtype_bytes = 4", (TERMS, "-k", "plan"), "issue"),
    # ---- item 11: backward per trained step ----
    M("sde: step part weighted 1 instead of 1/K", "neighbor_grpo/algorithms/sde.py",
      "steps=[j]), 1 / len(batch.steps))", "steps=[j]), 1.0)", (SDE, "-k", "backward_per_step")),
    M("sde: each part holds every step", "neighbor_grpo/algorithms/sde.py", "dataclasses.replace(batch, steps=[j])",
      "dataclasses.replace(batch, steps=list(batch.steps))",
      (SDE, "tests/algorithms/test_call_schedule.py", "-k", "backward_per_step or (held and grpo)")),
    M("sde: Phase.held back to the trained steps", "neighbor_grpo/algorithms/sde.py",
      'Phase("train", units, batch, True, "policy", held=1)',
      'Phase("train", units, batch, True, "policy", held=trained_steps)',
      ("tests/algorithms/test_call_schedule.py", "-k", "held and grpo")),
    M("flow_grpo: one part for the whole minibatch", "neighbor_grpo/algorithms/flow_grpo.py",
      "return step_losses(batch)", "return [(batch, 1.0)]", (SDE, "-k", "backward_per_step")),
    M("dance_grpo: one part for the whole minibatch", "neighbor_grpo/algorithms/dance_grpo.py",
      "return step_losses(batch)", "return [(batch, 1.0)]", (SDE, "-k", "backward_per_step")),
    M("mix_grpo: one part for the whole minibatch", "neighbor_grpo/algorithms/mix_grpo.py",
      "return step_losses(batch)", "return [(batch, 1.0)]", (SDE, "-k", "backward_per_step")),
    M("iteration: part weight left out of the loss", "neighbor_grpo/training/iteration.py",
      "part = share * piece_weight", "part = share", (SDE, "-k", "backward_per_step")),
    M("iteration: parts of the first pass only", "neighbor_grpo/training/iteration.py",
      "parts = loss_parts(pieces[2])", "parts = loss_parts(pieces[2])[:1]", (SDE, "-k", "backward_per_step")),
    # ---- item 12: float32 numerics ----
    M("flow: full_precision never upcasts", "neighbor_grpo/maths/flow.py", "torch.finfo(t.dtype).bits < 32",
      "torch.finfo(t.dtype).bits < 16", ("tests/maths/test_flow.py", "-k", "full_precision")),
    M("flow: full_precision narrows float64", "neighbor_grpo/maths/flow.py",
      "return t.float() if t.is_floating_point() and", "return t.float() if t.is_floating_point() or",
      ("tests/maths/test_flow.py", "-k", "full_precision")),
    M("sde: Flow-GRPO mean in the input dtype", "neighbor_grpo/algorithms/sde.py",
      "    sigma_t = flow_grpo_noise_scale(s, noise_level, s_1)\n    x, v = full_precision(x), full_precision(v)",
      "    sigma_t = flow_grpo_noise_scale(s, noise_level, s_1)", (HALF,)),
    M("sde: DanceGRPO mean in the input dtype", "neighbor_grpo/algorithms/sde.py",
      "    ds = s_next - s\n    x, v = full_precision(x), full_precision(v)", "    ds = s_next - s", (HALF,)),
    M("sde: CPS mean in the input dtype", "neighbor_grpo/algorithms/sde.py",
      "    sigma = cps_noise_std(s_next, eta)\n    x, v = full_precision(x), full_precision(v)",
      "    sigma = cps_noise_std(s_next, eta)", (HALF,)),
    M("sde: Gaussian log-prob in the input dtype", "neighbor_grpo/algorithms/sde.py",
      '    """\n    x_next, mean = full_precision(x_next), full_precision(mean)', '    """', (HALF,)),
    M("sde: CPS code log-prob in the input dtype", "neighbor_grpo/algorithms/sde.py",
      '    signature of gaussian_log_prob."""\n    x_next, mean = full_precision(x_next), full_precision(mean)',
      '    signature of gaussian_log_prob."""', (HALF,)),
    M("sde: Flow-GRPO step's sample left in float32", "neighbor_grpo/algorithms/sde.py",
      "return SDEStep(_sample(mean, std, noise, generator).to(x.dtype), mean, std)\n\n\n# ---- DanceGRPO",
      "return SDEStep(_sample(mean, std, noise, generator), mean, std)\n\n\n# ---- DanceGRPO", (HALF,)),
    M("neighbor_grpo: leap in the input dtype", "neighbor_grpo/algorithms/neighbor_grpo.py",
      "return full_precision(x) + (s_next - s) * full_precision(v)", "return x + (s_next - s) * v", (HALF,)),
    M("neighbor_grpo: distances in the input dtype", "neighbor_grpo/algorithms/neighbor_grpo.py",
      "diff = full_precision(candidates).unsqueeze(1) - full_precision(predictions).unsqueeze(2)",
      "diff = candidates.unsqueeze(1) - predictions.unsqueeze(2)", (HALF,)),
    M("neighbor_grpo: anchoring term in the input dtype", "neighbor_grpo/algorithms/neighbor_grpo.py",
      "(full_precision(v) - full_precision(v_ref)).pow(2).mean()", "(v - v_ref).pow(2).mean()",
      (HALF,)),
    # ---- item 10: fp32 master weights ----
    M("speed: master weights for an explicit bfloat16 too", "neighbor_grpo/training/speed.py",
      'and model_dtype == "auto" and', 'and model_dtype in ("auto", "bfloat16") and', (SPEED, "-k", "master")),
    M("speed: master weights on any device", "neighbor_grpo/training/speed.py",
      'and device_type == "cuda" and half', "and half", (SPEED, "-k", "master")),
    M("speed: master weights for bf16 only", "neighbor_grpo/training/speed.py",
      "half = loaded in (torch.bfloat16, torch.float16)", "half = loaded == torch.bfloat16", (SPEED, "-k", "master")),
    M("speed: master weights for LoRA too", "neighbor_grpo/training/speed.py", 'return finetune == "full" and',
      "return", (SPEED, "-k", "master")),
    M("speed: fp16 overridden by bf16", "neighbor_grpo/training/speed.py",
      'if master_weights and mixed_precision == "no" else', "if master_weights else", (SPEED, "-k", "master")),
    M("parts: no upcast", "neighbor_grpo/training/parts.py", "    if master:  # after", "    if False:  # after",
      (SPEED, "-k", "pure_bf16")),
    M("parts: no bf16 autocast for master weights", "neighbor_grpo/training/parts.py",
      "precision = compute_precision(speed.mixed_precision, master)", "precision = speed.mixed_precision",
      (SPEED, "-k", "pure_bf16")),
    M("trace: the planner's net not upcast", "neighbor_grpo/plan/trace.py", "    if master_weights:\n        adapter",
      "    if False:\n        adapter", (TERMS, "-k", "master")),
    M("planner: copies counted in fp32", "neighbor_grpo/plan/planner.py",
      "copies = gpu_dtype(config) if traced.master_weights else None", "copies = None", (TERMS, "-k", "master")),
    M("planner: master weights decided for the CPU", "neighbor_grpo/plan/planner.py",
      'keeps_master_weights(config.model.dtype, "cuda",', 'keeps_master_weights(config.model.dtype, "cpu",',
      (TERMS, "-k", "master")),
    M("planner: traces without master weights' autocast", "neighbor_grpo/plan/planner.py",
      "precision = compute_precision(config.speed.mixed_precision, traced.master_weights)",
      "precision = config.speed.mixed_precision", (TERMS, "-k", "master or composes")),
    # ---- item 13: the planner's memory terms ----
    M("memory: copies ignore the loaded dtype", "neighbor_grpo/plan/memory.py", "    if dtype is None:\n        return weight_bytes",
      "    if True:\n        return weight_bytes", (TERMS, *HAND)),
    M("memory: 8-bit AdamW at 1 byte a parameter", "neighbor_grpo/plan/memory.py",
      '{"adamw": None, "adamw8bit": 2}', '{"adamw": None, "adamw8bit": 1}', (TERMS, *HAND)),
    M("memory: EMA without its shadow", "neighbor_grpo/plan/memory.py",
      "return trainable_bytes(net) if ema_decay > 0 else 0", "return 0", (TERMS, *HAND)),
    M("memory: LoRA keeps a reference copy", "neighbor_grpo/plan/memory.py",
      'if finetune == "full" and needs_reference else 0', "if needs_reference else 0", (TERMS, *HAND)),
    M("memory: prompt cache without the pooled embedding", "neighbor_grpo/plan/memory.py",
      "prompts * (tokens * width + pooled) * dtype_bytes", "prompts * tokens * width * dtype_bytes", (TERMS, *HAND)),
    M("memory: Neighbor GRPO without its neighbour noise", "neighbor_grpo/plan/memory.py",
      "return 2 * steps + 1 + 1", "return 2 * steps + 1", (TERMS, *HAND)),
    M("memory: SDE methods without their step noises", "neighbor_grpo/plan/memory.py", "return 3 * steps + 1",
      "return 2 * steps + 1", (TERMS, *HAND)),
    M("memory: images at 2 bytes", "neighbor_grpo/plan/memory.py", "return samples * 3 * height * width * 4",
      "return samples * 3 * height * width * 2", (TERMS, *HAND)),
    M("memory: DDP buckets on one GPU", "neighbor_grpo/plan/memory.py",
      "return gradient_bytes(net) if gpus > 1 and not fsdp else 0", "return gradient_bytes(net) if not fsdp else 0",
      (TERMS, *HAND)),
    M("memory: FSDP gathers one block", "neighbor_grpo/plan/memory.py", "return 2 * largest", "return largest",
      (TERMS, *HAND)),
    M("memory: sharding rounds down", "neighbor_grpo/plan/memory.py", "return -(-nbytes // shards)",
      "return nbytes // shards", (TERMS, *HAND)),
    M("planner: held calls not held", "neighbor_grpo/plan/planner.py", "return trace.peak_bytes + (held - 1) * trace.forward_bytes",
      "return trace.peak_bytes", (TERMS, "-k", "composes")),
    M("planner: saved activations of one held call", "neighbor_grpo/plan/planner.py",
      "saved = max(saved, trace.forward_bytes * phase.held)", "saved = max(saved, trace.forward_bytes)",
      (TERMS, "-k", "composes")),
    M("rules: area not divided by the x-range", "neighbor_grpo/bench/rules.py", "return area / (xs[-1] - xs[0])",
      "return area", ("tests/bench/test_rules.py",)),
]


def copy_tree(target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("neighbor_grpo", "tests"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")


def run_one(mutation: Mutation, tree: Path) -> tuple[str, float, str]:
    """'killed', 'survived' or 'error: ...', the seconds it took, and the last line pytest printed."""
    path = tree / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return f"error: the original text occurs {original.count(mutation.old)} times", 0.0, ""
    path.write_text(original.replace(mutation.old, mutation.new))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               *mutation.tests], cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        rc, lines = done.returncode, (done.stdout + done.stderr).strip().splitlines()
    except subprocess.TimeoutExpired:
        rc, lines = -1, ["timed out after 900 s"]
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    last = lines[-1] if lines else ""
    if rc == 0:
        return "survived", seconds, last
    if rc in (1, 2):  # a failed test, or an error while collecting (the mutation broke an import)
        return "killed", seconds, last
    return f"error: pytest exit {rc}", seconds, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run only the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"[{m.origin}] {m.name}: {m.file}")
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="ngrpo-mutations-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        for number, mutation in enumerate(chosen, 1):
            outcome, seconds, last = run_one(mutation, tree)
            results.append((mutation, outcome))
            print(f"{number:3d}/{len(chosen)} {outcome:9s} {seconds:6.1f} s  [{mutation.origin}] {mutation.name}"
                  f"{'  | ' + last if outcome != 'killed' else ''}", flush=True)
    for origin in ("issue", "fresh"):
        group = [outcome for m, outcome in results if m.origin == origin]
        if group:
            killed = sum(o == "killed" for o in group)
            errors = sum(o.startswith("error") for o in group)
            print(f"{origin}: {killed} of {len(group)} killed ({100 * killed / len(group):.0f}%), {errors} errors")
    killed = sum(o == "killed" for _, o in results)
    print(f"all: {killed} of {len(results)} killed")


if __name__ == "__main__":
    main()
