"""Algorithms, picked by name from a plain dict. Each has the same small interface:
rollout -> advantages (+ clip) -> minibatches -> loss."""

from neighbor_grpo.algorithms.neighbor_grpo import NeighborGRPO, NeighborGRPOConfig

ALGORITHMS = {"neighbor_grpo": NeighborGRPO}

__all__ = ["ALGORITHMS", "NeighborGRPO", "NeighborGRPOConfig"]
