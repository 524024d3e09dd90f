"""The GPUs a plan can target: their memory as torch reports it, their dense bf16 peak, and what "fits" means."""

from __future__ import annotations

GIB = 2**30
# name -> (memory in GiB as torch.cuda reports it, key of hardware.BF16_DENSE_PEAK_TFLOPS); an "80 GB" card
# holds 79.2 GiB (H100 SXM: 85,031,714,816 bytes), the H200 139.8 GiB
GPUS = {"h100-80gb": (79.2, "h100"), "h100-pcie": (79.2, "h100 pcie"), "h100-nvl": (93.1, "h100 nvl"),
        "h200": (139.8, "h200"), "h800": (79.2, "h800"), "b200": (178.4, "b200"), "a100-80gb": (79.2, "a100"),
        "a100-40gb": (39.4, "a100"), "l40s": (44.4, "l40s"), "l4": (22.0, "l4"), "rtx-4090": (23.6, "rtx 4090"),
        "rtx-3090": (23.6, "rtx 3090")}
# What a process holds on the GPU besides its tensors: the CUDA context and kernels (~0.5-1 GiB with torch's
# libraries loaded), cuBLAS/cuDNN workspaces, the caching allocator's fragmentation; NCCL's buffers with >1 GPU.
ALLOWANCE_GIB = 2.0
NCCL_ALLOWANCE_GIB = 1.0
MARGIN = 1.1  # "fits": predicted peak x MARGIN + allowance <= GPU memory


def gpu_spec(gpu: str) -> tuple[float, float]:
    """(memory bytes, dense bf16 peak FLOP/s) of a GPU name."""
    from neighbor_grpo.plan.hardware import BF16_DENSE_PEAK_TFLOPS

    if gpu not in GPUS:
        raise ValueError(f"--gpu: unknown {gpu!r}; choose from {', '.join(GPUS)}")
    gib, key = GPUS[gpu]
    return gib * GIB, dict(BF16_DENSE_PEAK_TFLOPS)[key] * 1e12


def allowance_bytes(gpus: int) -> int:
    return int((ALLOWANCE_GIB + (NCCL_ALLOWANCE_GIB if gpus > 1 else 0)) * GIB)
