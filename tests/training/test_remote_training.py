"""Training through a reward server (real uvicorn servers on 127.0.0.1, ephemeral ports): with float32 images it is
the in-process run bit for bit; a server that dies mid-iteration stops the run with a checkpoint of the iteration
boundary and the resumed run is exact; a server answering NaN skips that update, as any reward's NaN does."""

from __future__ import annotations

import csv
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from neighbor_grpo.config.train_config import load_config  # noqa: E402
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig  # noqa: E402
from neighbor_grpo.rewards.retry import RewardFailed  # noqa: E402
from neighbor_grpo.rewards.server import ServerThread, make_app  # noqa: E402
from neighbor_grpo.runs.checkpoint import latest_good_checkpoint, list_checkpoints, read_checkpoint  # noqa: E402
from neighbor_grpo.runs.io import load_safetensors  # noqa: E402
from neighbor_grpo.training.trainer import train  # noqa: E402

# 4 iterations of 2 prompts x 4 candidates in chunks of one prompt (two scoring calls of 4 images per iteration),
# held-out evaluations (3 prompts x 2 samples) after 2 and 4, a checkpoint every 2.
SETTINGS = ["iterations=4", "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
            "neighbor_grpo.rollout_steps=4", "eval.every=2", "eval.samples_per_prompt=2", "eval.steps=4",
            "prompts.eval=['0','1','2']", "checkpoint_every=2", "keep_checkpoints=3", "speed.rollout_chunk=1",
            "optim.lr=3e-3"]
CHUNK = 4  # images per training call


class NetReward:
    """A fixed random convolutional reward: every bit of the images moves its scores."""

    def __init__(self):
        generator = torch.Generator().manual_seed(11)
        self.conv, self.head = torch.randn(4, 1, 3, 3, generator=generator), torch.randn(4, generator=generator)

    def __call__(self, images, prompts):
        features = torch.nn.functional.conv2d(images, self.conv, padding=1).tanh().mean(dim=(2, 3))
        return (features @ self.head).sigmoid()


def net_reward():
    return NetReward()


class Scripted:
    """The served reward: on chosen training calls (1-based) it answers NaN, or shuts its server down after
    answering (the next request finds nothing listening)."""

    def __init__(self, nan_on=(), die_after=None):
        self.inner, self.nan_on, self.die_after, self.calls, self.server = NetReward(), set(nan_on), die_after, 0, None

    def __call__(self, images, prompts):
        scores = self.inner(images, prompts)
        if len(prompts) == CHUNK:
            self.calls += 1
            if self.calls in self.nan_on:
                scores = scores * float("nan")
            if self.calls == self.die_after:  # answer this request, but only once nothing listens any more
                threading.Thread(target=self.server.stop).start()
                deadline = time.monotonic() + 30
                while any(s.is_serving() for s in self.server.server.servers) and time.monotonic() < deadline:
                    time.sleep(0.01)
        return scores


def config(reward: dict, *extra):
    return load_config(None, SETTINGS + list(extra) + [f"rewards=[{reward}]"])


def remote_entry(url: str) -> dict:
    return {"name": "remote", "kwargs": {"url": url, "encoding": "float32", "retries": 1, "backoff": 0.05,
                                         "timeout": 30}}


def adapter():
    return DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)


def rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_run(run, reference) -> None:
    ours, theirs = (load_safetensors(r / "aligned" / "model.safetensors") for r in (run, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    (mine, _), (other, _) = (read_checkpoint(latest_good_checkpoint(r / "checkpoints")) for r in (run, reference))
    assert all(torch.equal(mine["optimizer"][k], other["optimizer"][k]) for k in other["optimizer"])
    for key in ("iteration", "reward_mean", "loss", "heldout/reward"):
        assert [r.get(key) for r in rows(run)] == [r.get(key) for r in rows(reference)], key


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("remote") / "in-process"
    train(config({"name": f"{__name__}:net_reward"}), run, progress=False, adapter=adapter())
    return run


def test_training_through_a_float32_server_equals_in_process_training(in_process, tmp_path):
    with ServerThread(make_app(NetReward(), "net")) as url:
        train(config(remote_entry(url)), tmp_path / "run", progress=False, adapter=adapter())
    assert_same_run(tmp_path / "run", in_process)


def test_a_server_that_dies_mid_iteration_loses_nothing(in_process, tmp_path):
    """The server answers the first chunk of iteration 3 and dies: the second chunk's request finds nothing, is
    retried, the run stops with a checkpoint of the state after iteration 2; resumed against a restarted server
    on the same address, the run ends bit for bit as the uninterrupted one."""
    run, reward = tmp_path / "run", Scripted(die_after=5)
    server = ServerThread(make_app(reward, "net"))
    reward.server = server
    with server as url:
        with pytest.warns(UserWarning, match=r"reward 'remote' raised RemoteRewardError: remote reward "
                                             rf"{url}/v1/score: ConnectError .* after 2 attempts; retrying once"), \
                pytest.raises(RewardFailed, match=r"reward 'remote' failed twice in a row \(RemoteRewardError"):
            train(config(remote_entry(url)), run, progress=False, adapter=adapter())
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["iter-000002"]
    port = int(url.rsplit(":", 1)[1])
    with ServerThread(make_app(NetReward(), "net"), port=port) as again:
        assert again == url
        train(config(remote_entry(url)), run, resume=True, progress=False, adapter=adapter())
    assert_same_run(run, in_process)


def test_a_server_answering_nan_skips_that_update(tmp_path):
    reward = Scripted(nan_on={3})  # iteration 2, first chunk
    with ServerThread(make_app(reward, "net")) as url:
        with pytest.warns(UserWarning, match=r"iteration 2: update skipped, non-finite reward scores: reward 'remote' "
                                             r"returned 4 non-finite score\(s\)"):
            train(config(remote_entry(url)), tmp_path / "run", progress=False, adapter=adapter())
    logged = rows(tmp_path / "run")
    assert [r["skipped_updates_total"] for r in logged[1:]] == ["0", "1", "1", "1"]
    assert logged[2]["reward_mean"] == ""
