"""Neighbor GRPO vs Flow-GRPO, DanceGRPO, MixGRPO(-Flash) at an equal forward-equivalent budget, scored on gold.

    python benchmarks/compare_algorithms.py --out benchmarks/results/compare.json
    (the same as: ngrpo compare --out benchmarks/results/compare.json)
"""

import sys

from neighbor_grpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
