"""What a device can do: dense bf16 peaks of accelerators (for MFU), and a one-line description of a device."""

from __future__ import annotations

import os
import platform

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOPS, matched as lower-case substrings
# of torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
BF16_DENSE_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("h100 nvl", 835.0), ("h100 pcie", 756.0), ("h100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("h200 nvl", 835.0), ("h200", 989.0),                         # GH200 contains "h200": same Hopper peak
    ("h800 pcie", 756.0), ("h800", 989.0), ("b200", 2250.0), ("a100", 312.0), ("a800", 312.0),
    ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("rtx 4090", 165.2), ("rtx 3090", 71.0),
]


def bf16_peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """The card's dense bf16 peak (TFLOPS) and where it came from; None on CPU or an unknown card."""
    if override:
        return override, "--peak-tflops"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    for key, tflops in BF16_DENSE_PEAK_TFLOPS:
        if key in name:
            return tflops, f"table entry {key!r} for {name!r}"
    return None, f"unknown card {name!r} (pass --peak-tflops)"


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"
