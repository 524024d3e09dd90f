"""Tiny random-weight Qwen-Image pipelines saved as diffusers folders, built offline in about a second.

The layouts follow diffusers' own tests (tests/pipelines/qwenimage/, `get_dummy_components`), except that the
Qwen2 tokenizer is built here instead of downloaded: byte-level BPE over the 256 byte symbols with no merges (every
character is one token, so the chat template is longer than the 34 tokens the pipeline drops), plus Qwen's special
tokens. The scheduler is Qwen-Image's published scheduler_config.json (dynamic shift, max_shift 0.9,
shift_terminal 0.02), and the VAE has non-trivial per-channel latents_mean/latents_std so the normalisation shows.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the network

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


def qwen_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = Qwen2Tokenizer.from_pretrained(folder, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                                   unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tokenizer


def qwen_vl_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    vocab = len(tokenizer) + 8
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": vocab, "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "bos_token_id": None, "eos_token_id": None},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab, vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], image_token_id=ids["<|image_pad|>"],
        vision_token_id=ids["<|image_pad|>"], bos_token_id=None, eos_token_id=None)
    return Qwen2_5_VLForConditionalGeneration(config)


def qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    z_dim = 4
    # two downsampling stages: vae_scale_factor 4, so 32 px images are 8x8 latents and 16 packed tokens
    return AutoencoderKLQwenImage(base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                  latents_std=[1.5, 0.8, 1.0, 2.0])


def qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen/Qwen-Image scheduler/scheduler_config.json
    return FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                           max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                                           use_dynamic_shifting=True, time_shift_type="exponential")


def qwen_transformer(zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
                                       axes_dims_rope=(8, 4, 4), zero_cond_t=zero_cond_t)


def build_qwen_image(folder: str | Path, seed: int = 0) -> Path:
    """A QwenImagePipeline with random weights, saved to `folder`."""
    from diffusers import QwenImagePipeline

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    pipe = QwenImagePipeline(scheduler=qwen_scheduler(), vae=qwen_vae(), text_encoder=qwen_vl_encoder(tokenizer),
                             tokenizer=tokenizer, transformer=qwen_transformer())
    pipe.save_pretrained(folder)
    return Path(folder)


# Qwen2.5-VL's image processor with a distinctive pixel budget (56 x 56 to 224 x 224), so a test can see that the
# adapter reads the checkpoint's processor files rather than transformers' defaults
PROCESSOR_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}


def qwen_processor(tokenizer):
    """The image-only Qwen2VLProcessor the adapter builds (transformers' PIL image processor; no torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    from neighbor_grpo.models.qwen_image import image_only_processor_class

    return image_only_processor_class("Qwen2VLProcessor")(Qwen2VLImageProcessorPil(size=PROCESSOR_SIZE), tokenizer)


def build_qwen_image_edit(folder: str | Path, plus: bool = False, seed: int = 0) -> Path:
    """A QwenImageEditPipeline (or, `plus`, a QwenImageEditPlusPipeline whose transformer has 2511's `zero_cond_t`)
    with random weights, saved to `folder` with model_index.json naming the processor as the published folders do."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    from neighbor_grpo.models.qwen_image_edit import declare_standard_processor

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    transformer = qwen_transformer(zero_cond_t=plus)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(scheduler=qwen_scheduler(), vae=qwen_vae(), text_encoder=qwen_vl_encoder(tokenizer), tokenizer=tokenizer,
               processor=qwen_processor(tokenizer), transformer=transformer)
    pipe.save_pretrained(folder)
    declare_standard_processor(Path(folder))
    return Path(folder)


@contextmanager
def small_source_areas():
    """The editing pipelines' source areas at 1/256 of theirs (Edit: 64 x 64 instead of 1024 x 1024; Plus: VL copy
    32 x 32, VAE copy 64 x 64), so tiny pipelines see small sources; the adapters read the same module values."""
    import pytest
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    original = edit.calculate_dimensions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(area // 256, ratio))
        patch.setattr(plus, "CONDITION_IMAGE_SIZE", 32 * 32)
        patch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)
        yield
