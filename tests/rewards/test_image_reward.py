"""ImageReward: a tiny random state dict in ImageReward.pt's key layout (BLIP timm-style ViT, med.py BERT with
cross-attention, MLP head), converted to transformers' BLIP classes and checked against a plain-torch forward
that follows ImageReward's own modules on the original state dict."""

import math

import pytest
import torch
import torch.nn.functional as F

from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.rewards.convert import main as convert_main
from neighbor_grpo.rewards.image_reward import (REWARD_MEAN, REWARD_STD, ImageRewardNet, image_reward_to_blip,
                                                make_image_reward)
from neighbor_grpo.rewards.image_transforms import resize_center_crop_normalize
from neighbor_grpo.rewards.model_loading import CLIP_MEAN, CLIP_STD

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)

transformers = pytest.importorskip("transformers")

V_WIDTH, V_LAYERS, V_HEADS, PATCH, IMAGE = 48, 2, 4, 8, 32
T_WIDTH, T_LAYERS, T_HEADS, MAX_POS = 32, 2, 4, 40
WORDS = ["a", "cat", "dog", "red", "blue", "on", "the", "mat", "##s"]
PROMPTS = ["a red cat", "the blue dogs", "a cat on the mat"]


def write_bert_tokenizer(folder):
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    tokenizer = transformers.BertTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def image_reward_state_dict(vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    def linear(name, fan_out, fan_in):
        return {f"{name}.weight": rand(fan_out, fan_in), f"{name}.bias": rand(fan_out)}

    def norm(name, width):
        return {f"{name}.weight": 1 + rand(width), f"{name}.bias": rand(width)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    state = {v + "cls_token": rand(1, 1, V_WIDTH), v + "pos_embed": rand(1, (IMAGE // PATCH) ** 2 + 1, V_WIDTH),
             v + "patch_embed.proj.weight": rand(V_WIDTH, 3, PATCH, PATCH), v + "patch_embed.proj.bias": rand(V_WIDTH),
             **norm(v + "norm", V_WIDTH)}
    for i in range(V_LAYERS):
        b = f"{v}blocks.{i}."
        state.update({**norm(b + "norm1", V_WIDTH), **linear(b + "attn.qkv", 3 * V_WIDTH, V_WIDTH),
                      **linear(b + "attn.proj", V_WIDTH, V_WIDTH), **norm(b + "norm2", V_WIDTH),
                      **linear(b + "mlp.fc1", 4 * V_WIDTH, V_WIDTH), **linear(b + "mlp.fc2", V_WIDTH, 4 * V_WIDTH)})
    state.update({t + "embeddings.word_embeddings.weight": rand(vocab_size, T_WIDTH),
                  t + "embeddings.position_embeddings.weight": rand(MAX_POS, T_WIDTH),
                  t + "embeddings.position_ids": torch.arange(MAX_POS)[None],
                  **norm(t + "embeddings.LayerNorm", T_WIDTH)})
    for i in range(T_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            state.update({**linear(f"{b}{block}.self.query", T_WIDTH, T_WIDTH),
                          **linear(f"{b}{block}.self.key", T_WIDTH, kv_width),
                          **linear(f"{b}{block}.self.value", T_WIDTH, kv_width),
                          **linear(f"{b}{block}.output.dense", T_WIDTH, T_WIDTH),
                          **norm(f"{b}{block}.output.LayerNorm", T_WIDTH)})
        state.update({**linear(b + "intermediate.dense", 4 * T_WIDTH, T_WIDTH),
                      **linear(b + "output.dense", T_WIDTH, 4 * T_WIDTH), **norm(b + "output.LayerNorm", T_WIDTH)})
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), [(T_WIDTH, 24), (24, 16), (16, 8), (8, 4), (4, 1)]):
        state.update(linear(f"mlp.layers.{index}", fan_out, fan_in))
    state.update({**linear("blip.vision_proj", 8, V_WIDTH), **linear("blip.text_proj", 8, T_WIDTH)})  # unused
    return state


# ---- a plain-torch forward after ImageReward's BLIP vit.py / med.py on the original keys ------------------------

def layer_norm(x, s, name, eps):
    return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps)


def lin(x, s, name):
    return F.linear(x, s[name + ".weight"], s[name + ".bias"])


def vit_forward(s, pixels):
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x], dim=1) + s[v + "pos_embed"]
    batch, tokens, width = x.shape
    for i in range(V_LAYERS):
        b = f"{v}blocks.{i}."
        h = layer_norm(x, s, b + "norm1", 1e-6)
        q, k, val = lin(h, s, b + "attn.qkv").reshape(batch, tokens, 3, V_HEADS, -1).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (width // V_HEADS) ** -0.5).softmax(-1)
        x = x + lin((attention @ val).transpose(1, 2).reshape(batch, tokens, width), s, b + "attn.proj")
        x = x + lin(F.gelu(lin(layer_norm(x, s, b + "norm2", 1e-6), s, b + "mlp.fc1")), s, b + "mlp.fc2")
    return layer_norm(x, s, v + "norm", 1e-6)


def bert_attention(x, context, s, name, additive_mask):
    def heads(y):
        return y.view(len(y), -1, T_HEADS, T_WIDTH // T_HEADS).transpose(1, 2)

    q, k, v = heads(lin(x, s, name + ".self.query")), heads(lin(context, s, name + ".self.key")), \
        heads(lin(context, s, name + ".self.value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(T_WIDTH // T_HEADS) + additive_mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return layer_norm(lin(out, s, name + ".output.dense") + x, s, name + ".output.LayerNorm", 1e-12)


def reference_image_reward(s, pixels, input_ids, attention_mask):
    t = "blip.text_encoder."
    image_tokens = vit_forward(s, pixels)
    positions = torch.arange(input_ids.shape[1])
    x = (s[t + "embeddings.word_embeddings.weight"][input_ids]
         + s[t + "embeddings.position_embeddings.weight"][positions])
    x = layer_norm(x, s, t + "embeddings.LayerNorm", 1e-12)
    text_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(T_LAYERS):
        b = f"{t}encoder.layer.{i}."
        x = bert_attention(x, x, s, b + "attention", text_mask)
        x = bert_attention(x, image_tokens, s, b + "crossattention", 0.0)
        h = F.gelu(lin(x, s, b + "intermediate.dense"))
        x = layer_norm(lin(h, s, b + "output.dense") + x, s, b + "output.LayerNorm", 1e-12)
    h = x[:, 0]
    for index in (0, 2, 4, 6, 7):
        h = lin(h, s, f"mlp.layers.{index}")
    return (h.squeeze(-1) - REWARD_MEAN) / REWARD_STD


# ---- tests ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-reward")
    (folder / "bert").mkdir()
    tokenizer = write_bert_tokenizer(folder / "bert")
    state = image_reward_state_dict(len(tokenizer))
    torch.save(state, folder / "ImageReward.pt")
    return folder, tokenizer, state


def test_converted_model_matches_image_rewards_forward(files):
    _, tokenizer, state = files
    model = ImageRewardNet.from_state_dict(state, vision_heads=V_HEADS, text_heads=T_HEADS).eval()  # strict load
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        ours = (model(pixels, tokens["input_ids"], tokens["attention_mask"]) - REWARD_MEAN) / REWARD_STD
        reference = reference_image_reward(state, pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_factory_scores_from_pt_and_converted_safetensors(files):
    folder, tokenizer, state = files
    # 40 x 44 resizes to 32 x 35: ImageReward's torchvision CenterCrop starts at column 2 (transformers' at 1)
    images = torch.rand(4, 3, 40, 44, generator=torch.Generator().manual_seed(2))
    prompts = PROMPTS + ["dogs"]
    kwargs = {"tokenizer_path": str(folder / "bert"), "vision_heads": V_HEADS, "text_heads": T_HEADS}
    from_pt = make_image_reward(path=str(folder / "ImageReward.pt"), batch_size=3, **kwargs)
    scores = from_pt(images, prompts)
    pixels = resize_center_crop_normalize(images, IMAGE, IMAGE, CLIP_MEAN, CLIP_STD, crop_rounding="half_even")
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        reference = reference_image_reward(state, pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-4)  # padding=max_length as ImageReward

    assert convert_main(["image_reward", str(folder / "ImageReward.pt"), str(folder / "ir.safetensors")]) == 0
    combined = build_rewards([{"name": "image_reward", "weight": 2.0,
                               "kwargs": {"path": str(folder / "ir.safetensors"), **kwargs}}])
    torch.testing.assert_close(combined.score(images, prompts)["image_reward"], scores, atol=1e-6, rtol=1e-5)
    swapped = from_pt(images, prompts[::-1])
    assert (swapped - scores).abs().max() > 1e-4  # the prompt matters


def test_conversion_refuses_unknown_keys(files):
    _, _, state = files
    with pytest.raises(KeyError, match="blip.something_else"):
        image_reward_to_blip({**state, "blip.something_else.weight": torch.zeros(1)})


def test_missing_files_name_the_path(tmp_path, files):
    folder, _, _ = files
    with pytest.raises(FileNotFoundError) as info:
        make_image_reward(path=str(tmp_path / "ImageReward.pt"), tokenizer_path=str(folder / "bert"))
    assert str(tmp_path / "ImageReward.pt") in str(info.value) and "THUDM/ImageReward" in str(info.value)
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        make_image_reward(path=str(folder / "ImageReward.pt"), tokenizer_path=str(tmp_path / "nope"))
