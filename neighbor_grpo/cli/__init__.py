"""The `ngrpo` command (`commands`: train, compare, plan, config and the parser of every command), `ngrpo demo`,
`ngrpo pretrain` and `ngrpo distill` (`builtin_commands`), `ngrpo sample` and `ngrpo eval` (`sampling`), `ngrpo serve-reward` (`serving`), and how a command
ends on a failure (`failures`).

Layer 5 (docs/design.md), the top: may import everything. `python -m neighbor_grpo.cli` runs `main`.
"""

from neighbor_grpo.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
