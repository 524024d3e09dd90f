"""FLOP formulas for the attention kernels torch's FlopCounterMode has none for.

On CPU, F.scaled_dot_product_attention dispatches to aten._scaled_dot_product_flash_attention_for_cpu (and its
backward), which torch.utils.flop_counter does not list: without a formula every attention is counted as 0 FLOPs,
about 8% of FLUX.1's forward at 512 px and 16% at 1024 px. The formulas are torch's own for the CUDA kernels
(sdpa_flop_count: 2 matmuls of 2*B*H*Nq*Nk*d; the backward recomputes the scores and forms 4 more products,
2.5x the forward), applied to the CPU op's arguments.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils import flop_counter


def cpu_attention_ops() -> dict:
    """The CPU attention ops this torch has, each with its formula; empty where the op does not exist."""
    aten = torch.ops.aten
    ops = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        ops[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_attention_forward_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        ops[aten._scaled_dot_product_flash_attention_for_cpu_backward] = cpu_attention_backward_flops
    return ops


def cpu_attention_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """4*B*H*Nq*Nk*d (+ the value width): scores Q K^T and the weighted sum of V."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
    """The backward: recomputed scores, dV, dP, dQ, dK: 10*B*H*Nq*Nk*d."""
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_attention_flops() -> list:
    """Teach FlopCounterMode the CPU attention ops (idempotent; a torch that already counts them is left as it is).
    Returns the ops this call registered."""
    added = []
    for op, formula in cpu_attention_ops().items():
        if op in flop_counter.flop_registry:  # keyed by the op's overload packet
            continue
        flop_counter.register_flop_formula(op)(formula)
        added.append(op)
    return added


def unregister(ops: list) -> None:
    for op in ops:
        flop_counter.flop_registry.pop(op, None)


@contextlib.contextmanager
def cpu_attention_flops(enabled: bool = True):
    """FlopCounterMode counts CPU attention inside the block (enabled) or does not (disabled, as stock torch);
    the registry is restored on exit."""
    if enabled:
        added = register_cpu_attention_flops()
        try:
            yield
        finally:
            unregister(added)
    else:
        removed = {op: flop_counter.flop_registry[op] for op in cpu_attention_ops() if op in flop_counter.flop_registry}
        unregister(list(cpu_attention_ops()))
        try:
            yield
        finally:
            flop_counter.flop_registry.update(removed)
