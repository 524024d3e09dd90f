"""clip_score and pickscore on tiny random CLIP checkpoints, loaded through the factories real checkpoints use."""

import pytest
import torch

from neighbor_grpo.rewards import build_rewards, check_scores
from neighbor_grpo.rewards.clip_rewards import make_clip_score, make_pickscore
from neighbor_grpo.rewards.image_transforms import resize_center_crop_normalize

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red square", "a photo of a cat", "hello world", "two dogs", "an empty room"]


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, 40, 48, generator=generator)  # not square, not the model's size: resize + crop run


@pytest.fixture(scope="module")
def clip_reward(tiny_clip_dir):
    return make_clip_score(path=str(tiny_clip_dir))


@pytest.fixture(scope="module")
def reference_logits(tiny_clip_dir, images):
    """transformers' own CLIPModel forward (logits_per_image = logit_scale.exp() * cos) on the same pixels."""
    model = transformers.CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_clip_dir))
    pixels = resize_center_crop_normalize(images, 32, 32, (0.48145466, 0.4578275, 0.40821073),
                                          (0.26862954, 0.26130258, 0.27577711))
    text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    return output.logits_per_image, float(model.logit_scale.detach().exp())


def every_pair(reward, images):
    """scores[i, j] = reward(image i, prompt j), one call per image."""
    return torch.stack([reward(images[i:i + 1].expand(len(PROMPTS), -1, -1, -1), PROMPTS)
                        for i in range(len(images))])


def test_clip_score_is_the_cosine_of_transformers_clip(clip_reward, images, reference_logits):
    logits, logit_scale = reference_logits
    scores = check_scores(clip_reward(images, PROMPTS), len(PROMPTS), "clip_score")
    torch.testing.assert_close(scores, logits.diagonal() / logit_scale, atol=1e-5, rtol=1e-4)
    assert scores.abs().max() <= 1.0


def test_the_score_depends_on_which_prompt_goes_with_which_image(clip_reward, images, reference_logits):
    logits, logit_scale = reference_logits
    pairs = every_pair(clip_reward, images)
    torch.testing.assert_close(pairs, logits / logit_scale, atol=1e-5, rtol=1e-4)
    assert (pairs.amax(1) - pairs.amin(1)).min() > 1e-4  # for every image, the prompt changes the score


def test_pickscore_is_logit_scale_times_cosine(tiny_clip_model_only_dir, tiny_clip_dir, images, reference_logits):
    logits, logit_scale = reference_logits
    assert logit_scale == pytest.approx(torch.tensor(2.5).exp().item())  # read from the checkpoint
    reward = make_pickscore(path=str(tiny_clip_model_only_dir), processor_path=str(tiny_clip_dir))
    torch.testing.assert_close(reward(images, PROMPTS), logits.diagonal(), atol=1e-4, rtol=1e-4)


def test_chunked_scores_equal_unchunked(tiny_clip_dir, images):
    whole = make_clip_score(path=str(tiny_clip_dir), batch_size=16)(images, PROMPTS)
    chunked = make_clip_score(path=str(tiny_clip_dir), batch_size=2)(images, PROMPTS)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_scale_multiplies_the_cosine(tiny_clip_dir, clip_reward, images):
    torchmetrics_like = make_clip_score(path=str(tiny_clip_dir), scale=100.0)
    torch.testing.assert_close(torchmetrics_like(images, PROMPTS), 100.0 * clip_reward(images, PROMPTS))


def test_dtype_and_device_are_honoured(tiny_clip_dir, clip_reward, images):
    reward = make_clip_score(path=str(tiny_clip_dir), dtype="bfloat16", device="cpu")
    parameters = list(reward.model.parameters())
    assert {p.dtype for p in parameters} == {torch.bfloat16}
    assert {p.device.type for p in parameters} == {"cpu"}
    assert not any(p.requires_grad for p in parameters) and not reward.model.training
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, clip_reward(images, PROMPTS), atol=0.05, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_returns_scores_on_the_images_device(tiny_clip_dir, clip_reward, images):
    reward = make_clip_score(path=str(tiny_clip_dir), device="cuda")
    assert next(reward.model.parameters()).device.type == "cuda"
    scores = reward(images.cuda(), PROMPTS)
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), clip_reward(images, PROMPTS), atol=1e-4, rtol=1e-4)


def test_grey_and_small_images_are_accepted(clip_reward):
    scores = clip_reward(torch.rand(2, 1, 16, 16), ["a", "b"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_rewards_combine_with_weights_by_name(tiny_clip_dir, tiny_clip_model_only_dir, clip_reward, images):
    combined = build_rewards([
        {"name": "clip_score", "weight": 2.0, "kwargs": {"path": str(tiny_clip_dir), "batch_size": 3}},
        {"name": "pickscore", "weight": -0.5,
         "kwargs": {"path": str(tiny_clip_model_only_dir), "processor_path": str(tiny_clip_dir)}},
    ])
    scores = combined.score(images, PROMPTS)
    cosine = clip_reward(images, PROMPTS)
    torch.testing.assert_close(scores["pickscore"], torch.tensor(2.5).exp() * cosine, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(combined.total(scores), 2.0 * scores["clip_score"] - 0.5 * scores["pickscore"])


def test_missing_folders_name_the_path_and_how_to_get_the_files(tmp_path, tiny_clip_model_only_dir):
    missing = tmp_path / "clip-not-here"
    with pytest.raises(FileNotFoundError) as info:
        make_clip_score(path=str(missing))
    assert str(missing) in str(info.value) and "huggingface-cli download" in str(info.value)
    with pytest.raises(FileNotFoundError, match="PickScore_v1"):
        make_pickscore(path=str(missing))
    with pytest.raises(FileNotFoundError, match="CLIP-ViT-H-14"):
        make_pickscore(path=str(tiny_clip_model_only_dir), processor_path=str(missing))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):  # PickScore_v1 ships no tokenizer
        make_pickscore(path=str(tiny_clip_model_only_dir))
    with pytest.raises(ValueError, match="no path given"):
        make_clip_score(path="")


def test_tensor_resize_matches_pil_bicubic():
    """The tensor transform stands in for PIL's bicubic resize in CLIP's processors: close on a smooth image."""
    from PIL import Image
    import numpy as np

    y, x = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 128), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2])[None]
    ours = resize_center_crop_normalize(image, 48, 48, (0, 0, 0), (1, 1, 1))[0]
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pil = pil.resize((64, 48), Image.BICUBIC).crop((8, 0, 56, 48))
    theirs = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    assert (ours - theirs).abs().max() < 2.5 / 255


def test_clip_source_similarity_is_the_cosine_of_the_two_images_clip_embeddings(tiny_clip_dir, images):
    """The editing baseline: cos(image embedding of the edit, of its source), as transformers' get_image_features;
    1 for an unchanged image; it arrives through WeightedRewards' source_images."""
    from neighbor_grpo.rewards import WeightedRewards
    from neighbor_grpo.rewards.clip_rewards import make_clip_source_similarity

    reward = build_rewards([{"name": "clip_source_similarity", "kwargs": {"path": str(tiny_clip_dir), "batch_size": 2}}])
    assert reward.rewards["clip_source_similarity"].needs == ("source_images",)
    sources = images.flip(0)
    scores = reward.score(images, PROMPTS, source_images=sources)["clip_source_similarity"]
    model = transformers.CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    def features(x):  # transformers 5 wraps the projected features in an output object (its pooler_output)
        with torch.no_grad():
            out = model.get_image_features(pixel_values=resize_center_crop_normalize(x, 32, 32, mean, std))
        return torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    a, b = features(images), features(sources)
    torch.testing.assert_close(scores, (a * b).sum(-1), atol=1e-5, rtol=1e-4)
    same = make_clip_source_similarity(str(tiny_clip_dir))(images, PROMPTS, source_images=images)
    torch.testing.assert_close(same, torch.ones(len(images)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs \\['source_images'\\]"):
        WeightedRewards(reward.rewards).score(images, PROMPTS)
