"""Fake tensors replay a real run's allocations: the peak live bytes of a LoRA FLUX forward + backward traced
under FakeTensorMode equal those of the same step run for real on CPU."""

from __future__ import annotations

import diffusers
import peft
import pytest
import torch

from neighbor_grpo.plan.live_bytes import LiveBytes, fake_mode, tensor_bytes, to_fake

CONFIG = dict(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def lora_flux(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return peft.get_peft_model(diffusers.FluxTransformer2DModel(**CONFIG), peft.LoraConfig(**LORA))


def train_step_peak(model, batch=2, image_tokens=256, text_tokens=16) -> tuple[int, LiveBytes]:
    tracker = LiveBytes(tensor_bytes(model.parameters()))
    with tracker:
        out = model(hidden_states=torch.randn(batch, image_tokens, 8), timestep=torch.full((batch,), 0.5),
                    encoder_hidden_states=torch.randn(batch, text_tokens, 32), pooled_projections=torch.randn(batch, 16),
                    img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3),
                    guidance=torch.full((batch,), 3.5), return_dict=False)[0]
        out.square().mean().backward()
        del out
    return tracker.peak, tracker


def test_fake_trace_peak_equals_the_real_run():
    mode = fake_mode()
    fake = to_fake(lora_flux("meta"), mode)
    assert all(type(p).__name__ == "FakeTensor" for p in fake.parameters())
    with mode:
        fake_peak, fake_tracker = train_step_peak(fake)
    real_peak, real_tracker = train_step_peak(lora_flux("cpu"))
    activations = real_peak - tensor_bytes(lora_flux("cpu").parameters())
    assert activations > 2**21  # the step allocates well above its weights: the comparison means something
    assert fake_peak == real_peak
    trained = [p for p in fake.parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, p in fake.named_parameters() if p.requires_grad)
    # what outlives the step is the LoRA gradients (plus, real only, tensors torch caches): nothing leaks into peak
    assert fake_tracker.live - tensor_bytes(fake.parameters()) >= tensor_bytes(p.grad for p in trained)


def test_tracker_frees_and_counts_views_once():
    x = torch.zeros(1024)  # made before: not counted
    with LiveBytes() as tracker:
        y = x + 1           # 4 KiB
        view = y[:10]       # same storage: counted once
        z = y * 2           # another 4 KiB, peak 8 KiB
        del y, z            # y's storage lives on through `view`
    assert tracker.peak == 8192 and tracker.live == 4096
    del view
    assert tracker.live == 0


def test_to_fake_rejects_a_real_model():
    with pytest.raises(ValueError, match="to_fake: expected a model built on the meta device"):
        to_fake(torch.nn.Linear(2, 2), fake_mode())
