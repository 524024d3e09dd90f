"""diffusers_common helpers that depend on the installed diffusers version."""

import pytest
import torch

from neighbor_grpo.models.diffusers_common import dtype_keyword

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("version, keyword", [("0.39.0", "torch_dtype"), ("0.40.0.dev0", "dtype"), ("0.40.0", "dtype"),
                                              ("0.42.1", "dtype"), ("1.0.0", "dtype")])
def test_dtype_keyword_follows_the_installed_diffusers(monkeypatch, version, keyword):
    """diffusers 0.39 (the newest beside transformers 4.x) knows only torch_dtype; 0.40 on deprecates it for dtype."""
    monkeypatch.setattr(diffusers, "__version__", version)
    assert dtype_keyword(torch.bfloat16) == {keyword: torch.bfloat16}
