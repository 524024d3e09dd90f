"""builtin:words through the shared diffusers adapter base, on a tiny random WordsPipeline saved to disk: loading
(also by `builtin:` name dispatch from model_index.json), step-for-step parity with the pipeline's own diffusers
scheduler, the LoRA export loaded back through diffusers rendering the same images, and one training iteration of
every algorithm of the harness."""

import csv
import json
import logging
import warnings

import pytest
import torch

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE, DiffusersAdapter
from neighbor_grpo.models.lora import apply_lora
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ['the word "cat"', 'the word "moon"']


def darkness(images, prompts):
    """A cheap reward that differs from sample to sample: how much ink the image has."""
    return 1.0 - images.clamp(0, 1).flatten(1).mean(1)


def with_random_lora(adapter):
    adapter.net = apply_lora(adapter.net, 4, 8.0, adapter.default_lora_targets())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in adapter.net.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return adapter


def test_loads_through_the_diffusers_base(words_folder):
    from neighbor_grpo.models.words import WordsAdapter

    adapter = load_adapter(words_folder)  # model_index.json's WordsPipeline picks the adapter
    assert isinstance(adapter, WordsAdapter) and isinstance(adapter, DiffusersAdapter)
    assert adapter.latent_shape() == (1, 16, 64) and adapter.default_shift() == 1.0
    assert {"to_q", "to_k", "to_v", "add_q_proj"} <= set(adapter.default_lora_targets())
    assert not any(p.requires_grad for p in adapter.pipeline.char_encoder.parameters())  # frozen like text encoders
    x = torch.randn(2, 1, 16, 64)
    with torch.no_grad():
        v = adapter.velocity(x, torch.tensor(0.5), adapter.encode_prompts(PROMPTS))
        other = adapter.velocity(x, torch.tensor(0.5), adapter.encode_prompts(PROMPTS[::-1]))
    assert v.shape == x.shape and not torch.allclose(v, other)  # the word conditions the velocity
    assert adapter.decode(x).shape == (2, 1, 32, 128)
    with pytest.raises(ValueError, match="model.height: builtin:words draws 32x128 images"):
        load_adapter(words_folder, options={"height": 64})
    with pytest.raises(ValueError, match=r"prompt 'a cat!'.*lowercase letters"):
        adapter.encode_prompts(["a cat!"])


def test_lora_export_renders_the_same_images_through_diffusers(words_folder, tmp_path):
    from neighbor_grpo.models.words_pipeline import WordsPipeline

    adapter = with_random_lora(load_adapter(words_folder))
    adapter.save(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "model.json").read_text())["kind"] == "lora"
    steps = 4
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        ours = integrate(lambda x, s: adapter.velocity(x, s, cond), noise, sigma_grid(steps), "euler").states[-1]
    pipe = WordsPipeline.from_pretrained(words_folder)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPTS, num_inference_steps=steps, latents=noise, sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r.getMessage() for r in records] + [str(w.message) for w in caught]  # no key warnings
    theirs = pipe(PROMPTS, num_inference_steps=steps, latents=noise, sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    assert ((ours + 1) / 2 - theirs).abs().max() < 1e-5
    assert ((ours + 1) / 2 - plain).abs().max() > 1e-3  # the LoRA changed the images
    reloaded = load_adapter(tmp_path / "lora")  # base + LoRA merged by diffusers' loader
    cond = reloaded.encode_prompts(PROMPTS)
    with torch.no_grad():
        again = integrate(lambda x, s: reloaded.velocity(x, s, cond), noise, sigma_grid(steps), "euler").states[-1]
    assert (again - ours).abs().max() < 1e-5


SMALL = {"mix_grpo": ["mix_grpo.window_size=2", "mix_grpo.window_interval=1"], "awm": ["awm.num_times=2"],
         "dgpo": ["dgpo.num_times=2", "dgpo.trunc_steps=2"], "neighbor_grpo": ["neighbor_grpo.num_anchors=2"]}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_one_iteration_with_a_lora(words_folder, tmp_path, name):
    config = load_config(None, [f"model.path={words_folder}", f"algorithm={name}", "iterations=1",
                                "prompts_per_iteration=2", f"{name}.group_size=4", f"{name}.rollout_steps=4",
                                "eval.every=0", "eval.samples_per_prompt=2", "eval.steps=2", "optim.lr=1e-3",
                                "optim.finetune=lora", "optim.lora_rank=4", 'prompts.train=[the word "cat", the word "moon", the word "tree"]',
                                'prompts.eval=[the word "sun"]', *SMALL.get(name, [])])
    result = train(config, tmp_path / "run", progress=False, rewards=WeightedRewards({"ink": darkness}))
    trained = [r for r in csv.DictReader(open(result.run_dir / "metrics.csv")) if r.get("loss")]
    assert len(trained) == 1 and float(trained[0]["loss"]) == float(trained[0]["loss"])  # ran, finite
    assert json.loads((result.run_dir / "aligned" / "model.json").read_text())["kind"] == "lora"
