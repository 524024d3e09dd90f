"""Faults (issue "Nothing lost, clear errors"): SIGKILL at any moment, interrupts, NaN/inf, failing rewards, a busy
run folder. Every recovery is checked against one uninterrupted run of the same small config, bit for bit (CPU).

Speed: the kill chain runs in ONE helper subprocess that imports torch once and forks a child per attempt; each
child is a real process that SIGKILLs itself at the chosen fault point, so only what it wrote to disk survives.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from neighbor_grpo.runs.checkpoint import latest_good_checkpoint, list_checkpoints, read_checkpoint, verify_checkpoint
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.runs.io import load_safetensors
from neighbor_grpo.rewards import WeightedRewards, build_rewards
from neighbor_grpo.runs.runfolder import RunFolder, RunFolderError
from neighbor_grpo.training.trainer import RewardFailed, TrainingAborted, train

# 6 iterations of 2 prompts x 4 candidates, 2 optimizer steps each, EMA on (so its shadow must be restored too),
# a checkpoint every 2 (4 tensor files each: model, optimizer, rng, ema), held-out evals after 3 and 6.
OVERRIDES = ["iterations=6", "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
             "neighbor_grpo.rollout_steps=4", "eval.every=3", "eval.samples_per_prompt=2", "eval.steps=4",
             "prompts.eval=['0','1','2']", "checkpoint_every=2", "keep_checkpoints=2", "optim.ema_decay=0.9"]
TRAIN_BATCH = 2 * 4  # images per training reward call (held-out calls score 3 x 2 = 6)

# (fault point, k): the k-th time the point is reached in that attempt, the process is SIGKILLed; the next attempt
# resumes. Fixed, so every run of the test kills at the same moments; comments give the moment (1-based iterations).
KILL_PLAN = [
    ("iteration_start", 1),       # fresh run, iteration 1 starts: nothing but eval_before exists, no checkpoint
    ("after_optimizer_step", 3),  # start over; iteration 2 mid-update, still no checkpoint
    ("checkpoint_file", 2),       # start over; the first checkpoint (2) half-written: model+optimizer files only
    ("after_checkpoint", 1),      # start over; checkpoint 2 complete, killed before pruning the leftover temporary
    ("after_rollout", 1),         # from 2: iteration 3 rolled out, not updated
    ("after_log", 2),             # from 2: iteration 3 evaluated + best/ exported, 4 logged, no checkpoint 4
    ("checkpoint_file", 4),       # from 2: checkpoint 4 has all tensor files but no state.json / manifest
    ("after_log", 3),             # from 2: checkpoint 4 complete, iteration 5 logged
    ("iteration_start", 2),       # from 4: iteration 6 starts
    ("after_optimizer_step", 4),  # from 4: iteration 6's last optimizer step
    ("checkpoint_file", 1),       # from 4: iteration 6 evaluated (best/ maybe replaced), final checkpoint begun
    ("after_checkpoint", 1),      # from 4: final checkpoint 6 complete, killed before aligned/ is exported
]

HELPER = textwrap.dedent(r'''
    import csv, json, os, signal, sys, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import torch._dynamo, sklearn.datasets, matplotlib  # lazily imported by training: import once, before forking
    matplotlib.use("Agg")
    import matplotlib.pyplot
    from torch.utils.tensorboard import SummaryWriter
    from neighbor_grpo.runs.checkpoint import list_checkpoints, verify_checkpoint
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.trainer import train

    run, overrides, plan = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    config = load_config(None, overrides)

    def attempt(resume, point, k):
        seen = [0]
        def kill_at(name):
            if name == point:
                seen[0] += 1
                if seen[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                train(config, run, resume=resume, progress=False, fault_hook=kill_at if point else None)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
        return f"exit {os.WEXITSTATUS(status)}"

    def standard_json(path):
        def refuse(token):
            raise ValueError(f"non-standard JSON token {token}")
        try:
            json.loads(path.read_text(), parse_constant=refuse)
            return True
        except ValueError:
            return False

    report = []
    for index, (point, k) in enumerate(plan + [[None, 0]]):
        outcome = attempt(index > 0, point, k)
        checkpoints = list_checkpoints(run / "checkpoints")
        iterations = []
        if (run / "metrics.csv").is_file():
            with open(run / "metrics.csv", newline="") as handle:
                iterations = [row["iteration"] for row in csv.DictReader(handle)]
        states_ok = all(standard_json(c / "state.json") for c in checkpoints)
        report.append({"point": point, "k": k, "outcome": outcome, "checkpoints": [c.name for c in checkpoints],
                       "verified": [verify_checkpoint(c) for c in checkpoints], "metrics_iterations": iterations,
                       "standard_json": states_ok,
                       "temporaries": sorted(p.name for p in (run / "checkpoints").glob(".tmp*"))
                       if (run / "checkpoints").is_dir() else []})
    print("REPORT " + json.dumps(report))
''')


def small_config(*extra):
    return load_config(None, OVERRIDES + list(extra))


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def column(run: Path, key: str) -> list[str]:
    return [row.get(key, "") for row in read_metrics(run)]


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_same_final_state(run: Path, reference: Path) -> None:
    """Exported weights, the final checkpoint's raw weights, optimizer and EMA, and the logged rewards."""
    assert_same_tensors(load_safetensors(run / "aligned" / "model.safetensors"),
                        load_safetensors(reference / "aligned" / "model.safetensors"), "aligned/")
    ours, _ = read_checkpoint(latest_good_checkpoint(run / "checkpoints"))
    theirs, _ = read_checkpoint(latest_good_checkpoint(reference / "checkpoints"))
    for group in ("model", "optimizer", "ema"):
        assert_same_tensors(ours[group], theirs[group], f"checkpoint {group}")
    assert column(run, "iteration") == column(reference, "iteration") == [str(i) for i in range(7)]
    assert column(run, "reward_mean") == column(reference, "reward_mean")
    assert column(run, "heldout/reward") == column(reference, "heldout/reward")


class ScriptedReward:
    """Wraps a real reward; on chosen training calls (counted from 1) returns NaN scores or raises."""

    def __init__(self, inner, nan_on=(), raise_on=(), raise_from=None, rising_heldout=False):
        self.inner, self.nan_on, self.raise_on, self.raise_from = inner, set(nan_on), set(raise_on), raise_from
        self.rising_heldout, self.heldout_calls = rising_heldout, 0
        self.training_calls = 0
        self.raised = 0

    def __call__(self, images, prompts):
        if len(prompts) != TRAIN_BATCH and self.rising_heldout:  # every held-out evaluation is a new best
            self.heldout_calls += 1
            return torch.full((len(prompts),), 0.1 * self.heldout_calls)
        if len(prompts) == TRAIN_BATCH:
            self.training_calls += 1
            call = self.training_calls
            if call in self.raise_on or (self.raise_from is not None and call >= self.raise_from):
                self.raised += 1
                raise ConnectionError(f"reward server unreachable (call {call})")
            if call in self.nan_on:
                return torch.full((len(prompts),), math.nan)
        return self.inner(images, prompts)

    def extra_metrics(self, images, prompts):
        return self.inner.extra_metrics(images, prompts)


def scripted_rewards(**script) -> tuple[WeightedRewards, ScriptedReward]:
    real = build_rewards([{"name": "digit_prob"}])
    reward = ScriptedReward(real.rewards["digit_prob"], **script)
    return WeightedRewards({"digit_prob": reward}, dict(real.weights)), reward


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def reference(builtin_models, tmp_path_factory):
    """The uninterrupted run every recovery must reproduce exactly."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    train(small_config(), run, progress=False)
    return run


def test_sigkill_at_any_moment_resumes_exactly(reference, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "kill_chain.py"
    script.write_text(HELPER)
    done = subprocess.run([sys.executable, str(script), str(run), json.dumps(OVERRIDES), json.dumps(KILL_PLAN)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(lines[-1][len("REPORT "):])

    assert [r["outcome"] for r in report] == ["killed"] * len(KILL_PLAN) + ["exit 0"], done.stderr[-5000:]
    for step in report:
        where = f"after the kill at {step['point']}#{step['k']}: {step}"
        assert all(step["verified"]), where  # no torn checkpoint is ever visible; the latest one always verifies
        assert step["standard_json"], where  # -inf/NaN counters are stored as null
        assert len(step["metrics_iterations"]) == len(set(step["metrics_iterations"])), where
    # where the kills left the newest checkpoint: none until the first one was complete, then 2, 4, 6
    assert [r["checkpoints"][-1] if r["checkpoints"] else None for r in report] == \
        [None, None, None, "iter-000002", "iter-000002", "iter-000002", "iter-000002", "iter-000004",
         "iter-000004", "iter-000004", "iter-000004", "iter-000006", "iter-000006"]

    # the kills mid-write did leave half-written checkpoints behind (never listed, cleaned up on resume)
    assert [bool(r["temporaries"]) for r in report] == [i in (2, 6, 10) for i in range(len(report))]

    assert_same_final_state(run, reference)
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["iter-000004", "iter-000006"]  # keep 2
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp", ".best"))]
    assert_same_tensors(load_safetensors(run / "best" / "model.safetensors"),
                        load_safetensors(reference / "best" / "model.safetensors"), "best/")
    best_meta = json.loads((run / "best" / "model.json").read_text())
    assert best_meta == json.loads((reference / "best" / "model.json").read_text())
    for name in ("eval_before.json", "eval_after.json"):
        assert json.loads((run / name).read_text()) == json.loads((reference / name).read_text()), name
    assert sorted(p.name for p in (run / "samples").iterdir()) == sorted(p.name for p in (reference / "samples").iterdir())
    metadata = json.loads((run / "run.json").read_text())  # kept from the first attempt, resumes appended
    assert metadata["versions"]["torch"] == torch.__version__
    assert [r["from_iteration"] for r in metadata["resumes"]] == [0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6]

    # TensorBoard: events after each resumed checkpoint were purged, so every step appears once, as uninterrupted
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(path: Path, tag: str) -> list[tuple[int, float]]:
        events = EventAccumulator(str(path / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    for tag in ("reward_mean", "heldout/reward"):
        assert scalars(run, tag) == scalars(reference, tag), tag
    assert [step for step, _ in scalars(run, "reward_mean")] == [1, 2, 3, 4, 5, 6]


def test_nonfinite_rewards_and_gradients_skip_the_update(builtin_models, tmp_path, monkeypatch):
    """Iteration 2's reward returns NaN, iteration 4's first gradient is inf: both updates are skipped whole —
    weights, optimizer moments and EMA identical before and after — counted, warned about, and training goes on."""
    rewards, reward = scripted_rewards(nan_on={2})
    real_clip, clips = torch.nn.utils.clip_grad_norm_, []
    started = []

    def clip(params, max_norm, *args, **kwargs):
        norm = real_clip(params, max_norm, *args, **kwargs)
        clips.append(len(started))
        if len(started) == 4 and clips.count(4) == 1:  # first minibatch of iteration 4
            return torch.tensor(math.inf)
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="update skipped") as caught:
        train(small_config("iterations=5", "checkpoint_every=1", "keep_checkpoints=10", "eval.every=0"), run,
              progress=False, rewards=rewards, fault_hook=lambda point: started.append(1) if point == "iteration_start" else None)
    messages = [str(w.message) for w in caught if "update skipped" in str(w.message)]
    assert len(messages) == 2 and "non-finite score(s)" in messages[0] and "gradients" in messages[1], messages
    states = {i: read_checkpoint(run / "checkpoints" / f"iter-{i:06d}") for i in range(1, 6)}
    for before, after in ((1, 2), (3, 4)):
        for group in ("model", "optimizer", "ema"):
            assert_same_tensors(states[before][0][group], states[after][0][group], f"{group} {before}->{after}")
    assert any(not torch.equal(states[2][0]["model"][k], v) for k, v in states[3][0]["model"].items())  # 3 updated
    assert column(run, "skipped_updates_total")[1:] == ["0", "1", "1", "2", "2"]
    assert column(run, "reward_mean")[2] == ""  # no reward logged for the skipped rollout
    assert states[5][1]["counters"]["nonfinite_in_row"] == 0 and states[5][1]["counters"]["nonfinite_total"] == 2


def test_nonfinite_updates_in_a_row_abort_with_a_checkpoint(builtin_models, tmp_path):
    rewards, _ = scripted_rewards(nan_on={2, 3, 4, 5, 6})
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="update skipped"), \
            pytest.raises(TrainingAborted, match=r"2 updates in a row had NaN/inf.*max_nonfinite_in_row=2") as error:
        train(small_config("max_nonfinite_in_row=2"), run, progress=False, rewards=rewards)
    assert "iter-000003" in str(error.value)
    latest = latest_good_checkpoint(run / "checkpoints")
    assert latest.name == "iter-000003" and verify_checkpoint(latest)  # the state after the aborting iteration
    _, state = read_checkpoint(latest)
    assert state["counters"]["nonfinite_in_row"] == 2
    assert column(run, "iteration") == ["0", "1", "2", "3"]


def test_a_reward_that_fails_once_is_retried(reference, tmp_path):
    rewards, reward = scripted_rewards(raise_on={3})
    with pytest.warns(UserWarning, match=r"reward 'digit_prob' raised ConnectionError.*retrying once"):
        train(small_config(), tmp_path / "run", progress=False, rewards=rewards)
    assert reward.raised == 1
    assert_same_final_state(tmp_path / "run", reference)  # the retry changed nothing


def test_a_reward_that_keeps_failing_stops_with_a_checkpoint_and_resumes_exactly(reference, tmp_path):
    """From iteration 4 on the reward raises: the run stops with the error, keeping the exact state after
    iteration 3 (nothing was updated in iteration 4 yet); resumed with a working reward it ends as uninterrupted."""
    run = tmp_path / "run"
    rewards, reward = scripted_rewards(raise_from=4)
    with pytest.warns(UserWarning, match="retrying once"), \
            pytest.raises(RewardFailed, match=r"reward 'digit_prob' failed twice in a row \(ConnectionError"):
        train(small_config(), run, progress=False, rewards=rewards)
    assert reward.raised == 2
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["iter-000002", "iter-000003"]
    assert verify_checkpoint(run / "checkpoints" / "iter-000003")
    train(small_config(), run, resume=True, progress=False)
    assert_same_final_state(run, reference)


def test_interrupts_save_a_consistent_checkpoint_and_resume_exactly(reference, tmp_path):
    """Ctrl-C (SIGINT) during iteration 3 lets it finish and saves checkpoint 3 (not a periodic one); a
    KeyboardInterrupt raised in the middle of iteration 5's update saves nothing partial (the run goes back to
    checkpoint 4). Both resumes together end exactly like the uninterrupted run."""
    run = tmp_path / "run"
    seen = []

    def sigint_in_iteration_3(point):
        seen.append(point)
        if point == "after_rollout" and seen.count("after_rollout") == 3:
            os.kill(os.getpid(), signal.SIGINT)

    previous_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(), run, progress=False, fault_hook=sigint_in_iteration_3)
    assert signal.getsignal(signal.SIGINT) is previous_handler  # the deferring handler is removed again
    assert seen.count("after_optimizer_step") == 6  # iteration 3 finished its update
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["iter-000002", "iter-000003"]
    assert column(run, "iteration")[-1] == "3"

    def interrupt_mid_update(point, steps=[0]):
        if point == "after_optimizer_step":
            steps[0] += 1
            if steps[0] == 3:  # iteration 4: 2 steps; iteration 5: its first of 2 steps
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_config(), run, resume=True, progress=False, fault_hook=interrupt_mid_update)
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["iter-000003", "iter-000004"]
    train(small_config(), run, resume=True, progress=False)
    assert_same_final_state(run, reference)


def test_lora_run_resumes_exactly(builtin_models, tmp_path):
    """LoRA: only the adapters are checkpointed; their random init is keyed by the seed (not by whatever state the
    global RNG is in), so a fresh run, and a run stopped mid-update and resumed, both match."""
    config = small_config("iterations=4", "optim.finetune=lora", "optim.lr=1e-3")
    train(config, tmp_path / "straight", progress=False)
    torch.rand(3)  # move the global RNG on: it must not matter

    def stop_mid_update(point, steps=[0]):
        if point == "after_optimizer_step":
            steps[0] += 1
            if steps[0] == 6:  # iteration 3, first of its 2 steps
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", progress=False, fault_hook=stop_mid_update)
    train(config, tmp_path / "resumed", resume=True, progress=False)
    for name in ("model.safetensors", "lora.safetensors"):
        assert_same_tensors(load_safetensors(tmp_path / "resumed" / "aligned" / name),
                            load_safetensors(tmp_path / "straight" / "aligned" / name), name)
    ours, _ = read_checkpoint(latest_good_checkpoint(tmp_path / "resumed" / "checkpoints"))
    theirs, _ = read_checkpoint(latest_good_checkpoint(tmp_path / "straight" / "checkpoints"))
    assert all("lora_" in key for key in ours["model"])
    for group in ("model", "optimizer", "ema"):
        assert_same_tensors(ours[group], theirs[group], group)


def test_best_export_always_matches_the_checkpoint_resumed_from(builtin_models, tmp_path):
    """best/ is written as soon as an evaluation beats the best so far, before the checkpoint that commits it; the
    committed one waits in .best-previous. Resuming from the checkpoint puts the committed best/ back."""
    rewards, _ = scripted_rewards(rising_heldout=True)
    config = small_config("iterations=5", "eval.every=1")
    run = tmp_path / "run"

    def stop_in_iteration_4(point, steps=[0]):
        if point == "after_optimizer_step":
            steps[0] += 1
            if steps[0] == 7:
                raise KeyboardInterrupt

    def stop_at_once(point):
        if point == "iteration_start":
            raise KeyboardInterrupt

    def best_iteration(folder):
        return json.loads((folder / "model.json").read_text())["iteration"]

    with pytest.raises(KeyboardInterrupt):
        train(config, run, progress=False, rewards=rewards, fault_hook=stop_in_iteration_4)
    assert latest_good_checkpoint(run / "checkpoints").name == "iter-000002"
    assert best_iteration(run / "best") == 3 and best_iteration(run / ".best-previous") == 2
    with pytest.raises(KeyboardInterrupt):
        train(config, run, resume=True, progress=False, rewards=rewards, fault_hook=stop_at_once)
    assert best_iteration(run / "best") == 2 and not (run / ".best-previous").exists()
    assert read_checkpoint(run / "checkpoints" / "iter-000002")[1]["counters"]["best_iteration"] == 2
    train(config, run, resume=True, progress=False, rewards=rewards)
    assert best_iteration(run / "best") == 5 and not (run / ".best-previous").exists()


HOLDER = textwrap.dedent('''
    import sys
    from neighbor_grpo.runs.runfolder import RunFolder
    folder = RunFolder(sys.argv[1], resume=True)
    print("locked", flush=True)
    sys.stdin.read()
''')


def test_a_run_folder_in_use_is_refused_and_a_dead_holder_leaves_no_lock(builtin_models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (False, True):
            with pytest.raises(RunFolderError, match=rf"is in use by another running process \(pid {holder.pid}\)"):
                train(small_config(), run, resume=resume, progress=False)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait()
    with RunFolder(run, resume=True):  # the OS released the dead process's lock
        pass


def test_bad_input_is_refused_with_a_message_naming_the_problem(builtin_models, tmp_path):
    from neighbor_grpo.config.train_config import ConfigError
    from neighbor_grpo.models import load_adapter

    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.lrr'\]"):
        load_config(None, ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match="iterations: expected an integer, got 'ten'"):
        load_config(None, ["iterations=ten"])
    with pytest.raises(ConfigError, match=r"neighbor_grpo.num_anchors: expected 1 <= B <= G = 4"):
        load_config(None, ["neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=6"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="expected a model folder holding model.json"):
        load_adapter(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        train(small_config(f"prompts.file={prompts}"), tmp_path / "run-prompts", progress=False)

    class WrongShape:
        def __call__(self, images, prompts):
            return torch.zeros(len(prompts), 1)

    with pytest.raises(ValueError, match=r"reward 'shape' returned scores of shape \(6, 1\); expected \(6,\)"):
        train(small_config(), tmp_path / "run-reward", progress=False, rewards=WeightedRewards({"shape": WrongShape()}))

    # a checkpoint that does not fit the model being trained (another architecture passed in code)
    from neighbor_grpo.models.digits import DigitsAdapter, DigitsNetConfig

    def stop_after_first_checkpoint(point):
        if point == "after_checkpoint":
            raise KeyboardInterrupt

    run = tmp_path / "run-fit"
    with pytest.raises(KeyboardInterrupt):
        train(small_config(), run, progress=False, fault_hook=stop_after_first_checkpoint)
    with pytest.raises(ValueError, match="does not fit the model being trained"):
        train(small_config(), run, resume=True, progress=False, adapter=DigitsAdapter.create(DigitsNetConfig(hidden=64)))
    with pytest.raises(ValueError, match=r"the inputs differ from those of checkpoint iter-000002: "
                                         r"neighbor_grpo.neighbor_sigma: 0.3 -> 0.5\."):
        train(small_config("neighbor_grpo.neighbor_sigma=0.5"), run, resume=True, progress=False)
