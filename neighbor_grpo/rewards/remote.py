"""`remote`: a reward that lives in another process or machine, scored over HTTP (protocol.py) with httpx.

Each call is one `POST {url}/v1/score` with a timeout; a dropped connection, a timeout or a busy/failing server
(408, 429, 5xx) is retried `retries` times with exponential back-off, then the call raises one line naming the URL
and the status. The run's failure policy wraps that (rewards/retry.py: once more, then stop with a checkpoint of
the iteration boundary), so a server that dies mid-run loses nothing: `ngrpo train --resume RUN` when it is back.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import torch

from neighbor_grpo.rewards import REWARD_INPUTS, register_reward
from neighbor_grpo.rewards.protocol import ENCODINGS, ProtocolError, decode_reply, encode_request

RETRIED_STATUSES = {408, 429, 500, 502, 503, 504}


class RemoteRewardError(RuntimeError):
    """A reward server that could not be reached or refused the request; the message names the URL and status."""


def import_httpx():
    try:
        import httpx
    except ImportError as error:
        raise ImportError('the remote reward needs httpx: pip install "neighbor-grpo[serve]"') from error
    return httpx


class RemoteReward:
    """Scores images on a reward server. `needs` mirrors the served reward's (read from its /health)."""

    def __init__(self, url: str, encoding: str = "png", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, token_env: str | None = None, max_request_mb: float = 64.0,
                 needs: Sequence[str] | None = None, metrics: bool = False):
        httpx = import_httpx()
        if encoding not in ENCODINGS:
            raise ValueError(f"remote reward: encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
        if retries < 0 or backoff < 0 or timeout <= 0 or max_request_mb <= 0:
            raise ValueError("remote reward: expected retries >= 0, backoff >= 0, timeout > 0 and max_request_mb > 0; "
                             f"got {retries}, {backoff}, {timeout}, {max_request_mb}")
        self.base = url.rstrip("/").removesuffix("/v1/score")
        self.url = f"{self.base}/v1/score"
        self.encoding, self.retries, self.backoff, self.metrics = encoding, retries, backoff, metrics
        self.max_request_mb, self.max_request_bytes = max_request_mb, int(max_request_mb * 2**20)
        headers = {"content-type": "application/json"}
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise ValueError(f"remote reward {self.url}: token_env {token_env!r} is not set in the environment")
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.Client(timeout=timeout, headers=headers)
        needs = (needs,) if isinstance(needs, str) else needs
        self.needs = tuple(needs) if needs is not None else self._served_needs()
        unknown = sorted(set(self.needs) - (REWARD_INPUTS.keys() - {"video"}))
        if unknown:
            raise ValueError(f"remote reward {self.url}: needs {unknown} cannot travel; expected a subset of "
                             "['group_ids', 'source_images'] (videos are sent frame by frame)")
        self.last_metrics: dict[str, float] = {}

    def _served_needs(self) -> tuple[str, ...]:
        """What the served reward declared, from GET /health (one try: a run should not start against no server)."""
        health = f"{self.base}/health"
        try:
            reply = self.client.get(health)
        except Exception as error:
            raise RemoteRewardError(f"remote reward {health}: unreachable ({type(error).__name__}: {error}); start "
                                    "the server (ngrpo serve-reward) or pass kwargs.needs to build without it") from None
        if reply.status_code != 200:
            raise RemoteRewardError(f"remote reward {health}: HTTP {reply.status_code}; expected 200")
        try:
            needs = reply.json()["needs"]
        except (ValueError, KeyError, TypeError):
            raise RemoteRewardError(f"remote reward {health}: reply has no 'needs' list; is this an ngrpo reward "
                                    "server?") from None
        return tuple(needs)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], source_images: torch.Tensor | None = None,
                 group_ids: torch.Tensor | None = None) -> torch.Tensor:
        body = encode_request(images, prompts, self.encoding, source_images, group_ids)
        if self.metrics:
            body["metrics"] = True
        payload = json.dumps(body).encode()
        if len(payload) > self.max_request_bytes:
            raise RemoteRewardError(f"remote reward {self.url}: request of {len(payload)} bytes is over "
                                    f"max_request_mb={self.max_request_mb:g}; raise it (and the server's "
                                    "--max-request-mb) or lower speed.rollout_chunk")
        reply = post_with_retries(self.client, self.url, payload, self.retries, self.backoff, "remote reward")
        try:
            scores, self.last_metrics = decode_reply(reply, len(prompts))
        except ProtocolError as error:
            raise ProtocolError(f"remote reward {self.url}: reply {error}") from None
        return scores.to(images.device)

    def close(self) -> None:
        self.client.close()


def post_with_retries(client, url: str, payload: bytes, retries: int, backoff: float, what: str) -> object:
    """POST a JSON body; connection errors, timeouts and 408/429/5xx are retried `retries` times with back-off
    (honouring Retry-After); the reply's JSON, or one line naming `what`, the URL and the status."""
    httpx = import_httpx()
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            response = client.post(url, content=payload)
        except httpx.TransportError as error:  # refused, reset, timed out: worth another try
            if last:
                raise RemoteRewardError(f"{what} {url}: {type(error).__name__} ({error or 'no reply'}) after "
                                        f"{retries + 1} attempts") from None
            time.sleep(backoff * 2**attempt)
            continue
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError:
                raise ProtocolError(f"{what} {url}: reply is not JSON ({response.text[:80]!r})") from None
        if response.status_code not in RETRIED_STATUSES or last:
            tries = f" after {attempt + 1} attempts" if response.status_code in RETRIED_STATUSES else ""
            raise RemoteRewardError(f"{what} {url}: HTTP {response.status_code} ({_detail(response)}){tries}")
        time.sleep(max(backoff * 2**attempt, _retry_after(response)))
    raise AssertionError("unreachable")


def _detail(response) -> str:
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = response.text
    return " ".join(str(detail).split())[:200] or response.reason_phrase


def _retry_after(response) -> float:
    try:
        return min(float(response.headers.get("retry-after", 0)), 30.0)
    except ValueError:
        return 0.0


@register_reward("remote")
def make_remote(url: str, encoding: str = "png", timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                token_env: str | None = None, max_request_mb: float = 64.0, needs: Sequence[str] | None = None,
                metrics: bool = False) -> RemoteReward:
    """A reward served elsewhere (`ngrpo serve-reward`, or any server speaking protocol.py). `encoding: float32`
    sends exact arrays; `png` is 8-bit and interoperable. `token_env`: the environment variable holding a bearer
    token. `needs`: what to send besides images and prompts (default: what the server's /health says)."""
    return RemoteReward(url, encoding, timeout, retries, backoff, token_env, max_request_mb, needs, metrics)
