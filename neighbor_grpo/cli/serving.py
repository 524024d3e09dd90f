"""`ngrpo serve-reward`: any registered reward served over HTTP (rewards/server.py) for the `remote` reward of
other runs."""

from __future__ import annotations

import os


def _cmd_serve_reward(args) -> None:
    import yaml

    from neighbor_grpo.rewards import build_rewards
    from neighbor_grpo.rewards.server import serve

    kwargs = {}
    for item in args.kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"serve-reward: {item!r} is not key=value (the reward's kwargs, e.g. path=/weights/PickScore)")
        kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ValueError(f"--token-env: the environment variable {args.token_env!r} is not set")
    for name, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    reward = build_rewards([{"name": args.reward, "kwargs": kwargs}], device=args.device).rewards[args.reward]
    serve(reward, args.reward, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          batch_wait_s=args.batch_wait_ms / 1000, max_request_bytes=int(args.max_request_mb * 2**20), token=token)


def add_serve_reward_command(subparsers) -> None:
    srv = subparsers.add_parser("serve-reward", help="serve a registered reward over HTTP (POST /v1/score, GET /health) for "
                                              "the `remote` reward of other runs")
    srv.add_argument("reward", help="registered reward name or dotted path package.module:factory")
    srv.add_argument("kwargs", nargs="*", help="the reward's kwargs as key=value (YAML values)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--device", default="cpu", help="device of the reward model (e.g. cuda)")
    srv.add_argument("--max-batch", type=int, default=64, help="images per reward call, across clients")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503 (retried)")
    srv.add_argument("--batch-wait-ms", type=float, default=5.0,
                     help="how long the first waiting request waits for others to batch with")
    srv.add_argument("--max-request-mb", type=float, default=64.0, help="larger request bodies get 413")
    srv.add_argument("--token-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on /v1/score")
    srv.set_defaults(func=_cmd_serve_reward)
