"""The reward server (`ngrpo serve-reward`, rewards/server.py) and the `remote` reward, on real loopback servers
(uvicorn on 127.0.0.1, ephemeral ports): exact float32, 8-bit PNG, batching across clients, health, bearer token,
size limit, bounded queue, and one-line errors naming the URL, the status or the field."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from neighbor_grpo.rewards import build_rewards  # noqa: E402
from neighbor_grpo.rewards.protocol import ProtocolError, encode_request  # noqa: E402
from neighbor_grpo.rewards.remote import RemoteRewardError  # noqa: E402
from neighbor_grpo.rewards.server import ServerThread, make_app  # noqa: E402


class NetReward:
    """A fixed random convolutional reward (every bit of the input moves it); records each call's batch."""

    def __init__(self, needs=(), delay: float = 0.0):
        generator = torch.Generator().manual_seed(3)
        self.conv, self.head = torch.randn(4, 3, 3, 3, generator=generator), torch.randn(4, generator=generator)
        self.needs, self.delay, self.calls = needs, delay, []
        self.entered = threading.Event()

    def __call__(self, images, prompts, **inputs):
        self.calls.append({"batch": len(prompts), **inputs})
        self.entered.set()
        time.sleep(self.delay)
        features = torch.nn.functional.conv2d(images, self.conv, padding=1).tanh().mean(dim=(2, 3))
        return (features @ self.head) * torch.tensor([len(p) for p in prompts], dtype=torch.float32)


def remote(url: str, **kwargs):
    return build_rewards([{"name": "remote", "kwargs": {"url": url, **kwargs}}]).rewards["remote"]


def test_float32_is_exact_and_png_is_the_reward_of_the_8_bit_images():
    reward = NetReward()
    images, prompts = torch.rand(5, 3, 12, 12), ["a", "bb", "ccc", "dd", "e"]
    with ServerThread(make_app(reward, "net")) as url:
        exact = remote(url, encoding="float32")(images, prompts)
        png = remote(url, encoding="png")(images, prompts)
    assert torch.equal(exact, reward(images, prompts))
    assert torch.equal(png, reward((images * 255).round() / 255, prompts))  # PNG is 8-bit, nothing else
    assert not torch.equal(png, exact)


def test_requests_of_several_clients_are_scored_in_one_call_and_keep_their_groups():
    reward = NetReward(needs=("group_ids",))
    app = make_app(reward, "net", max_batch=64, batch_wait_s=2.0)
    batches = {n: (torch.rand(4, 3, 8, 8), ["p"] * 4) for n in range(3)}
    results = {}
    with ServerThread(app) as url:
        clients = [remote(url, encoding="float32") for _ in range(3)]  # built (and /health read) before the race
        together = threading.Barrier(3)

        def client(n):
            images, prompts = batches[n]
            together.wait()
            results[n] = clients[n](images, prompts, group_ids=torch.tensor([7, 7, 9, 9]))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert [call["batch"] for call in reward.calls] == [12]  # three requests, one reward call
    ids = reward.calls[0]["group_ids"].view(3, 4)
    assert all(row[0] == row[1] != row[2] == row[3] for row in ids.tolist())
    assert len(set(ids.flatten().tolist())) == 6  # two groups per client, never merged across clients
    for n, (images, prompts) in batches.items():
        torch.testing.assert_close(results[n], NetReward()(images, prompts), rtol=1e-6, atol=1e-6)


def test_health_says_what_is_served_and_remote_mirrors_its_needs():
    with ServerThread(make_app(NetReward(needs=("group_ids",)), "judge", max_queue=5)) as url:
        health = httpx.get(f"{url}/health").json()
        assert health == {"status": "ok", "protocol": 1, "reward": "judge", "needs": ["group_ids"], "queued": 0,
                          "max_queue": 5, "max_batch": 64}
        assert remote(url).needs == ("group_ids",)


def test_editing_rewards_get_their_source_images_and_metrics_come_back():
    class Consistency(NetReward):
        def extra_metrics(self, images, prompts):
            return {"mean_brightness": float(images.mean())}

    reward = Consistency(needs=("source_images",))
    images, sources = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    with ServerThread(make_app(reward, "consistency")) as url:
        client = remote(url, encoding="float32", metrics=True)
        assert client.needs == ("source_images",)
        weighted = build_rewards([{"name": "remote", "kwargs": {"url": url, "encoding": "float32", "metrics": True}}])
        weighted.rewards["remote"] = client
        scores = weighted.score(images, ["a"] * 3, source_images=sources)["remote"]
        assert torch.equal(reward.calls[-1]["source_images"], sources) and scores.shape == (3,)
        assert client.last_metrics == {"mean_brightness": pytest.approx(float(images.mean()), abs=1e-7)}
        body = encode_request(images, ["a"] * 3, "float32")  # without the source images the reward needs
        reply = httpx.post(f"{url}/v1/score", json=body)
        assert reply.status_code == 422 and reply.json()["detail"].startswith("source_images: reward 'consistency' needs it")


def test_bearer_token_size_limit_and_malformed_fields_are_refused_in_one_line(monkeypatch):
    app = make_app(NetReward(), "net", token="s3cret", max_request_bytes=20_000)
    with ServerThread(app) as url:
        with pytest.raises(RemoteRewardError, match=rf"^remote reward {url}/v1/score: HTTP 401 \(authorization: "):
            remote(url, needs=[])(torch.rand(1, 3, 8, 8), ["a"])
        monkeypatch.setenv("REWARD_TOKEN", "s3cret")
        good = remote(url, needs=[], token_env="REWARD_TOKEN", encoding="float32")
        assert good(torch.rand(2, 3, 8, 8), ["a", "b"]).shape == (2,)
        with pytest.raises(RemoteRewardError, match=r"HTTP 413 \(request of \d+ bytes is over the server's limit"):
            good(torch.rand(2, 3, 64, 64), ["a", "b"])
        with pytest.raises(RemoteRewardError, match=r"request of \d+ bytes is over max_request_mb=0.001; raise it"):
            remote(url, needs=[], token_env="REWARD_TOKEN", max_request_mb=0.001)(torch.rand(2, 3, 64, 64), ["a", "b"])
        headers = {"authorization": "Bearer s3cret"}
        body = encode_request(torch.rand(2, 3, 8, 8), ["a"], "float32")
        reply = httpx.post(f"{url}/v1/score", json=body, headers=headers)
        assert reply.status_code == 422 and reply.json()["detail"] == "prompts: expected a list of 2 strings, one per image"
        body = {**encode_request(torch.rand(1, 3, 8, 8), ["a"], "float32"), "protocol": 2}
        assert httpx.post(f"{url}/v1/score", json=body, headers=headers).json()["detail"] == \
            "request.protocol: expected 1, got 2"
        body = {**encode_request(torch.rand(1, 3, 8, 8), ["a"], "png"), "images": ["bm90IGEgcG5n"]}
        assert httpx.post(f"{url}/v1/score", json=body, headers=headers).json()["detail"] == \
            "images[0]: not a readable PNG image"


def test_a_full_queue_answers_503_and_a_patient_client_gets_its_scores():
    reward = NetReward(delay=1.0)
    app = make_app(reward, "slow", max_batch=1, max_queue=1, batch_wait_s=0.0)
    images = torch.rand(1, 3, 8, 8)
    with ServerThread(app) as url:
        first = threading.Thread(target=lambda: remote(url, needs=[])(images, ["a"]))
        first.start()
        assert reward.entered.wait(10)  # the worker is busy with the first request
        second = threading.Thread(target=lambda: remote(url, needs=[])(images, ["b"]))
        second.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(RemoteRewardError, match=rf"^remote reward {url}/v1/score: HTTP 503 \(queue full .*\) "
                                                    r"after 1 attempts$"):
            remote(url, needs=[], retries=0)(images, ["c"])
        patient = remote(url, needs=[], retries=5, backoff=0.2)(images, ["d"])  # retried after Retry-After
        first.join(), second.join()
    assert patient.shape == (1,) and len(reward.calls) == 3


def test_an_unreachable_server_names_the_url_and_the_attempts():
    with ServerThread(make_app(NetReward(), "net")) as url:
        pass  # started and stopped: nothing listens there any more
    with pytest.raises(RemoteRewardError, match=rf"^remote reward {url}/health: unreachable \(ConnectError"):
        remote(url)
    with pytest.raises(RemoteRewardError, match=rf"^remote reward {url}/v1/score: ConnectError .* after 3 attempts$"):
        remote(url, needs=[], retries=2, backoff=0.01)(torch.rand(1, 3, 8, 8), ["a"])


def test_ngrpo_serve_reward_serves_a_registered_reward(tmp_path):
    """The command itself, as a user starts it: a real process serving jpeg_compressibility."""
    import socket

    with socket.socket() as probe:  # a free port for the child to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "neighbor_grpo.cli", "serve-reward", "jpeg_compressibility",
                               "quality=90", "--host", "127.0.0.1", "--port", str(port), "--max-batch", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        images = torch.rand(3, 3, 16, 16)
        local = build_rewards([{"name": "jpeg_compressibility", "kwargs": {"quality": 90}}]).rewards["jpeg_compressibility"]
        assert torch.equal(remote(url, encoding="png")(images, ["a"] * 3), local((images * 255).round() / 255, ["a"] * 3))
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert f"serving reward 'jpeg_compressibility' on http://127.0.0.1:{port}" in output


def test_garbage_nan_and_slow_replies(tmp_path):
    """Servers that misbehave: a wrong field is one line naming it; null scores are NaN (the update is skipped by
    the trainer's policy); a server slower than the timeout is retried, then named."""
    import fastapi
    from fastapi.responses import Response

    app = fastapi.FastAPI()

    @app.post("/garbage/v1/score")
    def garbage():
        return {"protocol": 1, "scores": "high"}

    @app.post("/short/v1/score")
    def short():
        return {"protocol": 1, "scores": [0.5]}

    @app.post("/nan/v1/score")
    def nan():
        return Response('{"protocol": 1, "scores": [0.5, null]}', media_type="application/json")

    @app.post("/slow/v1/score")
    def slow():
        time.sleep(1.0)
        return {"protocol": 1, "scores": [0.5, 0.5]}

    images = torch.rand(2, 3, 8, 8)
    with ServerThread(app) as url:
        with pytest.raises(ProtocolError, match=rf"^remote reward {url}/garbage/v1/score: reply scores: expected a "
                                                r"list of 2 numbers \(one per image\), got str$"):
            remote(f"{url}/garbage", needs=[])(images, ["a", "b"])
        with pytest.raises(ProtocolError, match=r"reply scores: expected a list of 2 numbers \(one per image\), got 1 values"):
            remote(f"{url}/short", needs=[])(images, ["a", "b"])
        scores = remote(f"{url}/nan", needs=[])(images, ["a", "b"])
        assert scores[0] == 0.5 and scores[1].isnan()
        with pytest.raises(RemoteRewardError, match=rf"^remote reward {url}/slow/v1/score: ReadTimeout .* after 2 attempts$"):
            remote(f"{url}/slow", needs=[], timeout=0.2, retries=1, backoff=0.01)(images, ["a", "b"])
        assert torch.equal(remote(f"{url}/slow", needs=[], timeout=5)(images, ["a", "b"]), torch.full((2,), 0.5))


def test_serve_reward_refuses_bad_arguments_in_one_line(capsys):
    from neighbor_grpo.cli import main

    assert main(["serve-reward", "jpeg_compressibility", "quality"]) == 2
    assert capsys.readouterr().err.strip() == ("ngrpo serve-reward: error: serve-reward: 'quality' is not key=value "
                                               "(the reward's kwargs, e.g. path=/weights/PickScore)")
    assert main(["serve-reward", "jpeg_compressibility", "--max-queue", "0"]) == 2
    assert capsys.readouterr().err.strip() == "ngrpo serve-reward: error: --max-queue: expected an integer >= 1, got 0"
    assert main(["serve-reward", "jpeg_compressibility", "--token-env", "NGRPO_TEST_UNSET_TOKEN"]) == 2
    assert "--token-env: the environment variable 'NGRPO_TEST_UNSET_TOKEN' is not set" in capsys.readouterr().err


def test_a_client_that_gives_up_does_not_stall_the_server():
    """A request whose client times out while it waits (its handler is cancelled) is dropped; the worker goes on
    and later requests are answered."""
    reward = NetReward(delay=0.6)
    images = torch.rand(1, 3, 8, 8)
    with ServerThread(make_app(reward, "slow", max_batch=1, batch_wait_s=0.0)) as url:
        impatient = [threading.Thread(target=lambda: pytest.raises(RemoteRewardError, remote(url, needs=[], timeout=0.2,
                                                                                              retries=0), images, ["a"]))
                     for _ in range(3)]
        [t.start() for t in impatient]
        [t.join() for t in impatient]
        assert torch.equal(remote(url, needs=[], encoding="float32", timeout=30)(images, ["b"]), NetReward()(images, ["b"]))
