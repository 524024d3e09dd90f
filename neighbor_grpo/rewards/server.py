"""`ngrpo serve-reward`: any registered reward behind `POST /v1/score` (protocol.py) on FastAPI + uvicorn.

Requests wait in one bounded queue (full: 503 with Retry-After, which clients retry); a single worker takes what
is waiting, up to `max_batch` images, and scores requests of the same image size together in one reward call
(batching across clients), in a thread so the server keeps accepting. Group ids are renumbered per request so two
clients' groups never merge. `GET /health` says what is served and what it needs. Bodies over `max_request_bytes`
get 413, a missing or wrong bearer token 401, a malformed field 422 naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field

import torch

from neighbor_grpo.rewards import REWARD_INPUTS, reward_needs, score_one
from neighbor_grpo.rewards.protocol import PROTOCOL_VERSION, ProtocolError, decode_request, encode_reply


def import_server():
    try:
        import fastapi
        import uvicorn
    except ImportError as error:
        raise ImportError('serving a reward needs fastapi and uvicorn: pip install "neighbor-grpo[serve]"') from error
    return fastapi, uvicorn


@dataclass
class Job:
    images: torch.Tensor
    prompts: list[str]
    inputs: dict
    metrics: bool
    done: asyncio.Future = field(default=None)


def batch_scores(name: str, reward, jobs: list[Job]) -> list[tuple[torch.Tensor, dict]]:
    """One reward call over several requests of the same image size; each request's groups stay its own."""
    images = torch.cat([job.images for job in jobs])
    prompts = [p for job in jobs for p in job.prompts]
    inputs, offset, ids = {}, 0, []
    for job in jobs:
        given = job.inputs.get("group_ids", torch.arange(len(job.prompts)))
        renumbered = torch.unique(given, return_inverse=True)[1]
        ids.append(renumbered + offset)
        offset += int(renumbered.max()) + 1
    inputs["group_ids"] = torch.cat(ids)
    if all("source_images" in job.inputs for job in jobs):  # always, when the reward needs them (checked per request)
        inputs["source_images"] = torch.cat([job.inputs["source_images"] for job in jobs])
    with torch.no_grad():
        scores = score_one(name, reward, images, prompts, inputs)
    if not isinstance(scores, torch.Tensor) or scores.shape != (len(prompts),):
        raise TypeError(f"reward {name!r} returned {type(scores).__name__} "
                        f"{tuple(getattr(scores, 'shape', ()))}; expected a tensor of shape ({len(prompts)},)")
    results, start = [], 0
    for job in jobs:
        stop = start + len(job.prompts)
        metrics = reward.extra_metrics(job.images, job.prompts) if job.metrics and hasattr(reward, "extra_metrics") else {}
        results.append((scores[start:stop].float().cpu(), metrics))
        start = stop
    return results


def make_app(reward, name: str, max_batch: int = 64, max_queue: int = 64, batch_wait_s: float = 0.005,
             max_request_bytes: int = 64 * 2**20, token: str | None = None):
    """The FastAPI application serving `reward` (a built reward object) as `name`."""
    fastapi, _ = import_server()
    from fastapi.responses import JSONResponse

    needs = sorted(reward_needs(reward, name) - {"video"})
    state: dict = {}

    async def worker() -> None:
        queue: asyncio.Queue = state["queue"]
        carried: Job | None = None
        while True:
            jobs = [carried or await queue.get()]
            carried = None
            count, loop = len(jobs[0].prompts), asyncio.get_running_loop()
            deadline = loop.time() + batch_wait_s
            while count < max_batch:
                try:
                    job = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    break
                if count + len(job.prompts) > max_batch:
                    carried = job
                    break
                jobs.append(job)
                count += len(job.prompts)
            for shape in dict.fromkeys(tuple(job.images.shape[1:]) for job in jobs):
                same = [job for job in jobs if tuple(job.images.shape[1:]) == shape]
                try:
                    results = await asyncio.to_thread(batch_scores, name, reward, same)
                except Exception as error:  # the reward failed: every request of the batch hears why
                    results = [error] * len(same)
                for job, result in zip(same, results):
                    if job.done.done():  # its client gave up (timed out, disconnected): nobody is waiting
                        continue
                    if isinstance(result, Exception):
                        job.done.set_exception(result)
                    else:
                        job.done.set_result(result)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["queue"] = asyncio.Queue(maxsize=max_queue)
        task = asyncio.create_task(worker())
        yield
        task.cancel()

    app = fastapi.FastAPI(title=f"ngrpo reward server: {name}", lifespan=lifespan)

    def refuse(status: int, detail: str, **headers) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    @app.get("/health")
    async def health() -> dict:
        queue = state["queue"]
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "reward": name, "needs": needs,
                "queued": queue.qsize(), "max_queue": max_queue, "max_batch": max_batch}

    async def score(request):
        if token is not None and request.headers.get("authorization") != f"Bearer {token}":
            return refuse(401, "authorization: expected 'Bearer <token>' with the server's token")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return refuse(413, f"request of {int(declared)} bytes is over the server's limit of {max_request_bytes}")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > max_request_bytes:
                return refuse(413, f"request is over the server's limit of {max_request_bytes} bytes")
        try:
            data = json.loads(body)
            images, prompts, inputs = decode_request(data)
        except json.JSONDecodeError:
            return refuse(400, "request: not valid JSON")
        except ProtocolError as error:
            return refuse(422, str(error))
        missing = [need for need in needs if need != "group_ids" and need not in inputs]
        if missing:
            return refuse(422, f"{missing[0]}: reward {name!r} needs it ({REWARD_INPUTS[missing[0]]})")
        queue: asyncio.Queue = state["queue"]
        job = Job(images, prompts, inputs, data.get("metrics") is True,
                  asyncio.get_running_loop().create_future())
        try:
            queue.put_nowait(job)
        except asyncio.QueueFull:
            return refuse(503, f"queue full ({max_queue} requests waiting); retry later", **{"retry-after": "1"})
        try:
            scores, metrics = await job.done
        except Exception as error:
            return refuse(500, f"reward {name!r} raised {type(error).__name__}: {error}")
        return encode_reply(scores, metrics)

    score.__annotations__ = {"request": fastapi.Request}  # the real class: this module's annotations are strings
    app.post("/v1/score")(score)
    return app


class ServerThread:
    """A uvicorn server in a background thread of this process (tests, benchmarks): `with ServerThread(app) as url`.
    Port 0 picks a free ephemeral port; `url` has the real one."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        _, uvicorn = import_server()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.server.install_signal_handlers = lambda: None  # signals stay with the main thread
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"reward server on {self.host} did not start")
            threading.Event().wait(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(reward, name: str, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve until interrupted (`ngrpo serve-reward`)."""
    _, uvicorn = import_server()
    app = make_app(reward, name, **options)
    print(f"serving reward {name!r} on http://{host}:{port} (POST /v1/score, GET /health); Ctrl-C stops",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
