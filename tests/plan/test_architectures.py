"""The shipped architectures, built on the meta device, have the published parameter counts."""

from __future__ import annotations

import pytest
import torch

from neighbor_grpo.plan.architectures import COMPONENTS, MODELS, build_on_meta, parameter_count


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_parameter_count_matches_the_published_figure(name):
    component = COMPONENTS[name]
    model = build_on_meta(name)
    count = parameter_count(model)
    assert abs(count - component.published) <= component.tolerance * component.published, (
        f"{name}: {count / 1e9:.4f} B parameters, published {component.published / 1e9:.3f} B")
    assert component.source.startswith("https://huggingface.co/") and component.source.count("config.json") == 1


@pytest.mark.parametrize("name", ["flux-dev-transformer", "clip-l"])
def test_meta_build_holds_no_memory_and_has_the_requested_dtype(name):
    model = build_on_meta(name, dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.get_default_dtype() == torch.float32  # restored


def test_schnell_differs_from_dev_only_by_the_guidance_embedder():
    dev, schnell = build_on_meta("flux-dev-transformer"), build_on_meta("flux-schnell-transformer")
    extra = {n: p.numel() for n, p in dev.named_parameters()}.keys() - {n for n, _ in schnell.named_parameters()}
    assert extra and all("guidance_embedder" in n for n in extra)
    assert parameter_count(dev) - parameter_count(schnell) == sum(
        p.numel() for n, p in dev.named_parameters() if n in extra)


def test_every_model_names_known_components_and_unknown_names_fail_clearly():
    assert all(part in COMPONENTS for parts in MODELS.values() for part in parts)
    with pytest.raises(ValueError, match="architecture: unknown 'flux-pro'"):
        build_on_meta("flux-pro")


def test_qwen_image_edit_reuses_qwen_images_transformer():
    """Qwen-Image-Edit, Edit-2509 and Edit-2511 are Qwen-Image's 20 B MMDiT: the same parameters, name for name
    (2511's zero_cond_t changes which timestep modulates the source tokens, not the weights)."""
    base = {n: p.shape for n, p in build_on_meta("qwen-image-transformer").named_parameters()}
    for suffix in ("", "-2509", "-2511"):
        edit = build_on_meta(f"qwen-image-edit{suffix}-transformer")
        assert {n: p.shape for n, p in edit.named_parameters()} == base
    assert build_on_meta("qwen-image-edit-2511-transformer").config.zero_cond_t
