"""`ngrpo plan` knows FLUX.2 [dev], [klein] 4B / 9B and Z-Image: `arch:NAME` resolves to the family's adapter with the
shipped configs, and one velocity call and one decode trace through the real adapters (small images, meta weights)."""

import pytest
import torch

from neighbor_grpo.plan.architectures import FAMILY, MODELS
from neighbor_grpo.plan.models import resolve_model
from neighbor_grpo.plan.trace import make_traceable, meta_adapter, trace_decode, trace_velocity

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_new_model_has_a_family_and_its_text_encoder():
    assert set(FAMILY) <= set(MODELS)
    model = resolve_model("arch:flux2-dev", {})
    assert model.arch == "flux2" and model.spec["text"] == (512, 15360, 0)
    assert 23e9 < model.text_encoders["mistral-small-3.1-24b"] < 25e9
    assert resolve_model("arch:z-image", {"max_sequence_length": 256}).spec["text"] == (256, 2560, 0)
    assert resolve_model("arch:flux2-klein-9b", {}).arch == "flux2-klein"
    assert resolve_model("arch:flux-dev", {}).arch == "flux"  # FLUX.1 unchanged


def traced(name, cfg):
    spec = resolve_model(f"arch:{name}", {"max_sequence_length": 8})
    adapter = meta_adapter(spec.arch, spec.spec, 32, torch.bfloat16, {"cfg_scale": cfg})
    return make_traceable(adapter, {"rank": 4, "alpha": 4, "targets": adapter.default_lora_targets()}, True)


@pytest.mark.parametrize("name", ["flux2-klein-4b", "z-image"])  # [dev] runs the same adapter code as [klein]
def test_velocity_and_decode_trace_at_small_size(name):
    model = traced(name, 1.0)
    forward = trace_velocity(model, 2, grad=False)
    trained = trace_velocity(model, 2, grad=True)
    assert 0 < forward.flops < trained.flops and trained.peak_bytes > 0
    assert trace_decode(model, 1).flops > 0


def test_true_cfg_doubles_the_traced_cost():
    """Z-Image's CFG runs the transformer on the prompts' and the negative prompt's batch together (its captions are
    ragged lists, the planner's rows fake: the adapter reads their lengths from the padded features)."""
    plain = trace_velocity(traced("z-image", 1.0), 2, grad=False).flops
    guided = trace_velocity(traced("z-image", 4.0), 2, grad=False).flops
    assert 1.9 < guided / plain < 2.1
