"""Tiny random-weight FLUX.1 and SD3 pipelines saved as diffusers folders, built offline in about a second.

The layouts follow diffusers' own tests (tests/pipelines/flux/test_pipeline_flux.py and
tests/pipelines/stable_diffusion_3/, `get_dummy_components`), except that the tokenizers and text encoders are
built here from small configs instead of downloaded: a CLIP BPE tokenizer over single letters, a T5 unigram
tokenizer over a few words, and random CLIP/T5 encoders. The folders are loaded through the same code path as a
real checkpoint (`load_adapter(folder)` reads model_index.json).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the network

WORDS = "a photo of cat dog red blue green the on in with and".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXT_TOKENS = 16  # CLIP's model_max_length here; T5 uses the adapter's max_sequence_length


# The tokenizers are read back from the files a downloaded one has (vocab.json + merges.txt, tokenizer.json), so
# transformers 4.x, whose constructors take only file paths, builds them as 5.x does.

def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:  # byte-level BPE with no merges: every word is spelled letter by letter
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=TEXT_TOKENS)


def t5_unigram():
    """T5's tokenizer pipeline (as transformers builds it from a SentencePiece model) over a few pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -1.0) for word in WORDS] + [(letter, -5.0) for letter in LETTERS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return tokenizer


def t5_tokenizer():
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        t5_unigram().save(str(Path(folder) / "tokenizer.json"))
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
        return T5TokenizerFast.from_pretrained(folder, extra_ids=0, eos_token="</s>", unk_token="<unk>",
                                               pad_token="<pad>")


def clip_config(**changes):
    from transformers import CLIPTextConfig

    values = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                  layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                  max_position_embeddings=TEXT_TOKENS, hidden_act="gelu", projection_dim=32)
    values.update(changes)
    return CLIPTextConfig(**values)


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    # two blocks: the VAE halves the resolution once (vae_scale_factor 2), like the real 8x one but cheaper
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def build_flux(folder: str | Path, seed: int = 0) -> Path:
    """A FluxPipeline (guidance embedding on, as FLUX.1-dev) with random weights, saved to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    # FLUX.1-dev's scheduler: resolution-dependent (dynamic) shift
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(1), text_encoder=CLIPTextModel(clip_config()),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(), tokenizer_2=t5_tokenizer(),
                        transformer=transformer)
    pipe.save_pretrained(folder)
    return Path(folder)


def build_sd3(folder: str | Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline (two CLIP encoders with projection + T5) with random weights, saved to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(4),
                                    text_encoder=CLIPTextModelWithProjection(clip_config()), tokenizer=clip_tokenizer(),
                                    text_encoder_2=CLIPTextModelWithProjection(clip_config()),
                                    tokenizer_2=clip_tokenizer(), text_encoder_3=t5_encoder(),
                                    tokenizer_3=t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder)
    return Path(folder)


def cheap_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """Mean brightness of the red channel: a reward any image has, computed in microseconds."""
    return images[:, 0].mean(dim=(1, 2))


def make_cheap_reward():
    """The same, as a reward factory a config can name by dotted path ('tiny_diffusers:make_cheap_reward')."""
    return cheap_reward


def lora_key_warnings(pipe, lora_folder, weight_name: str = "pytorch_lora_weights.safetensors") -> list[str]:
    """diffusers' and peft's key warnings (unexpected or missing LoRA keys) while `pipe` loads a LoRA; their loggers
    do not propagate to pytest's caplog. (FLUX's loader also notes that the file has no text-encoder keys: not a
    mismatch, so not returned.)"""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    loggers = [logging.getLogger("diffusers"), logging.getLogger("peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        pipe.load_lora_weights(lora_folder, weight_name=weight_name)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return [m for m in messages if "unexpected keys" in m or "missing keys" in m]


def lora_with_a_foreign_block(lora_folder, out_folder, weight_name: str = "pytorch_lora_weights.safetensors"):
    """A copy of a LoRA export (its metadata kept) with one more key, for a transformer block (7) the tiny
    transformers lack: the key check must report it. Returns the copy's folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(Path(lora_folder) / weight_name, "pt") as handle:
        metadata = handle.metadata()
    state = load_file(Path(lora_folder) / weight_name)
    name = next(k for k in state if k.endswith("to_q.lora_A.weight"))
    state[name.replace("transformer_blocks.0", "transformer_blocks.7")] = state[name].clone()
    Path(out_folder).mkdir()
    save_file(state, Path(out_folder) / weight_name, metadata=metadata)
    return Path(out_folder)
