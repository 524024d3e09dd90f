"""The built-in digits model: checkpoint round trip, load_adapter's errors, user adapters by dotted path, and
how well the pretrained base model follows prompts."""

import json
import sys

import pytest
import torch

from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig, load_adapter
from neighbor_grpo.training.monitors import evaluate
from neighbor_grpo.rewards import build_rewards


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)


SMALL = DigitsNetConfig(hidden=64, depth=2, cond_dim=32)


def small_adapter(seed=0, config=SMALL):
    adapter = DigitsAdapter.create(config, seed=seed)
    # the output layer starts at zero (velocity 0 everywhere); give it weights so velocities tell models apart
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for p in adapter.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return adapter


def velocities(adapter, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((6, *adapter.latent_shape()), generator=generator)
    s = torch.linspace(0.05, 1.0, 6)
    cond = adapter.encode_prompts([str(d) for d in range(6)])
    with torch.no_grad():
        return adapter.velocity(x, s, cond)


def test_save_load_round_trip_gives_identical_velocities(tmp_path):
    adapter = small_adapter()
    adapter.save(tmp_path / "ckpt", extra={"note": "hello"})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"model.json", "model.safetensors"}
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert meta["adapter"] == "digits" and meta["note"] == "hello" and meta["config"]["hidden"] == 64
    loaded = load_adapter(tmp_path / "ckpt")
    assert isinstance(loaded, DigitsAdapter)
    assert loaded.net_config == SMALL
    before, after = velocities(adapter), velocities(loaded)
    assert before.abs().max() > 0  # a meaningful comparison, not zeros against zeros
    assert torch.equal(before, after)
    for (name, a), (_, b) in zip(adapter.net.state_dict().items(), loaded.net.state_dict().items()):
        assert torch.equal(a, b), name
    # and a different model does not give the same velocities
    assert not torch.equal(before, velocities(small_adapter(seed=5)))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder") as info:
        load_adapter(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_folder_without_model_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.json") as info:
        load_adapter(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_model_json_without_adapter(tmp_path):
    small_adapter().save(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["adapter"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'adapter'") as info:
        load_adapter(tmp_path / "ckpt")
    assert str(meta_path) in str(info.value)


def test_model_json_that_is_not_json(tmp_path):
    small_adapter().save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json"):
        load_adapter(tmp_path / "ckpt")


def test_unknown_adapter_name(tmp_path):
    small_adapter().save(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["adapter"] = "flux_not_registered"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="flux_not_registered") as info:
        load_adapter(tmp_path / "ckpt")
    assert "digits" in str(info.value)  # lists the registered adapters


@pytest.mark.parametrize("edit", [{"hidden": 256}, {"depth": 3}, {"latent_size": 16}], ids=["hidden", "depth", "latent"])
def test_weights_of_another_architecture(tmp_path, edit):
    small_adapter().save(tmp_path / "ckpt")  # saved with hidden=64, depth=2
    meta_path = tmp_path / "ckpt" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"].update(edit)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as info:
        load_adapter(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt" / "model.safetensors") in str(info.value)


def test_config_that_does_not_describe_a_digits_model(tmp_path):
    small_adapter().save(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["layers"] = 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.json"):
        load_adapter(tmp_path / "ckpt")


def test_missing_weights_file(tmp_path):
    small_adapter().save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_adapter(tmp_path / "ckpt")


USER_ADAPTERS = '''
import json
from pathlib import Path

import torch
from torch import nn

from neighbor_grpo.models.digits import DigitsAdapter


class TintedDigits(DigitsAdapter):
    """A user's subclass of the built-in adapter."""


class ConstantVelocity:
    """A user's adapter written from scratch: v = a constant read from its folder."""

    def __init__(self, value):
        self.value = value
        self.net = nn.Linear(1, 1)

    @classmethod
    def load(cls, folder, device="cpu"):
        meta = json.loads((Path(folder) / "model.json").read_text())
        return cls(float(meta["value"]))

    def velocity(self, x, s, cond):
        return torch.full_like(x, self.value)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "user_adapters_for_tests"
    (tmp_path / f"{name}.py").write_text(USER_ADAPTERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_user_adapter_by_dotted_path(tmp_path, user_module):
    adapter = small_adapter()
    adapter.save(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["adapter"] = f"{user_module}:TintedDigits"
    meta_path.write_text(json.dumps(meta))
    loaded = load_adapter(tmp_path / "ckpt")
    assert type(loaded).__name__ == "TintedDigits" and type(loaded).__module__ == user_module
    assert torch.equal(velocities(loaded), velocities(adapter))


def test_user_adapter_written_from_scratch(tmp_path, user_module):
    folder = tmp_path / "const"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"adapter": f"{user_module}.ConstantVelocity", "value": 0.25}))
    loaded = load_adapter(folder)
    assert type(loaded).__name__ == "ConstantVelocity"
    assert torch.equal(loaded.velocity(torch.zeros(2, 1, 8, 8), torch.ones(2), None), torch.full((2, 1, 8, 8), 0.25))


def test_user_adapter_that_cannot_be_imported(tmp_path, user_module):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"adapter": f"{user_module}:NoSuchClass"}))
    with pytest.raises(ValueError, match="NoSuchClass"):
        load_adapter(folder)


def test_base_model_follows_prompts_imperfectly(builtin_models):
    """The base model is pretrained with 40% of labels replaced at random, so alignment has something to fix:
    prompt accuracy on held-out seeds is well above chance (0.1) and well below the classifier's."""
    adapter = load_adapter(builtin_models["base"])
    rewards = build_rewards([{"name": "digit_prob", "kwargs": {"path": str(builtin_models["classifier"])}}])
    prompts = [str(d) for d in range(10)]
    metrics, images = evaluate(adapter, rewards, prompts, 16, seed=1_000_003)
    assert images.shape == (10, 16, 1, 16, 16)
    accuracy = metrics["accuracy"]
    assert 0.4 <= accuracy <= 0.7, f"measured base-model prompt accuracy {accuracy:.4f} (expected 0.4 to 0.7)"
    # the mean reward (p of the prompted digit) tells the same story
    assert 0.3 <= metrics["reward"] <= 0.8, f"measured base-model reward {metrics['reward']:.4f}"
