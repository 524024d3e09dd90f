"""`ngrpo plan` knows Qwen-Image, FLUX.1 Kontext and Wan (2.1, 2.2 TI2V-5B, 2.2 A14B's two experts, one per step):
`arch:NAME` resolves to the model's own adapter; a local diffusers folder of each adapter's pipeline is planned from
its config.json files (an unknown pipeline class is one line); and on tiny random Qwen-Image and Wan pipelines the
planned FLOPs of each phase equal what a real CPU iteration spends in it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from neighbor_grpo.cli import main
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import load_adapter
from neighbor_grpo.plan.models import resolve_model
from neighbor_grpo.plan.planner import plan
from neighbor_grpo.rewards import WeightedRewards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers  # noqa: E402
import tiny_flux2_zimage  # noqa: E402
import tiny_qwen  # noqa: E402
import tiny_wan  # noqa: E402
from real_iteration import counted_iteration, planned_groups  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def build_kontext(folder: Path) -> Path:
    """tiny_diffusers' FLUX.1 components as a FluxKontextPipeline folder (test_flux_kontext's layout)."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    tiny_diffusers.build_flux(folder)
    FluxKontextPipeline(**FluxPipeline.from_pretrained(folder).components).save_pretrained(folder)
    return folder


BUILDERS = {"qwen-image": tiny_qwen.build_qwen_image, "flux-kontext": build_kontext,
            "flux2": tiny_flux2_zimage.build_flux2, "flux2-klein": tiny_flux2_zimage.build_flux2_klein,
            "z-image": tiny_flux2_zimage.build_z_image, "wan": tiny_wan.build_wan,
            "wan22": lambda folder: tiny_wan.build_wan(folder, experts=2),
            "wan22-ti2v": lambda folder: tiny_wan.build_wan(folder, ti2v=True)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_folders")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def test_shipped_models_resolve_to_their_adapter_families():
    qwen = resolve_model("arch:qwen-image", {"max_sequence_length": 256})
    assert qwen.arch == "qwen-image" and qwen.spec["text"] == (256, 3584, 0)
    assert resolve_model("arch:flux-kontext-dev", {}).spec["text"] == (512, 4096, 768)  # T5 tokens, pooled CLIP
    wan = resolve_model("arch:wan21-t2v-1.3b", {})
    assert wan.arch == "wan" and wan.video and wan.spec["text"] == (512, 4096, 0)
    assert 5.6e9 < wan.text_encoders["umt5-xxl-encoder"] < 5.75e9
    ti2v = resolve_model("arch:wan22-ti2v-5b", {})
    assert ti2v.spec["vae"]["z_dim"] == 48 and ti2v.spec["pipeline"] == {"expand_timesteps": True}
    assert resolve_model("arch:wan22-t2v-a14b", {}).spec["pipeline"] == {"boundary_ratio": 0.875}


def small_plan(folder: Path, *extra: str, gpus: int = 1) -> dict:
    config = load_config(None, [f"model.path={folder}", "model.height=32", "model.width=32", "model.num_frames=5",
                                "model.max_sequence_length=8", "prompts_per_iteration=2", "prompts.train=[a cat, a dog]",
                                "prompts.eval=[a cat]", "neighbor_grpo.group_size=4", "neighbor_grpo.rollout_steps=2",
                                "rewards=[{name: pickscore}]", *extra])
    return plan(config, gpus=gpus, gpu="h100-80gb")


@pytest.mark.parametrize("name,family", [("qwen-image", "qwen-image"), ("flux-kontext", "flux-kontext"),
                                         ("flux2", "flux2"), ("flux2-klein", "flux2-klein"), ("z-image", "z-image"),
                                         ("wan", "wan"), ("wan22-ti2v", "wan")])
def test_every_pipeline_folder_is_planned_from_its_config_files(folders, name, family):
    spec = resolve_model(str(folders[name]), {"max_sequence_length": 8})
    assert spec.family == family and spec.text_encoders and all(n > 0 for n in spec.text_encoders.values())
    result = small_plan(folders[name], "optim.finetune=lora")
    assert result["fits"] and result["flops_per_gpu"]["rollout"] > 0 and result["trainable_parameters"] > 0
    assert result["flops_per_gpu"]["reward"] > 0 and result["memory_gib"]["vae"] > 0
    if family == "wan":  # five frames per video, each decoded and scored: five times an image's reward FLOPs
        image = small_plan(folders["qwen-image"], "optim.finetune=lora")
        assert result["frames"] == 5 and result["resolution"] == 32
        assert result["flops_per_gpu"]["reward"] == pytest.approx(5 * image["flops_per_gpu"]["reward"])


def test_wan22_plans_both_experts_trained_and_one_per_call(folders):
    """Wan 2.2 A14B's layout: a LoRA on each expert (twice one expert's trainable parameters and weights), while
    every velocity call runs one expert (the same FLOPs as Wan 2.1's single transformer of that config)."""
    one = small_plan(folders["wan"], "optim.finetune=lora")
    two = small_plan(folders["wan22"], "optim.finetune=lora")
    assert two["trainable_parameters"] == 2 * one["trainable_parameters"]
    assert two["memory_gib"]["weights"] > 1.9 * one["memory_gib"]["weights"]
    for phase in ("rollout", "train"):
        assert two["flops_per_gpu"][phase] == pytest.approx(one["flops_per_gpu"][phase], rel=1e-12)


def test_non_square_videos_are_planned(folders):
    result = small_plan(folders["wan"], "model.height=32", "model.width=48", "model.num_frames=9")
    assert result["resolution"] == "32x48" and result["frames"] == 9
    smaller = small_plan(folders["wan"], "model.num_frames=5")  # 2 latent frames of 2 x 2 tokens, against 3 of 2 x 3
    for phase in ("rollout", "train", "decode", "reward"):
        assert result["flops_per_gpu"][phase] > smaller["flops_per_gpu"][phase]
    assert result["flops_per_gpu"]["reward"] == pytest.approx(9 / 5 * smaller["flops_per_gpu"]["reward"])


def test_an_unknown_pipeline_class_is_one_line(tmp_path, capsys):
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert main(["plan", f"model.path={folder}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model_index.json: _class_name is 'StableDiffusionXLPipeline'" in err
    assert "QwenImagePipeline" in err and "WanPipeline" in err


RED = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


@pytest.mark.parametrize("name,extra", [
    # true CFG with its negative prompt: every call twice, the negative rows made inside the call
    ("qwen-image", ["model.cfg_scale=4.0", "model.negative_prompt=' '", "optim.finetune=lora",
                    "neighbor_grpo.ref_beta=1.0"]),
    ("wan", ["model.cfg_scale=1.0", "optim.finetune=lora", "neighbor_grpo.ref_beta=1.0"]),
    ("wan22", ["model.cfg_scale=3.0", "neighbor_grpo.old_policy=recompute"]),  # both experts, full fine-tune
])
def test_planned_flops_equal_a_real_iteration_per_phase(folders, name, extra, monkeypatch):
    """Every caption is at the planned length: the tiny tokenizers make prompts longer than 8 tokens (Qwen-Image's
    template included), and the pipelines cut them there (Wan pads every caption to it)."""
    torch.manual_seed(0)
    config = load_config(None, [f"model.path={folders[name]}", "model.height=32", "model.width=32",
                                "model.num_frames=5", "model.dtype=float32", "model.max_sequence_length=8",
                                "prompts_per_iteration=2", "prompts.train=[a red cat on a mat, a blue dog in a car]",
                                "prompts.eval=[a cat]", "neighbor_grpo.group_size=4", "neighbor_grpo.rollout_steps=3",
                                "rewards=[{name: jpeg_compressibility}]", *extra])
    result = plan(config, gpus=1, gpu="h100-80gb")
    planned = planned_groups(result)
    adapter = load_adapter(folders[name], options=config.model)
    real = counted_iteration(config, adapter, RED, monkeypatch)
    for key in ("policy/rollout", "policy/old", "policy/grad", "reference", "decode"):
        assert planned.get(key, 0.0) == pytest.approx(real.get(key, 0), rel=1e-9), (key, planned, real)
    assert planned["policy/rollout"] > 0 and planned["policy/grad"] > 0 and planned["decode"] > 0
