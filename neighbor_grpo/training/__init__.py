"""The training loop and its machinery: what a run trains with (`parts`), one rollout batch and its optimizer
steps (`iteration`), the loop itself (`trainer`), forward-equivalent cost (`cost`), one-GPU speed settings
(`speed`), guards against silent wrong results (`guards`), Ctrl-C at an iteration boundary (`interrupts`), held-out
evaluation and hacking monitors (`monitors`), and metrics logs and pictures (`logs`).

Spans layers (docs/design.md): `guards`, `interrupts` 0; `speed`, `monitors`, `logs` 1; `parts`, `iteration`,
`cost` 3; `trainer` 4. The run's folder and files are in `neighbor_grpo.runs`.
"""
