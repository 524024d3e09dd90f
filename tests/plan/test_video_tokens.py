"""Video tokens (latent frames x patches) of the Wan models the planner lists, and their experts' parameters."""

from __future__ import annotations

import pytest

from neighbor_grpo.plan.architectures import VIDEO_MODELS, VideoModel, build_on_meta, parameter_count, video_tokens


def test_tokens_of_the_default_videos():
    # Wan2.1 480x832, 81 frames: 21 latent frames x (60/2) x (104/2)
    assert video_tokens(VIDEO_MODELS["wan21-t2v-1.3b"]) == 21 * 30 * 52 == 32760
    # Wan2.2-TI2V-5B 704x1280, 121 frames, 16x VAE: 31 x (44/2) x (80/2)
    assert video_tokens(VIDEO_MODELS["wan22-ti2v-5b"]) == 31 * 22 * 40 == 27280
    # Wan2.2-T2V-A14B 720x1280, 81 frames: 21 x 45 x 80
    assert video_tokens(VIDEO_MODELS["wan22-t2v-a14b"]) == 21 * 45 * 80 == 75600
    # a small training video: 33 frames at 256x448
    assert video_tokens(VIDEO_MODELS["wan21-t2v-1.3b"], 33, 256, 448) == 9 * 16 * 28
    with pytest.raises(ValueError, match="model.num_frames: expected 4k \\+ 1"):
        video_tokens(VIDEO_MODELS["wan21-t2v-1.3b"], 80)


def test_a14b_is_two_14b_experts():
    a14b = VIDEO_MODELS["wan22-t2v-a14b"]
    total = sum(parameter_count(build_on_meta(name)) for name in a14b.experts)
    assert len(a14b.experts) == 2 and abs(total - 27e9) < 0.06 * 27e9  # "27 B total, 14 B active"


def test_tokens_agree_with_the_adapter_latents(tmp_path):
    """The formula against the latents WanAdapter makes (WanPipeline's own geometry) on a tiny pipeline."""
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    import tiny_wan

    from neighbor_grpo.models import load_adapter

    adapter = load_adapter(tiny_wan.build_wan(tmp_path / "wan"), options={"height": 32, "width": 48, "num_frames": 13})
    C, T, H, W = adapter.latent_shape()
    assert video_tokens(VideoModel(("x",), 13, 32, 48, 4, 8)) == T * (H // 2) * (W // 2) == 4 * 2 * 3
