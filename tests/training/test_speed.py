"""The `speed` section (neighbor_grpo/training/speed.py, training/iteration.py): bf16 autocast with fp32 master weights, fp16 with a
gradient scaler, torch.compile, micro-batches (gradient accumulation), the optimizer choice, clear errors."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from neighbor_grpo.config.train_config import ConfigError, load_config
from neighbor_grpo.models import load_adapter
from neighbor_grpo.models.digits import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.iteration import train_iteration
from neighbor_grpo.training import parts as parts_module
from neighbor_grpo.training.parts import build_training_parts
from neighbor_grpo.training.speed import compute_precision, keeps_master_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import tiny_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = ["prompts_per_iteration=3", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
         "neighbor_grpo.rollout_steps=4", "optim.lr=1e-3", "optim.ema_decay=0.5"]


def tiny_adapter() -> DigitsAdapter:
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=32, depth=1, cond_dim=16), seed=0)
    with torch.no_grad():
        torch.nn.init.normal_(adapter.net.out.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return adapter


def pixel_rewards() -> WeightedRewards:
    def score(images, prompts):
        rows = torch.tensor([int(p) % images.shape[-2] for p in prompts])
        return images[torch.arange(len(prompts)), :, rows].mean(dim=(1, 2)) - 0.5 * images.mean(dim=(1, 2, 3))

    return WeightedRewards({"pixels": score}, {"pixels": 1.0})


def run_iterations(overrides: list[str], iterations: int = 2, adapter: DigitsAdapter | None = None):
    """build_training_parts + train_iteration, as the benchmark script calls them; returns (adapter, values)."""
    config = load_config(None, SMALL + overrides)
    adapter = adapter or tiny_adapter()
    parts = build_training_parts(config, adapter)
    values = []
    for iteration in range(iterations):
        logged, skipped = train_iteration(config, adapter, pixel_rewards(), parts.algorithm, parts.optimizer,
                                          parts.params, parts.ema, parts.reference_velocity, list("0123456789"),
                                          iteration, lambda point: None, parts=parts)
        assert skipped == ""
        values.append(logged)
    return adapter, values


def weights(adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.net.state_dict().items()}


def update(after: dict, before: dict) -> torch.Tensor:
    return torch.cat([(after[k] - before[k]).flatten() for k in before])


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def fp32_run():
    start = weights(tiny_adapter())
    adapter, values = run_iterations([])
    return start, weights(adapter), values


def test_bf16_autocast_trains_fp32_master_weights(fp32_run):
    start, fp32, fp32_values = fp32_run
    adapter, values = run_iterations(["speed.mixed_precision=bf16"])
    trained = weights(adapter)
    assert all(v.dtype == torch.float32 for v in trained.values())  # master weights stay fp32
    assert max_difference(trained, start) > 1e-3  # the weights moved
    # ... in nearly the same direction as in fp32 (Adam's normalised steps amplify small gradient differences)
    assert torch.nn.functional.cosine_similarity(update(trained, start), update(fp32, start), dim=0) > 0.9
    assert values[-1]["reward_mean"] == pytest.approx(fp32_values[-1]["reward_mean"], abs=0.02)


def test_fp16_uses_a_gradient_scaler_and_trains(fp32_run):
    start, _, _ = fp32_run
    config = load_config(None, SMALL + ["speed.mixed_precision=fp16"])
    parts = build_training_parts(config, tiny_adapter())
    assert isinstance(parts.scaler, torch.amp.GradScaler)
    adapter, _ = run_iterations(["speed.mixed_precision=fp16"], iterations=3)
    assert max_difference(weights(adapter), start) > 1e-4


def test_micro_batches_accumulate_to_the_same_gradient(fp32_run):
    _, fp32, fp32_values = fp32_run
    adapter, values = run_iterations(["speed.micro_batch=2"])  # 3 prompts: passes of 2 and 1
    assert max_difference(weights(adapter), fp32) < 1e-5
    assert values[-1]["loss"] == pytest.approx(fp32_values[-1]["loss"], rel=1e-4, abs=1e-6)


def test_compile_runs_and_matches_eager(fp32_run):
    start, fp32, _ = fp32_run
    adapter, _ = run_iterations(["speed.compile=true"])
    assert max_difference(weights(adapter), start) > 1e-3
    assert max_difference(weights(adapter), fp32) < 1e-4


def test_gradient_checkpointing_goes_through_the_adapter():
    class Checkpointed(DigitsAdapter):
        enabled = 0

        def enable_gradient_checkpointing(self):
            self.enabled += 1

    adapter = Checkpointed(tiny_adapter().net)
    build_training_parts(load_config(None, SMALL + ["speed.gradient_checkpointing=true"]), adapter)
    assert adapter.enabled == 1
    with pytest.warns(UserWarning, match=r"speed.gradient_checkpointing: the DigitsAdapter adapter has no"):
        build_training_parts(load_config(None, SMALL + ["speed.gradient_checkpointing=true"]), tiny_adapter())


def test_bad_speed_values_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"speed.mixed_precision: expected one of \['no', 'bf16', 'fp16'\], got 'fp8'"):
        load_config(None, ["speed.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"speed.micro_batch: expected null or an integer >= 1, got 0"):
        load_config(None, ["speed.micro_batch=0"])
    with pytest.raises(ConfigError, match=r"speed.optimizer: expected one of \['adamw', 'adamw8bit'\], got 'sgd'"):
        load_config(None, ["speed.optimizer=sgd"])
    with pytest.raises(ConfigError, match=r"speed.parallel: expected one of \['auto', 'ddp', 'fsdp'\]"):
        load_config(None, ["speed.parallel=zero3"])
    with pytest.raises(ConfigError, match="speed.compile: expected true or false"):
        load_config(None, ["speed.compile=maybe"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['speed.bf16'\]"):
        load_config(None, ["speed.bf16=true"])


def test_8bit_adamw_without_bitsandbytes_names_the_option_and_the_package():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"speed.optimizer='adamw8bit' needs the bitsandbytes package"):
        build_training_parts(load_config(None, SMALL + ["speed.optimizer=adamw8bit"]), tiny_adapter())


def test_prompts_must_cover_the_processes():
    from neighbor_grpo.parallel.distributed import Processes, check_batch_fits

    check_batch_fits(4, Processes(0, 4))
    with pytest.raises(ValueError, match=r"prompts_per_iteration: 3 prompts \(groups\) cannot be split over 4 processes"):
        check_batch_fits(3, Processes(0, 4))
    # given the group size, a group may span processes: 3 prompts over 4 processes need 2 per prompt at most
    check_batch_fits(3, Processes(0, 4), group_size=2)
    check_batch_fits(1, Processes(0, 8), group_size=8)
    with pytest.raises(ValueError, match=r"prompts_per_iteration: 1 prompts x neighbor_grpo.group_size=4 .*5 processes"):
        check_batch_fits(1, Processes(0, 5), group_size=4, group_field="neighbor_grpo.group_size")


def test_adamw_uses_the_fused_kernel_and_matches_the_loop():
    from neighbor_grpo.training.speed import make_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(net)
    fused = make_optimizer(list(net.parameters()), 1e-2, (0.9, 0.999), 0.01, "adamw")
    loop = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, foreach=False)
    assert fused.param_groups[0]["fused"] is True
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, optimizer in ((net, fused), (twin, loop)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- fp32 master weights: the default of a full fine-tune left at model.dtype auto on CUDA (issue #22 item 10) ----

def test_master_weights_only_for_a_full_fine_tune_left_at_auto_on_cuda():
    bf16 = torch.bfloat16
    assert keeps_master_weights("auto", "cuda", "full", bf16)
    assert keeps_master_weights("auto", "cuda", "full", torch.float16)
    assert not keeps_master_weights("bfloat16", "cuda", "full", bf16)  # the explicit opt-in to pure bf16
    assert not keeps_master_weights("auto", "cuda", "lora", bf16)  # peft's adapters are fp32 already
    assert not keeps_master_weights("auto", "cpu", "full", bf16)
    assert not keeps_master_weights("auto", "cuda", "full", torch.float32)  # the built-in model: fp32 as it is
    assert compute_precision("no", True) == "bf16"  # computes as the loaded bf16 model did
    assert compute_precision("fp16", True) == "fp16"
    assert compute_precision("no", False) == "no" and compute_precision("bf16", False) == "bf16"


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return tiny_diffusers.build_flux(tmp_path_factory.mktemp("tiny") / "flux")


def one_small_step(folder, model_dtype: str, monkeypatch):
    """A full fine-tune of the tiny FLUX loaded in bf16 (what `model.dtype: auto` loads on CUDA), built by
    build_training_parts with CUDA's device type handed to the real decision, then one AdamW step at lr 1e-6 on a
    loss of the training velocity. Returns the weights before (float32), the parts and the adapter."""
    monkeypatch.setattr(parts_module, "keeps_master_weights",
                        lambda dtype, device, finetune, loaded: keeps_master_weights(dtype, "cuda", finetune, loaded))
    config = load_config(None, [f"model.path={folder}", f"model.dtype={model_dtype}", "optim.finetune=full",
                                "optim.lr=1e-6", "optim.weight_decay=0", "neighbor_grpo.ref_beta=1"])
    adapter = load_adapter(folder, options={"height": 16, "width": 16, "max_sequence_length": 8, "dtype": "bfloat16"})
    parts = build_training_parts(config, adapter)
    before = {n: p.detach().float().clone() for n, p in adapter.net.named_parameters()}
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    v = parts.train_velocity(x, torch.tensor(0.5), adapter.encode_prompts(["a red cat", "a blue dog"]))
    v.square().mean().backward()
    parts.optimizer.step()
    return before, parts, adapter


def moved(before: dict, adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per weight element: its size, its change, and whether it had a gradient."""
    params = dict(adapter.net.named_parameters())
    size = torch.cat([before[n].flatten() for n in before]).abs()
    change = torch.cat([(params[n].detach().float() - before[n]).flatten() for n in before]).abs()
    graded = torch.cat([(params[n].grad.float().abs() > 0).flatten() for n in before])
    return size, change, graded


def test_default_full_fine_tune_keeps_an_update_that_pure_bf16_loses(flux_folder, monkeypatch):
    before, parts, adapter = one_small_step(flux_folder, "auto", monkeypatch)
    assert all(p.dtype == torch.float32 for p in adapter.net.parameters())  # fp32 master weights ...
    assert all(s.dtype == torch.float32 for state in parts.optimizer.state.values()
               for k, s in state.items() if k != "step")  # ... and fp32 AdamW moments
    assert all(p.dtype == torch.bfloat16 for p in parts.reference_net.parameters())  # the frozen copy stays bf16
    assert adapter.pipeline.text_encoder_2.dtype == adapter.pipeline.vae.dtype == torch.bfloat16
    size, change, graded = moved(before, adapter)
    large = graded & (size > 2e-3)  # bf16's spacing there is > 2 x 1e-6: pure bf16 rounds the step away
    assert large.sum() > 1000
    # AdamW's first step moves each weight by lr (m / sqrt(v) = +-1): kept, to float32 rounding
    assert change[large].median() == pytest.approx(1e-6, rel=0.02)
    assert (change[large] > 0.5e-6).float().mean() > 0.99

    before, parts, adapter = one_small_step(flux_folder, "bfloat16", monkeypatch)  # the explicit pure-bf16 opt-in
    assert all(p.dtype == torch.bfloat16 for p in adapter.net.parameters())
    size, change, graded = moved(before, adapter)
    assert (graded & (size > 2e-3)).sum() == large.sum()  # the same weights had gradients
    assert float(change[graded & (size > 2e-3)].max()) == 0.0  # every one of their updates was lost
