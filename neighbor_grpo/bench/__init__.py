"""`ngrpo compare`, the side-by-side benchmark: its rules as pure functions on curves (`rules`), what it runs
(`settings`), the task it trains and scores, chosen from the base (`tasks`: digits or words, with their proxy,
gold, prompts and realism reference), one method run (`method_run`), the tuning grid and seeds (`grid`), the
gold-free monitors' bands from the base model's spread (`bands`, also `python -m neighbor_grpo.bench.bands`),
an interrupted comparison's finished runs, reused by `--resume` (`resume`), worker processes (`workers`),
interleaved seconds per iteration (`throughput`), the command (`compare`) and its report (`report`, also
`python -m neighbor_grpo.bench.report`) with its plots (`plots`).

Spans layers (docs/design.md): `rules` 0; everything else 4.
"""
