"""A tiny random-weight QwenImage21Pipeline (Qwen-Image 2.1) saved as a diffusers folder, built offline in seconds.

The parts, all random and tiny: a Qwen3-VL text encoder (two layers, hidden size 16), its processor with the
byte-level Qwen2 tokenizer `tiny_qwen` builds and a chat template written here (Qwen's `<|im_start|>role ... <|im_end|>`
turns: the pipeline only renders the system turn with it, to count the tokens it drops), a two-block
QwenImage21Transformer2DModel, and an AutoencoderKLQwenImage21 with four spatial downsamplings (the pipeline's fixed
16x) and non-trivial per-channel latents_mean/latents_std. The scheduler has dynamic shifting like Qwen-Image's, and
the pipeline config carries `sample_sigmas` (a 4-step grid), which the pipeline samples on by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_qwen import SPECIAL, qwen_scheduler, qwen_tokenizer

Z_DIM = 4
SAMPLE_SIGMAS = [1.0, 0.8, 0.55, 0.25]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                 "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen3_vl_encoder(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    vocab = len(tokenizer) + 8
    config = Qwen3VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "head_dim": 8, "vocab_size": vocab,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "deepstack_visual_indexes": [1]},
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|image_pad|>"])
    return Qwen3VLForConditionalGeneration(config)


def qwen21_vae():
    from diffusers import AutoencoderKLQwenImage21

    # four spatial downsamplings (16x, as the pipeline assumes): 64 px images are 4 x 4 latents
    return AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1, 1],
                                    num_res_blocks=1, temperal_downsample=[False, False, False, False],
                                    latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0])


def qwen21_transformer():
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(in_channels=Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
                                         num_attention_heads=2, context_in_dim=16, mlp_ratio=2,
                                         axes_dims_rope=(8, 4, 4))


def build_qwen_image21(folder: str | Path, seed: int = 0) -> Path:
    """A QwenImage21Pipeline with random weights, saved to `folder`."""
    from diffusers import QwenImage21Pipeline

    from neighbor_grpo.models.qwen_image21 import declare_standard_processor, processor_without_video

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    processor = processor_without_video(tokenizer, CHAT_TEMPLATE)
    pipe = QwenImage21Pipeline(scheduler=qwen_scheduler(), vae=qwen21_vae(), text_encoder=qwen3_vl_encoder(tokenizer),
                               processor=processor, transformer=qwen21_transformer(), sample_sigmas=SAMPLE_SIGMAS)
    pipe.save_pretrained(folder)
    declare_standard_processor(Path(folder))  # model_index.json names transformers' Qwen3VLProcessor
    return Path(folder)
