"""The aesthetic predictor: .pth head converted with the safe loader, CLIP image embeddings from a tiny random
CLIP folder, score = head(normalised embedding)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.rewards.aesthetic import make_aesthetic
from neighbor_grpo.rewards.convert import main as convert_main
from neighbor_grpo.rewards.image_transforms import resize_center_crop_normalize
from neighbor_grpo.rewards.model_loading import CLIP_MEAN, CLIP_STD

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)

transformers = pytest.importorskip("transformers")

WIDTHS = (16, 32, 8, 8, 4, 1)  # the released head is 768-1024-128-64-16-1; 16 is the tiny CLIP's embedding size


@pytest.fixture(scope="module")
def head_state():
    generator = torch.Generator().manual_seed(7)
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(WIDTHS, WIDTHS[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator)
    return state


@pytest.fixture(scope="module")
def head_files(tmp_path_factory, head_state):
    """The .pth as released (a pickled state dict) and its conversion by the documented command."""
    folder = tmp_path_factory.mktemp("aesthetic")
    torch.save(head_state, folder / "sac+logos+ava1-l14-linearMSE.pth")
    assert convert_main(["aesthetic", str(folder / "sac+logos+ava1-l14-linearMSE.pth"),
                         str(folder / "head.safetensors")]) == 0
    return folder


def reference_scores(clip_dir, head_state, images):
    """improved-aesthetic-predictor: normalised CLIP image features through the Linear stack (no activations), on
    OpenAI CLIP's preprocess (torchvision's CenterCrop offset)."""
    model = transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()
    pixels = resize_center_crop_normalize(images, 32, 32, CLIP_MEAN, CLIP_STD, crop_rounding="half_even")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # a tensor in transformers 4.x
        x = F.normalize(features, dim=-1)
        for index in (0, 2, 4, 6, 7):
            x = F.linear(x, head_state[f"layers.{index}.weight"], head_state[f"layers.{index}.bias"])
    return x.squeeze(-1)


def test_aesthetic_scores_are_the_head_on_normalised_clip_embeddings(tiny_clip_dir, head_files, head_state):
    # 44 x 40 resizes to 35 x 32: torchvision's crop starts at row 2, transformers' at row 1
    images = torch.rand(5, 3, 44, 40, generator=torch.Generator().manual_seed(8))
    reward = make_aesthetic(path=str(head_files / "head.safetensors"), clip_path=str(tiny_clip_dir), batch_size=2)
    scores = reward(images, ["a"] * 5)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference_scores(tiny_clip_dir, head_state, images), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reward(images, ["something else"] * 5), scores)  # the prompt is not used
    assert not reward.head.training and not reward.model.training


def test_built_by_name_with_weights(tiny_clip_dir, head_files):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    combined = build_rewards([{"name": "aesthetic", "weight": 0.5, "kwargs": {
        "path": str(head_files / "head.safetensors"), "clip_path": str(tiny_clip_dir), "dtype": "bfloat16"}}])
    reward = combined.rewards["aesthetic"]
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    assert next(reward.head.parameters()).dtype == torch.float32
    scores = combined.score(images, ["a"] * 3)
    torch.testing.assert_close(combined.total(scores), 0.5 * scores["aesthetic"])


def test_a_pickled_head_is_refused_with_the_conversion_command(tiny_clip_dir, head_files):
    with pytest.raises(ValueError, match="neighbor_grpo.rewards.convert aesthetic"):
        make_aesthetic(path=str(head_files / "sac+logos+ava1-l14-linearMSE.pth"), clip_path=str(tiny_clip_dir))


def test_conversion_uses_the_safe_loader_and_checks_the_layout(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save(nn.Linear(2, 2), unsafe)  # a whole module: only unpicklable by running arbitrary code paths
    with pytest.raises(ValueError, match="weights_only"):
        convert_main(["aesthetic", str(unsafe), str(tmp_path / "out.safetensors")])
    wrong = tmp_path / "wrong.pth"
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="not an aesthetic predictor head"):
        convert_main(["aesthetic", str(wrong), str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_files_name_the_path(tmp_path, tiny_clip_dir, head_files):
    with pytest.raises(FileNotFoundError) as info:
        make_aesthetic(path=str(tmp_path / "head.safetensors"), clip_path=str(tiny_clip_dir))
    assert str(tmp_path / "head.safetensors") in str(info.value) and "improved-aesthetic-predictor" in str(info.value)
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        make_aesthetic(path=str(head_files / "head.safetensors"), clip_path=str(tmp_path / "no-clip"))
