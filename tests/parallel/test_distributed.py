"""Training on several processes (neighbor_grpo/parallel/distributed.py): 2 CPU processes (gloo) started the way torchrun and
`accelerate launch` start them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment) must end with the
parameters of a 1-process run of the same global batch and seeds, to float tolerance, also when the prompts do not
split evenly (3 over 2), with micro-batches, and when one group spans both processes (1 prompt); a 2-process run
stopped and resumed ends like an uninterrupted one.

A tiny digits model (seconds to train) and a pixel reward that needs no classifier keep this fast."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.parallel.distributed import (Processes, batch_part, check_batch_fits, joins_process_group, member_block,
                                       slot_range)
from neighbor_grpo.runs.io import load_safetensors
from neighbor_grpo.training.trainer import train

pytestmark = pytest.mark.usefixtures("single_thread")

# 3 iterations of 3 prompts (uneven over 2 processes) x 4 candidates, 2 optimizer steps each, EMA on
BASE = ["iterations=3", "prompts_per_iteration=3", "prompts.train=['0','1','2','3','4']", "neighbor_grpo.group_size=4",
        "neighbor_grpo.num_anchors=2", "neighbor_grpo.rollout_steps=4", "eval.every=2", "eval.samples_per_prompt=2",
        "eval.steps=2", "prompts.eval=['0','1']", "checkpoint_every=1", "keep_checkpoints=5", "optim.lr=1e-3",
        "optim.ema_decay=0.5"]
# Flow-GRPO divides by the std of the whole batch (global_std): advantages need every process's rewards
FLOW_GRPO = ["algorithm=flow_grpo", "flow_grpo.group_size=4", "flow_grpo.rollout_steps=4", "flow_grpo.num_minibatches=2"]
# The forward-process methods: global std (every process's rewards), extra networks updated after the last step
FORWARD_PROCESS = {
    "diffusion_nft": ["algorithm=diffusion_nft", "diffusion_nft.group_size=4", "diffusion_nft.rollout_steps=4",
                      "diffusion_nft.num_minibatches=2", "diffusion_nft.old_decay=0"],
    "awm": ["algorithm=awm", "awm.group_size=4", "awm.rollout_steps=4", "awm.num_times=2", "speed.micro_batch=1"],
    # DGPO: group scores over whole groups, its EMA-old after each of 2 steps, rolling out from iteration 1 on
    "dgpo": ["algorithm=dgpo", "dgpo.group_size=4", "dgpo.rollout_steps=4", "dgpo.trunc_steps=3", "dgpo.num_times=2",
             "dgpo.num_minibatches=2", "dgpo.switch_ema_ref=1"],
}
# One prompt per iteration: its group spans both processes (fewer prompts than processes)
SPANNING = ["iterations=2", "prompts_per_iteration=1", "prompts.train=['0','1','2','3','4']", "eval.every=2",
            "eval.samples_per_prompt=2", "eval.steps=2", "prompts.eval=['0']", "checkpoint_every=2", "optim.lr=1e-3",
            "optim.ema_decay=0.5"]
SPANNING_ALGORITHMS = {
    # 4 candidates 2 + 2, 3 anchors 2 + 1 (unequal loss weights)
    "neighbor_grpo": ["neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=3", "neighbor_grpo.rollout_steps=4"],
    # 5 candidates 3 + 2 (padded gather); minibatches of 2, 2, 1 members: the last leaves process 1 without any
    # (a weight-0 pass), so the shares differ between minibatches
    "dance_grpo": ["algorithm=dance_grpo", "dance_grpo.group_size=5", "dance_grpo.rollout_steps=4",
                   "dance_grpo.num_minibatches=3"],
}

WORKER = textwrap.dedent(r'''
    import json, sys
    import torch
    torch.set_num_threads(1)
    import importlib
    from pathlib import Path
    tests = Path(sys.argv[1])
    sys.path[:0] = [str(tests), str(tests.parent / "models")]  # this folder's helpers, and the tiny pipelines
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.trainer import train

    run, overrides, stop_at, resume = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    module, factory = sys.argv[6].split(":")  # the rewards, built by a function of a test module
    rewards = getattr(importlib.import_module(module), factory)
    starts = []

    def stop(point):
        if point == "iteration_start":
            starts.append(1)
            if len(starts) == stop_at:
                raise KeyboardInterrupt

    try:
        train(load_config(None, overrides), run, resume=resume, progress=False, rewards=rewards(),
              fault_hook=stop if stop_at else None)
        outcome = "DONE"
    except KeyboardInterrupt:
        outcome = "STOPPED"
    # train() left the process group it joined, on both paths: nothing of gloo is left to the interpreter's exit
    assert not torch.distributed.is_initialized(), f"{outcome}, but the process group is still initialized"
    print(outcome, flush=True)
''')


def pixel_rewards():
    """A prompt-dependent pixel reward (no model to build): brightness of the rows the digit's value selects."""
    from neighbor_grpo.rewards import WeightedRewards

    def score(images, prompts):
        rows = torch.tensor([int(p) % images.shape[-2] for p in prompts], device=images.device)
        picked = images[torch.arange(len(prompts)), :, rows]  # (n, C, W)
        return picked.mean(dim=(1, 2)) - 0.5 * images.mean(dim=(1, 2, 3))

    return WeightedRewards({"pixels": score}, {"pixels": 1.0})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from neighbor_grpo.models.digits import DigitsAdapter, DigitsNetConfig

    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=32, depth=1, cond_dim=16), seed=0)
    with torch.no_grad():  # the output layer starts at zero; a little weight there lets every layer learn at once
        torch.nn.init.normal_(adapter.net.out.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("tiny") / "model"
    adapter.save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCH_TIMEOUT_S = 900  # a 2-process run takes ~20 s alone; a busy 2-core machine has taken several minutes
AFTER_FAILURE_S = 60  # once one worker failed, the others (maybe waiting in a collective) get this long to end


def wait_for_workers(workers: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait until every worker has ended; when one fails, give the others AFTER_FAILURE_S, then kill what is
    left (a worker blocked in a collective with a dead peer would otherwise wait out its hour-long timeout)."""
    deadline = time.monotonic() + timeout_s
    while any(worker.poll() is None for worker in workers) and time.monotonic() < deadline:
        if any(worker.returncode not in (None, 0) for worker in workers):
            deadline = min(deadline, time.monotonic() + AFTER_FAILURE_S)
        for worker in workers:
            if worker.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=0.5)  # returns as soon as it ends
                break


def launch(tmp_path: Path, run: Path, overrides: list[str], processes: int = 2, stop_at: int = 0,
           resume: bool = False, rewards: str = "test_distributed:pixel_rewards") -> list[str]:
    """Start `processes` workers with the environment torchrun / accelerate launch give them; their last lines.
    `rewards`: module:function (a module of tests/parallel or tests/models) that builds the workers' rewards.
    Their output goes to files, not pipes: a worker never blocks on a full pipe nobody is reading."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    workers, logs = [], []
    attempt = len(list(tmp_path.glob("worker-*-rank0.out")))
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        out, err = (tmp_path / f"worker-{attempt}-rank{rank}.{kind}" for kind in ("out", "err"))
        logs.append((out, err))
        with open(out, "w") as stdout, open(err, "w") as stderr:
            workers.append(subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent), str(run),
                                             json.dumps(overrides), str(stop_at), "1" if resume else "0", rewards],
                                            env=env, stdout=stdout, stderr=stderr, text=True))
    try:
        wait_for_workers(workers, LAUNCH_TIMEOUT_S)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for rank, (worker, (out, err)) in enumerate(zip(workers, logs)):
        assert worker.returncode == 0, (f"worker {rank} ended with {worker.returncode} (-9: killed after "
                                        f"{LAUNCH_TIMEOUT_S} s or after another worker failed):\n"
                                        f"{out.read_text()[-2000:]}\n{err.read_text()[-5000:]}")
    return [out.read_text().strip().splitlines()[-1] for out, _ in logs]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "aligned" / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics(run: Path, key: str) -> list[float]:
    import csv

    with open(run / "metrics.csv", newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def test_slots_split_whole_groups_evenly():
    for count in range(1, 12):
        for world in range(1, count + 1):
            blocks = [slot_range(count, rank, world) for rank in range(world)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_spanning_groups_cover_every_candidate_once():
    for count, group_size, world in [(1, 4, 2), (1, 12, 5), (2, 3, 5), (3, 2, 4), (8, 12, 32), (3, 5, 8), (5, 3, 5),
                                     (7, 2, 3)]:
        parts = [batch_part(count, group_size, rank, world) for rank in range(world)]
        owned = [(p, c) for part in parts for p in part.prompts
                 for c in (part.candidates if part.candidates is not None else range(group_size))]
        assert sorted(owned) == [(p, c) for p in range(count) for c in range(group_size)], (count, group_size, world)
        for part in parts:
            assert part.rank in part.peers and all(parts[r].prompts == part.prompts for r in part.peers)
            if count >= world:  # whole groups, as before
                assert part.candidates is None and part.prompts == slot_range(count, part.rank, world)
            else:  # one prompt each; the ranks of a prompt are contiguous, their blocks in rank order
                assert len(part.prompts) == 1 and part.candidates == slot_range(group_size, part.position, len(part.peers))
        if count < world:
            sizes = [len(part.peers) for part in parts if part.position == 0]
            assert len(sizes) == count and max(sizes) - min(sizes) <= 1
    # the members (anchors) of a shared prompt are split the same way; a process may get none
    assert [member_block(3, batch_part(1, 4, rank, 2)) for rank in range(2)] == [range(0, 2), range(2, 3)]
    assert len(member_block(1, batch_part(1, 4, 1, 2))) == 0


def test_more_processes_than_candidates_is_refused():
    check_batch_fits(1, Processes(0, 4), 4, "neighbor_grpo.group_size")  # one prompt, 4 processes, 1 candidate each
    check_batch_fits(3, Processes(0, 2), 2, "neighbor_grpo.group_size")
    with pytest.raises(ValueError, match=r"prompts_per_iteration: 2 prompts x neighbor_grpo.group_size=3 candidates "
                                         r"cannot be split over 8 processes \(a prompt would get 4 processes"):
        check_batch_fits(2, Processes(0, 8), 3, "neighbor_grpo.group_size")
    with pytest.raises(ValueError, match=r"prompts_per_iteration: 1 prompts x group_size 2 .* 3 processes"):
        batch_part(1, 2, 0, 3)


def test_a_process_group_joined_inside_is_left_on_every_way_out(tmp_path):
    """joins_process_group (on train()): the group is destroyed after a return, KeyboardInterrupt (a stop) or an
    error; a group the caller joined itself is left alone."""
    import torch.distributed as dist

    stores = iter(range(100))

    def join():
        store = dist.FileStore(str(tmp_path / f"store-{next(stores)}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    @joins_process_group
    def work(outcome):
        join()
        assert dist.is_initialized()
        if outcome is not None:
            raise outcome
        return "done"

    assert work(None) == "done" and not dist.is_initialized()
    for outcome in (KeyboardInterrupt, RuntimeError("reward failed")):
        with pytest.raises(type(outcome) if isinstance(outcome, Exception) else outcome):
            work(outcome)
        assert not dist.is_initialized(), outcome
    join()  # the caller's own group
    try:
        with pytest.raises(RuntimeError):
            joins_process_group(lambda: (_ for _ in ()).throw(RuntimeError("x")))()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Per algorithm, lazily: a 1-process run and a 2-process DDP run of it (3 prompts: 2 + 1)."""
    made = {}

    def get(algorithm: str) -> tuple[Path, Path, list[str]]:
        if algorithm not in made:
            folder = tmp_path_factory.mktemp(algorithm)
            overrides = BASE + [f"model.path={tiny_model}"]
            # Neighbor GRPO one prompt per forward/backward pass (gradient accumulation), Flow-GRPO all in one
            overrides += (FLOW_GRPO if algorithm == "flow_grpo" else FORWARD_PROCESS[algorithm]
                          if algorithm in FORWARD_PROCESS else ["speed.micro_batch=1"])
            train(load_config(None, overrides), folder / "single", progress=False, rewards=pixel_rewards())
            assert launch(folder, folder / "ddp", overrides) == ["DONE", "DONE"]
            made[algorithm] = (folder / "single", folder / "ddp", overrides)
        return made[algorithm]

    return get


@pytest.mark.parametrize("algorithm", ["neighbor_grpo", "flow_grpo", "diffusion_nft", "awm", "dgpo"])
def test_two_processes_match_one_process(tiny_model, runs, algorithm):
    single, ddp, _ = runs(algorithm)
    assert max_difference(weights(single), load_safetensors(tiny_model / "model.safetensors")) > 1e-3  # it trained
    assert json.loads((ddp / "run.json").read_text())["parallel"] == "ddp"
    difference = max_difference(weights(ddp), weights(single))
    print(f"{algorithm}: max |2-process DDP - 1-process| parameter difference {difference:.2e}")
    assert difference < 1e-5
    for key in ("reward_mean", "loss", "heldout/reward"):
        assert metrics(ddp, key) == pytest.approx(metrics(single, key), rel=1e-4, abs=1e-6), key
    assert metrics(ddp, "model_evals_per_iter") == metrics(single, "model_evals_per_iter")


@pytest.mark.parametrize("algorithm", list(SPANNING_ALGORITHMS))
def test_one_group_spans_two_processes(tiny_model, tmp_path, algorithm):
    """1 prompt on 2 processes: each rolls out its block of the group, the blocks are gathered, each trains its
    block of the anchors/members; the parameters end as in one process."""
    overrides = SPANNING + SPANNING_ALGORITHMS[algorithm] + [f"model.path={tiny_model}"]
    train(load_config(None, overrides), tmp_path / "single", progress=False, rewards=pixel_rewards())
    assert launch(tmp_path, tmp_path / "ddp", overrides) == ["DONE", "DONE"]
    single, ddp = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert max_difference(single, load_safetensors(tiny_model / "model.safetensors")) > 1e-4  # it trained
    difference = max_difference(ddp, single)
    print(f"{algorithm}, one group over 2 processes: max |2-process DDP - 1-process| parameter difference {difference:.2e}")
    assert difference < 1e-5
    for key in ("reward_mean", "reward_std", "loss", "ratio_mean", "clip_fraction", "heldout/reward"):
        assert metrics(tmp_path / "ddp", key) == pytest.approx(metrics(tmp_path / "single", key), rel=1e-4, abs=1e-6), key


def test_two_processes_resume_exactly(runs, tmp_path):
    _, straight, overrides = runs("flow_grpo")
    resumed = tmp_path / "resumed"
    assert launch(tmp_path, resumed, overrides, stop_at=3) == ["STOPPED", "STOPPED"]  # iteration 3 never ran
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["iter-000001", "iter-000002"]
    assert launch(tmp_path, resumed, overrides, resume=True) == ["DONE", "DONE"]
    assert_same_checkpoint(resumed, straight, 3)
    assert metrics(resumed, "reward_mean") == metrics(straight, "reward_mean")


@pytest.mark.parametrize("algorithm", ["neighbor_grpo", "diffusion_nft", "awm", "dgpo"])
def test_fsdp_saves_and_resumes(runs, tmp_path, algorithm):
    """FSDP2 (fully_shard) on CPU with gloo: checkpoints hold the whole tensors (the same files as 1 process), the
    algorithm's own networks (an old policy, an EMA copy) included; stopped after 2 iterations and resumed, the run
    ends with the 1-process run's parameters."""
    single, _, overrides = runs(algorithm)
    overrides = overrides + ["speed.parallel=fsdp"]
    run = tmp_path / "fsdp"
    assert launch(tmp_path, run, overrides, stop_at=3) == ["STOPPED", "STOPPED"]
    assert launch(tmp_path, run, overrides, resume=True) == ["DONE", "DONE"]
    assert json.loads((run / "run.json").read_text())["parallel"] == "fsdp"
    ours = load_safetensors(run / "checkpoints" / "iter-000003" / "model.safetensors")
    theirs = load_safetensors(single / "checkpoints" / "iter-000003" / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    extra = run / "checkpoints" / "iter-000003" / "algorithm.safetensors"
    networks = getattr(ALGORITHMS[algorithm], "networks", ())
    assert extra.exists() == bool(networks)
    if networks:
        ours = load_safetensors(extra)
        theirs = load_safetensors(single / "checkpoints" / "iter-000003" / "algorithm.safetensors")
        assert ours and {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        assert max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs) < 1e-5
    difference = max_difference(weights(run), weights(single))
    print(f"FSDP ({algorithm}) stopped and resumed: max |2-process - 1-process| parameter difference {difference:.2e}")
    assert difference < 1e-5
    assert metrics(run, "reward_mean") == pytest.approx(metrics(single, "reward_mean"), rel=1e-4, abs=1e-6)


def assert_same_checkpoint(run: Path, reference: Path, iteration: int) -> None:
    for name in ("model", "optimizer", "ema"):
        ours = load_safetensors(run / "checkpoints" / f"iter-{iteration:06d}" / f"{name}.safetensors")
        theirs = load_safetensors(reference / "checkpoints" / f"iter-{iteration:06d}" / f"{name}.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
