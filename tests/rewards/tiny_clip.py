"""Tiny random CLIP pieces shared by the reward tests: a byte-level tokenizer, a config, processor files."""

import json
import tempfile
from pathlib import Path

try:  # the OCR tests need no transformers
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

TINY_IMAGE = 32  # the tiny vision towers' input size (4x4 patches of 8 px)


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every character is a token; end-of-text has the highest id, as in
    CLIP's real vocabulary (OpenCLIP pools at argmax(token id))."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + index for index, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return clip_tokenizer_from_files(vocab)


def clip_tokenizer_from_files(vocab: dict[str, int]):
    """The fast CLIP tokenizer read from vocab.json and an empty merges.txt, as a downloaded one is read: the way both
    transformers 4.x (whose constructor takes only file paths) and 5.x (which also takes the dicts) build it."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return transformers.CLIPTokenizerFast.from_pretrained(folder)


def tiny_clip_config(tokenizer, hidden_act="gelu", context=24):
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=context, hidden_act=hidden_act,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE, patch_size=8, hidden_act=hidden_act)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_processor_files(tokenizer, folder):
    tokenizer.save_pretrained(folder)
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_class(size={"shortest_edge": TINY_IMAGE},
                    crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}).save_pretrained(folder)
