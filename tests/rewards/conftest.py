"""Tiny random CLIP checkpoints written the way real ones are laid out on disk (transformers folders with a
tokenizer and preprocessor_config.json), so tests load them through the same factories a real checkpoint uses."""

import pytest
import torch
from tiny_clip import save_processor_files, tiny_clip_config, tiny_clip_tokenizer, transformers


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIPModel + tokenizer + image processor config in one folder, like openai/clip-vit-*."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(1)
    model = transformers.CLIPModel(tiny_clip_config(tokenizer))
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # not CLIP's init value, so a test can tell it is read from the checkpoint
    model.save_pretrained(folder)
    save_processor_files(tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_model_only_dir(tiny_clip_dir, tmp_path_factory):
    """Weights without tokenizer or processor files, like yuvalkirstain/PickScore_v1 (the processor comes from
    another folder)."""
    folder = tmp_path_factory.mktemp("tiny-clip-weights-only")
    transformers.CLIPModel.from_pretrained(str(tiny_clip_dir)).save_pretrained(folder)
    return folder
