"""Algorithms, picked by name from a plain dict. Each has the same small interface:
rollout -> advantages (+ clip) -> minibatches -> loss."""

from neighbor_grpo.algorithms.awm import AWM, AWMConfig
from neighbor_grpo.algorithms.dance_grpo import DanceGRPO, DanceGRPOConfig
from neighbor_grpo.algorithms.dgpo import DGPO, DGPOConfig
from neighbor_grpo.algorithms.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from neighbor_grpo.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from neighbor_grpo.algorithms.mix_grpo import MixGRPO, MixGRPOConfig
from neighbor_grpo.algorithms.neighbor_grpo import NeighborGRPO, NeighborGRPOConfig

ALGORITHMS = {"neighbor_grpo": NeighborGRPO, "flow_grpo": FlowGRPO, "dance_grpo": DanceGRPO, "mix_grpo": MixGRPO,
              "diffusion_nft": DiffusionNFT, "awm": AWM, "dgpo": DGPO}

__all__ = ["ALGORITHMS", "AWM", "AWMConfig", "DGPO", "DGPOConfig", "DiffusionNFT", "DiffusionNFTConfig", "DanceGRPO", "DanceGRPOConfig", "FlowGRPO", "FlowGRPOConfig", "MixGRPO", "MixGRPOConfig",
           "NeighborGRPO", "NeighborGRPOConfig"]
