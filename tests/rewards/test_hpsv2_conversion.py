"""OpenCLIP -> transformers CLIPModel conversion (HPSv2.1's checkpoint layout), checked against a plain-torch
forward that follows OpenCLIP's architecture on the original state dict, and the `hpsv2` factory end to end on
pixels from HPSv2's own transform (tests/rewards/data/hpsv2_transform_reference.npz)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neighbor_grpo.rewards.hpsv2 import convert_hpsv2_checkpoint, make_hpsv2
from neighbor_grpo.rewards.openclip_convert import openclip_to_transformers_clip

from tiny_clip import TINY_IMAGE, save_processor_files, tiny_clip_config, tiny_clip_tokenizer
from transform_references import as_float, image_sizes, load_reference

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a watercolor fox", "a city at night", "a bowl of soup"]
TEXT_WIDTH, VISION_WIDTH, EMBED, LAYERS, HEADS, PATCH, CONTEXT = 32, 48, 16, 2, 4, 8, 24


def openclip_state_dict(vocab_size, seed=0):
    """A random state dict with OpenCLIP's ViT CLIP key names and shapes (as in HPS_v2.1_compressed.pt)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    def blocks(prefix, width):
        out = {}
        for layer in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{layer}."
            out.update({p + "ln_1.weight": 1 + rand(width), p + "ln_1.bias": rand(width),
                        p + "attn.in_proj_weight": rand(3 * width, width), p + "attn.in_proj_bias": rand(3 * width),
                        p + "attn.out_proj.weight": rand(width, width), p + "attn.out_proj.bias": rand(width),
                        p + "ln_2.weight": 1 + rand(width), p + "ln_2.bias": rand(width),
                        p + "mlp.c_fc.weight": rand(4 * width, width), p + "mlp.c_fc.bias": rand(4 * width),
                        p + "mlp.c_proj.weight": rand(width, 4 * width), p + "mlp.c_proj.bias": rand(width)})
        return out

    grid = TINY_IMAGE // PATCH
    state = {"visual.class_embedding": rand(VISION_WIDTH),
             "visual.positional_embedding": rand(grid * grid + 1, VISION_WIDTH),
             "visual.proj": rand(VISION_WIDTH, EMBED), "visual.conv1.weight": rand(VISION_WIDTH, 3, PATCH, PATCH),
             "visual.ln_pre.weight": 1 + rand(VISION_WIDTH), "visual.ln_pre.bias": rand(VISION_WIDTH),
             "visual.ln_post.weight": 1 + rand(VISION_WIDTH), "visual.ln_post.bias": rand(VISION_WIDTH),
             "token_embedding.weight": rand(vocab_size, TEXT_WIDTH), "positional_embedding": rand(CONTEXT, TEXT_WIDTH),
             "ln_final.weight": 1 + rand(TEXT_WIDTH), "ln_final.bias": rand(TEXT_WIDTH),
             "text_projection": rand(TEXT_WIDTH, EMBED), "logit_scale": torch.tensor(4.6052)}
    state.update(blocks("visual.", VISION_WIDTH))
    state.update(blocks("", TEXT_WIDTH))
    return state


# ---- a plain-torch forward written after OpenCLIP's VisionTransformer / TextTransformer -------------------------

def residual_block(x, state, prefix, attn_mask=None):
    width = x.shape[-1]
    attention = nn.MultiheadAttention(width, HEADS, batch_first=True)
    attention.load_state_dict({"in_proj_weight": state[prefix + "attn.in_proj_weight"],
                               "in_proj_bias": state[prefix + "attn.in_proj_bias"],
                               "out_proj.weight": state[prefix + "attn.out_proj.weight"],
                               "out_proj.bias": state[prefix + "attn.out_proj.bias"]})
    h = F.layer_norm(x, (width,), state[prefix + "ln_1.weight"], state[prefix + "ln_1.bias"])
    x = x + attention(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
    h = F.layer_norm(x, (width,), state[prefix + "ln_2.weight"], state[prefix + "ln_2.bias"])
    h = F.linear(F.gelu(F.linear(h, state[prefix + "mlp.c_fc.weight"], state[prefix + "mlp.c_fc.bias"])),
                 state[prefix + "mlp.c_proj.weight"], state[prefix + "mlp.c_proj.bias"])
    return x + h


def openclip_image_features(state, pixels):
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (VISION_WIDTH,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    for layer in range(LAYERS):
        x = residual_block(x, state, f"visual.transformer.resblocks.{layer}.")
    pooled = F.layer_norm(x[:, 0], (VISION_WIDTH,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    return pooled @ state["visual.proj"]


def openclip_text_features(state, tokens):
    length = tokens.shape[1]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for layer in range(LAYERS):
        x = residual_block(x, state, f"transformer.resblocks.{layer}.", attn_mask=causal)
    x = F.layer_norm(x, (TEXT_WIDTH,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ state["text_projection"]  # end-of-text has the top id


# ---- tests ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_clip_tokenizer()


@pytest.fixture(scope="module")
def openclip_state(tokenizer):
    return openclip_state_dict(len(tokenizer))


@pytest.fixture(scope="module")
def converted_model(tokenizer, openclip_state):
    model = transformers.CLIPModel(tiny_clip_config(tokenizer, context=CONTEXT)).eval()
    model.load_state_dict(openclip_to_transformers_clip(openclip_state), strict=True)
    return model


def test_conversion_loads_strictly_and_gives_openclips_embeddings(converted_model, openclip_state, tokenizer):
    pixels = torch.randn(3, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(3))
    text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours_image = converted_model.visual_projection(converted_model.vision_model(pixel_values=pixels).pooler_output)
        ours_text = converted_model.text_projection(converted_model.text_model(**text).pooler_output)
        reference_image = openclip_image_features(openclip_state, pixels)
        reference_text = openclip_text_features(openclip_state, text["input_ids"])
    torch.testing.assert_close(ours_image, reference_image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_text, reference_text, atol=1e-5, rtol=1e-4)
    assert float(converted_model.logit_scale.detach()) == pytest.approx(4.6052)


def test_conversion_refuses_unknown_keys(openclip_state):
    with pytest.raises(KeyError, match="visual.attn_pool"):
        openclip_to_transformers_clip({**openclip_state, "visual.attn_pool.query": torch.zeros(1)})
    with pytest.raises(KeyError, match="ls_1"):
        openclip_to_transformers_clip({**openclip_state, "transformer.resblocks.0.ls_1.gamma": torch.zeros(1)})
    # a buffer some old checkpoints saved is not a weight: dropped
    assert openclip_to_transformers_clip({**openclip_state, "attn_mask": torch.zeros(2, 2)}).keys() == \
        openclip_to_transformers_clip(openclip_state).keys()


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory, tokenizer, openclip_state):
    """HPSv2's files as a user has them: the .pt checkpoint ({'state_dict': ...}, DataParallel prefix, fp16 like the
    'compressed' release) and a CLIP-H-like folder with config.json and the tokenizer."""
    folder = tmp_path_factory.mktemp("hps")
    checkpoint = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v.half() for k, v in openclip_state.items()}}, checkpoint)
    clip_folder = folder / "CLIP-ViT-H-14"
    tiny_clip_config(tokenizer, context=CONTEXT).save_pretrained(clip_folder)
    save_processor_files(tokenizer, clip_folder)
    return checkpoint, clip_folder


def reference_hps(openclip_state, tokenizer, pixels, prompts):
    """HPSv2's score: diagonal of normalised image_features @ text_features.T, on OpenCLIP's architecture, from
    pixels HPSv2's transform made."""
    state = {k: v.half().float() for k, v in openclip_state.items()}
    tokens = tokenizer(prompts, padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image_features = F.normalize(openclip_image_features(state, pixels), dim=-1)
        text_features = F.normalize(openclip_text_features(state, tokens), dim=-1)
    return (image_features @ text_features.T).diagonal()


def test_hpsv2_factory_scores_as_hpsv2_does(hps_files, openclip_state, tokenizer):
    """Each stored image (4:3 both ways, 16:9, a rounding half, an upscale, a square) through the reward, against
    HPSv2's score on the pixels HPSv2's own letterbox transform made of the same bytes at the tiny model's size."""
    checkpoint, clip_folder = hps_files
    reward = make_hpsv2(path=str(checkpoint), clip_path=str(clip_folder), batch_size=2)
    references = load_reference("hpsv2_transform_reference.npz")
    for size in image_sizes(references):
        images = as_float(references[f"image_{size}"]).expand(len(PROMPTS), -1, -1, -1)
        pixels = torch.from_numpy(references[f"hps{TINY_IMAGE}_{size}"])[None].expand(len(PROMPTS), -1, -1, -1)
        scores = reward(images, PROMPTS)
        assert scores.shape == (3,) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, reference_hps(openclip_state, tokenizer, pixels, PROMPTS),
                                   atol=1e-5, rtol=1e-4, msg=lambda text: f"{size}: {text}")
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())


def test_converted_safetensors_scores_the_same(hps_files, tmp_path):
    checkpoint, clip_folder = hps_files
    converted = tmp_path / "hpsv2.1.safetensors"
    convert_hpsv2_checkpoint(checkpoint, converted)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    from_pt = make_hpsv2(path=str(checkpoint), clip_path=str(clip_folder))(images, PROMPTS[:2])
    from_safetensors = make_hpsv2(path=str(converted), clip_path=str(clip_folder))(images, PROMPTS[:2])
    torch.testing.assert_close(from_safetensors, from_pt)


def test_hpsv2_refuses_a_pickle_with_arbitrary_objects(tmp_path, hps_files):
    _, clip_folder = hps_files
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "payload": nn.Linear(2, 2)}, unsafe)  # a module, not plain tensors
    with pytest.raises(ValueError, match="weights_only"):
        make_hpsv2(path=str(unsafe), clip_path=str(clip_folder))


def test_hpsv2_missing_files_name_the_path(tmp_path, hps_files):
    checkpoint, clip_folder = hps_files
    with pytest.raises(FileNotFoundError) as info:
        make_hpsv2(path=str(tmp_path / "HPS_v2.1_compressed.pt"), clip_path=str(clip_folder))
    assert "HPS_v2.1_compressed.pt" in str(info.value) and "xswu/HPSv2" in str(info.value)
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14"):
        make_hpsv2(path=str(checkpoint), clip_path=str(tmp_path / "no-clip"))
