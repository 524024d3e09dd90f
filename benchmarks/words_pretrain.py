"""builtin:words pretraining, rerun in full (benchmark time, not CI: ~20 CPU-minutes on a quiet core).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/words_pretrain.py --out benchmarks/results/words_pretrain.json

Rebuilds the base with the default settings into a fresh folder (`--folder`, default a temporary one), and writes
its record: the legibility curve (held-out rapidocr exact match, mean reward, groups with spread) against CPU
seconds, the stopping step, the final check in groups of 12, and whether the weights equal the committed base's
(they do when torch, the CPU kernels and the thread count match those recorded in its pretrain.json).

    --first-steps tests/builtin/data/words_first_steps.json

instead records only the first 50 steps' losses and the EMA weights' hash, the reference the CI test
(tests/builtin/test_words_pretrain.py) compares with.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def main(argv=None) -> int:
    from neighbor_grpo.builtin.words_pretrain import (COMMITTED_BASE, RECORDED_LOSS_STEPS, WordsPretrainSettings,
                                                      pretrain_words, train_words_model, weights_sha256)
    from neighbor_grpo.runs.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON record of the full pretraining")
    parser.add_argument("--folder", help="where the rebuilt base goes (default: a temporary folder)")
    parser.add_argument("--first-steps", help="record only the first 50 steps' losses and weights hash here")
    args = parser.parse_args(argv)
    setup = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "threads": torch.get_num_threads()}
    if args.first_steps:
        pipeline, record = train_words_model(WordsPretrainSettings(), progress=False, max_steps=RECORDED_LOSS_STEPS)
        reference = {"command": "OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/words_pretrain.py --first-steps "
                                + args.first_steps, "losses": record["losses"],
                     "ema_weights_sha256": weights_sha256(pipeline), **setup}
        atomic_write_text(args.first_steps, json.dumps(reference, indent=1))
        return 0
    if not args.out:
        parser.error("give --out (the full rerun's record) or --first-steps")
    folder = Path(args.folder or tempfile.mkdtemp(prefix="words-base-"))
    record = pretrain_words(WordsPretrainSettings(), folder / "base")
    committed = COMMITTED_BASE / "pretrain.json"
    if committed.is_file():
        record["equals_committed_base"] = record["weights_sha256"] == json.loads(committed.read_text())["weights_sha256"]
    record["folder"], record["setup"] = str(folder / "base"), setup
    atomic_write_text(args.out, json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("heldout_final", "stopped_at", "train_cpu_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
