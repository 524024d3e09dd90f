"""Where `ngrpo compare`'s runs execute: in this process (--workers 1) or in N spawned worker processes, each with
one torch thread either way, so a run gives the same numbers wherever it runs. Jobs are run specs (compare_run) or
throughput timings (compare_throughput); a scheduler keeps every worker busy with the highest-priority ready job."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Callable

import torch

_WORKER: dict = {}  # in a worker process: the shared context and the rewards, loaded once


def _init_worker(context: dict) -> None:
    from neighbor_grpo.bench.method_run import load_rewards

    torch.set_num_threads(1)
    _WORKER["context"] = context
    _WORKER["rewards"] = load_rewards(context["device"], context.get("task", "digits"))


def _execute(job: dict):
    """A job in the current process (a worker's or, with one worker, the main one)."""
    context, (proxy, gold) = _WORKER["context"], _WORKER["rewards"]
    if job["kind"] == "run":
        from neighbor_grpo.bench.method_run import run_method

        return run_method(job["spec"], context, proxy, gold)
    from neighbor_grpo.bench.throughput import time_rows

    return time_rows(job["rows"], context, proxy, job["offset"], job["warmup"], job["iters"])


class RunPool:
    """`submit(job)` -> Future. One worker: the job runs at once, here, with one torch thread (the caller's thread
    count restored after); N workers: a pool of N spawned processes, one torch thread each."""

    def __init__(self, workers: int, context: dict):
        self.workers = workers
        self._executor = None
        if workers == 1:
            _init_worker_here(context)
        else:  # spawn: a fresh interpreter, no state forked from a threaded parent
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(context,))

    def submit(self, job: dict) -> Future:
        if self._executor is not None:
            return self._executor.submit(_execute, job)
        future: Future = Future()
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            future.set_result(_execute(job))
        except BaseException as error:  # noqa: BLE001 (handed to the scheduler, which re-raises it)
            if isinstance(error, KeyboardInterrupt):
                raise
            future.set_exception(error)
        finally:
            torch.set_num_threads(previous)
        return future

    def close(self, failed: bool = False) -> None:
        """Wait for the workers to exit; after an error or Ctrl-C, stop them at once (their runs are lost, the
        finished ones are in the partial JSON)."""
        if self._executor is not None:
            processes = list(getattr(self._executor, "_processes", {}).values())  # the pool's own worker processes
            self._executor.shutdown(wait=not failed, cancel_futures=True)
            if failed:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.join(timeout=10)
            self._executor = None

    def __enter__(self) -> "RunPool":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)


def _init_worker_here(context: dict) -> None:
    if _WORKER.get("context") is not context:
        from neighbor_grpo.bench.method_run import load_rewards

        _WORKER["context"] = context
        _WORKER["rewards"] = load_rewards(context["device"], context.get("task", "digits"))


def schedule(pool: RunPool, ready: list[tuple[tuple, dict]], finished: Callable[[dict, object], list]) -> None:
    """Run jobs until none is left: `ready` holds (priority, job), the lowest priority first; `finished(job,
    result)` returns the (priority, job) pairs that a result makes ready. An error in a job stops the schedule
    (jobs not started are cancelled) and is raised here."""
    in_flight: dict[Future, dict] = {}
    while ready or in_flight:
        while ready and len(in_flight) < pool.workers:
            ready.sort(key=lambda item: item[0])
            _, job = ready.pop(0)
            in_flight[pool.submit(job)] = job
        done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
        for future in sorted(done, key=lambda f: in_flight[f]["order"]):
            job = in_flight.pop(future)
            ready.extend(finished(job, future.result()))
