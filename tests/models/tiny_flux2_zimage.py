"""Tiny random-weight FLUX.2 [dev], FLUX.2 [klein] and Z-Image pipelines saved as diffusers folders, built offline.

Layouts as in diffusers' own tests (tests/pipelines/flux2/, tests/pipelines/z_image/, `get_dummy_components`), but
the text side is built here instead of downloaded: a word-level tokenizer carrying the chat template of the real
one (Qwen3's ChatML with its thinking switch; Mistral's [SYSTEM_PROMPT]/[INST] for FLUX.2 [dev]'s Pixtral
processor) and random Qwen3 / Mistral3 text encoders deep enough for the layers each pipeline reads (FLUX.2 [dev]
hidden states 10, 20, 30; [klein] 9, 18, 27; Z-Image the second to last). The FLUX.2 VAE's batch-norm statistics
are randomised so the latent normalisation matters.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from tiny_diffusers import WORDS, tiny_vae

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
ROLES = ["system", "user", "assistant"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
# Qwen3's chat template, reduced to what a one-turn user message uses (role markers, generation prompt, and the
# empty thinking block `enable_thinking=False` adds)
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")
# Mistral Small 3's template for content lists (system prompt, then the user's text)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST]' + message['content'][0]['text'] + '[/INST]' }}"
    "{%- endif %}{%- endfor %}")


def _word_tokenizer(specials: list[str], unknown: str):
    """A word-level `tokenizers` model: the specials, the test words, and `unknown` for anything else."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*specials, *ROLES, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unknown))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _fast_tokenizer(specials: list[str], unknown: str, **tokens):
    """transformers' tokenizers-backed class around the word-level model (Qwen2Tokenizer would rebuild its own
    byte-level BPE from vocab/merges files, which a test cannot have without downloading them)."""
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        _word_tokenizer(specials, unknown).save(str(Path(folder) / "tokenizer.json"))
        return PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), padding_side="right",
                                       **tokens)


def qwen_tokenizer():
    return _fast_tokenizer(QWEN_SPECIALS, "<|endoftext|>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
                           chat_template=QWEN3_TEMPLATE)


def mistral_tokenizer():
    """FLUX.2 [dev] ships a PixtralProcessor, which needs torchvision; the pipeline only calls its
    `apply_chat_template` on text conversations, which a tokenizer with the same template answers the same way."""
    return _fast_tokenizer(MISTRAL_SPECIALS, "<unk>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="<unk>", chat_template=MISTRAL_TEMPLATE)


def qwen3(layers: int, hidden: int = 16):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=len(QWEN_SPECIALS) + len(ROLES) + len(WORDS), hidden_size=hidden,
                                        intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=8, max_position_embeddings=512))


def mistral3(layers: int = 30, hidden: int = 16):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=len(MISTRAL_SPECIALS) + len(ROLES) + len(WORDS), hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=512)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=16, patch_size=4)
    return Mistral3ForConditionalGeneration(Mistral3Config(vision_config=vision, text_config=text,
                                                           image_token_index=MISTRAL_SPECIALS.index("[IMG]")))


def flux2_vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=1, sample_size=32, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # trained statistics, not the identity: decoding must undo them
        vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def flux2_transformer(text_width: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * text_width,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)


def flux2_scheduler():
    """FLUX.2's scheduler: dynamic (exponential) shift; the pipeline supplies mu from its empirical fit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def build_flux2(folder: str | Path, seed: int = 0) -> Path:
    """A Flux2Pipeline (FLUX.2 [dev]: Mistral3 text encoder, guidance embedding) with random weights."""
    from diffusers import Flux2Pipeline

    torch.manual_seed(seed)
    pipe = Flux2Pipeline(scheduler=flux2_scheduler(), vae=flux2_vae(), text_encoder=mistral3(),
                         tokenizer=mistral_tokenizer(), transformer=flux2_transformer(16, guidance_embeds=True))
    pipe.save_pretrained(folder)
    return Path(folder)


def build_flux2_klein(folder: str | Path, seed: int = 0, distilled: bool = False) -> Path:
    """A Flux2KleinPipeline (Qwen3 text encoder, true CFG unless step-distilled) with random weights."""
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    pipe = Flux2KleinPipeline(scheduler=flux2_scheduler(), vae=flux2_vae(), text_encoder=qwen3(27),
                              tokenizer=qwen_tokenizer(), transformer=flux2_transformer(16, guidance_embeds=False),
                              is_distilled=distilled)
    pipe.save_pretrained(folder)
    return Path(folder)


def build_z_image(folder: str | Path, seed: int = 0) -> Path:
    """A ZImagePipeline (Qwen3 text encoder, single-stream DiT, Z-Image-Turbo's constant shift 3) with random
    weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(4),
                          text_encoder=qwen3(2), tokenizer=qwen_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder)
    return Path(folder)
