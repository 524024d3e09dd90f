"""The compute-bound built-in model (conv U-Net): shapes, the velocity contract, checkpoint round trip, its FLOP
count at the default width, a few pretraining steps, and Neighbor GRPO training it. Tiny widths only: the default
model is pretrained by `ngrpo pretrain --model digits-unet`, never here."""

import json

import pytest
import torch
import torch.nn.functional as F

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import interpolate
from neighbor_grpo.models import DigitsUNet, DigitsUNetAdapter, DigitsUNetConfig, load_adapter
from neighbor_grpo.models.digits_unet import forward_flops_per_sample
from neighbor_grpo.builtin.pretrain import UNetBaseModelSettings, default_base_dir, ensure_builtin_model, train_base_model

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = DigitsUNetConfig(channels=8, blocks_per_level=1, cond_dim=16)


def tiny_adapter(seed=0, config=TINY):
    adapter = DigitsUNetAdapter.create(config, seed=seed)
    # the output conv and the modulations start at zero; give every weight some noise so outputs depend on inputs
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for p in adapter.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return adapter


def batch(adapter, n=6, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *adapter.latent_shape()), generator=generator)
    return x, torch.linspace(0.05, 1.0, n), adapter.encode_prompts([str(d % 10) for d in range(n)])


def test_shapes_and_decoder_match_the_digits_mlp():
    adapter = tiny_adapter()
    assert adapter.latent_shape() == (1, 8, 8)
    x, s, cond = batch(adapter)
    with torch.no_grad():
        v = adapter.velocity(x, s, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert adapter.decode(x).shape == (6, 1, 16, 16)
    with pytest.raises(ValueError, match="only the prompts '0'..'9'"):
        adapter.encode_prompts(["cat"])


def test_fresh_model_predicts_zero_velocity():
    """Zero-initialised output conv: an untrained model is the still flow (as the MLP's zero output layer)."""
    adapter = DigitsUNetAdapter.create(TINY)
    x, s, cond = batch(adapter)
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, s, cond), torch.zeros_like(x))


def test_velocity_contract_per_sample_time_class_and_batch_independence():
    adapter = tiny_adapter()
    x, s, cond = batch(adapter)
    with torch.no_grad():
        v = adapter.velocity(x, s, cond)
        # a scalar time is every sample's time
        scalar = adapter.velocity(x, torch.tensor(0.3), cond)
        assert torch.allclose(scalar, adapter.velocity(x, torch.full((6,), 0.3), cond), atol=1e-6)
        # each sample's velocity depends on its own latent, time and class only (GroupNorm is per sample)
        assert torch.allclose(adapter.velocity(x[2:3], s[2:3], cond[2:3]), v[2:3], atol=1e-5)
        other_class = adapter.velocity(x, s, (cond + 1) % 10)
        other_time = adapter.velocity(x, s.flip(0), cond)
    assert (other_class - v).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (other_time - v).abs().max() > 1e-4


def test_save_load_round_trip(tmp_path):
    adapter = tiny_adapter()
    adapter.save(tmp_path / "ckpt", extra={"note": "hi"})
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert meta["adapter"] == "digits-unet" and meta["config"]["channels"] == 8 and meta["note"] == "hi"
    loaded = load_adapter(tmp_path / "ckpt")
    assert isinstance(loaded, DigitsUNetAdapter) and loaded.net_config == TINY
    x, s, cond = batch(adapter)
    with torch.no_grad():
        before, after = adapter.velocity(x, s, cond), loaded.velocity(x, s, cond)
    assert before.abs().max() > 0 and torch.equal(before, after)
    with torch.no_grad():
        assert not torch.equal(before, tiny_adapter(seed=5).velocity(x, s, cond))


def test_weights_of_another_width_are_refused(tmp_path):
    tiny_adapter().save(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["channels"] = 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors: incompatible with the model in model.json"):
        load_adapter(tmp_path / "ckpt")
    meta["config"] = {"hidden": 64}  # an MLP's config under the U-Net adapter
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not describe a digits-unet model"):
        load_adapter(tmp_path / "ckpt")


def test_default_width_costs_15_to_20_mflop_per_sample():
    flops = forward_flops_per_sample(DigitsUNetConfig())
    print(f"digits-unet forward: {flops / 1e6:.2f} MFLOP per sample")
    assert 15e6 <= flops <= 20e6
    assert forward_flops_per_sample(TINY) < 2e6  # width sets the cost: the tiny test width is cheap


def flow_matching_loss(adapter, seed=0):
    from neighbor_grpo.builtin.data import load_digits_images

    images, labels = load_digits_images(8)
    generator = torch.Generator().manual_seed(seed)
    x0, y = adapter.encode_images(images[:256]), labels[:256]
    eps, s = torch.randn(x0.shape, generator=generator), torch.rand(len(y), generator=generator)
    with torch.no_grad():
        return F.mse_loss(adapter.net(interpolate(x0, eps, s.view(-1, 1, 1, 1)), s, y), eps - x0).item()


def test_a_few_pretraining_steps_lower_the_flow_matching_loss():
    settings = UNetBaseModelSettings(net=TINY, steps=40, batch_size=32, ema_decay=0.0)
    trained = train_base_model(settings, progress=False)
    assert isinstance(trained, DigitsUNetAdapter)
    before = flow_matching_loss(DigitsUNetAdapter.create(TINY, seed=settings.seed))
    after = flow_matching_loss(trained)
    assert after < 0.8 * before, (before, after)


def test_builtin_name_has_its_own_cache_folder_and_unknown_names_are_refused():
    assert default_base_dir(UNetBaseModelSettings()).name.startswith("digits-unet-base-")
    assert default_base_dir(UNetBaseModelSettings(steps=10)) != default_base_dir(UNetBaseModelSettings())
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope'"):
        ensure_builtin_model("nope")


def test_two_neighbor_grpo_iterations_train_the_tiny_unet(tmp_path):
    from neighbor_grpo.runs.io import load_safetensors
    from neighbor_grpo.rewards import WeightedRewards
    from neighbor_grpo.training.trainer import train

    tiny_adapter().save(tmp_path / "model")
    overrides = [f"model.path={tmp_path / 'model'}", "iterations=2", "prompts_per_iteration=2",
                 "prompts.train=['0','1','2']", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
                 "neighbor_grpo.rollout_steps=3", "eval.every=0", "optim.lr=1e-3"]
    brightness = WeightedRewards({"bright": lambda images, prompts: images.mean(dim=(1, 2, 3))}, {"bright": 1.0})
    result = train(load_config(None, overrides), tmp_path / "run", progress=False, rewards=brightness)
    assert result.iterations == 2
    aligned = load_adapter(tmp_path / "run" / "aligned")
    assert isinstance(aligned, DigitsUNetAdapter)
    before = load_safetensors(tmp_path / "model" / "model.safetensors")
    after = load_safetensors(tmp_path / "run" / "aligned" / "model.safetensors")
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-5  # it trained
