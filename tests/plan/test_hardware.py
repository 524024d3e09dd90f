"""neighbor_grpo/plan/hardware.py: the bf16 peak table."""

import torch

from neighbor_grpo.plan.hardware import bf16_peak_tflops


def test_peak_table_picks_the_specific_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.2)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bf16_peak_tflops("cuda", None)[0] == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert bf16_peak_tflops("cuda", None)[0] is None
    assert bf16_peak_tflops("cpu", None)[0] is None
