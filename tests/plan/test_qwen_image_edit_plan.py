"""`ngrpo plan` knows Qwen-Image-Edit, -2509 and -2511 (QwenImageEditPipeline / QwenImageEditPlusPipeline): `arch:NAME`
resolves to the Edit adapters with Qwen-Image's 20 B transformer and Qwen2.5-VL-7B; the text condition holds the
source image's tokens in the VL encoder's prompt (Edit: its ~1 MP copy, Plus: its ~384 x 384 copy) besides the
caption; a local folder of either pipeline is planned from its config files (its processor's preprocessor_config.json
included); and on tiny random Edit and Edit-Plus pipelines the planned FLOPs of each phase equal a real CPU
iteration's on a JSONL editing prompt set.

As in tests/models/test_qwen_image_edit.py, the pipelines' ~1 MP source areas are shrunk in their modules (the
adapters and the planner read the same module values), so the tiny sources are 64 x 64 (Plus's VL copy 32 x 32)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from neighbor_grpo.cli import main
from neighbor_grpo.config.prompts import EditPrompt
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import load_adapter
from neighbor_grpo.plan.architectures import COMPONENTS, parameter_count
from neighbor_grpo.plan.models import resolve_model
from neighbor_grpo.plan.planner import plan
from neighbor_grpo.plan.trace import meta_adapter
from neighbor_grpo.rewards import WeightedRewards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers  # noqa: E402
import tiny_qwen  # noqa: E402
from real_iteration import counted_iteration, planned_groups  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def small_source_areas():
    with tiny_qwen.small_source_areas():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_plan_folders")
    return {"edit": tiny_qwen.build_qwen_image_edit(root / "edit"),
            "plus": tiny_qwen.build_qwen_image_edit(root / "plus", plus=True)}


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """Two square 24 x 24 sources (the planner's sources have the output's aspect ratio) and two instructions of
    one length (the tiny tokenizer spells character by character), so every call's text is the same length."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("edit_plan_prompts")
    generator = torch.Generator().manual_seed(5)
    rows = []
    for name, text in (("one", "make it red"), ("two", "make it tan")):
        pixels = (torch.rand(24, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{name}.png")
        rows.append({"prompt": text, "image": f"{name}.png"})
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def test_shipped_edit_models_resolve_with_the_source_images_vl_tokens():
    """At 1024 px the Edit source is 1024 x 1024, which Qwen2.5-VL's processor (sides multiples of 28) makes
    1036 x 1036: 74 x 74 patches, 2x2 merged = 1369 tokens; Plus's 384 x 384 copy is 392 x 392: 28 x 28 / 4 = 196.
    A 512 px output keeps the ~1 MP source, so the same tokens."""
    edit = resolve_model("arch:qwen-image-edit", {"max_sequence_length": 256})
    assert edit.family == "qwen-image-edit" and edit.edits and edit.spec["text"] == (256 + 1369, 3584, 0)
    assert resolve_model("arch:qwen-image-edit", {"max_sequence_length": 256, "height": 512}).spec["text"][0] == 256 + 1369
    for name in ("qwen-image-edit-2509", "qwen-image-edit-2511"):
        plus = resolve_model(f"arch:{name}", {})
        assert plus.family == "qwen-image-edit-plus" and plus.spec["text"] == (1024 + 196, 3584, 0)
    assert resolve_model("arch:qwen-image-edit-2511", {}).spec["transformer"]["zero_cond_t"]
    assert abs(edit.text_encoders["qwen2.5-vl-7b"] - 8.29e9) <= 0.01 * 8.29e9  # Qwen2.5-VL-7B's published 8.29 B


def test_the_planned_edit_adapter_holds_the_published_20b_transformer_and_a_source_per_prompt():
    """The adapter the planner traces (meta weights) is the Edit adapter around Qwen-Image-Edit's 20 B MMDiT (the
    config counts 20.43 B); its stand-in features carry the source latents: a 1024 x 1024 source at 512 px output
    is 128 x 128 latents (VAE factor 8), 4096 tokens after the 512 px image's 1024."""
    from neighbor_grpo.models import QwenImageEditAdapter

    spec = resolve_model("arch:qwen-image-edit", {"max_sequence_length": 16, "height": 512})
    adapter = meta_adapter(spec.arch, spec.spec, 512, torch.bfloat16, {"cfg_scale": 1.0})
    assert type(adapter) is QwenImageEditAdapter
    count = parameter_count(adapter.net)
    assert count == parameter_count_of("qwen-image-edit-transformer")
    assert abs(count - 20e9) <= COMPONENTS["qwen-image-edit-transformer"].tolerance * 20e9, count
    features = adapter.encode_new_prompts([EditPrompt("a plan", "unused.png")])
    assert features["image_latents"].shape == (1, 16, 128, 128)
    assert features["prompt_embeds"].shape == (1, 16 + 1369, 3584)


def parameter_count_of(name: str) -> int:
    from neighbor_grpo.plan.architectures import build_on_meta

    return parameter_count(build_on_meta(name))


def small_plan(folder: Path, *extra: str) -> dict:
    config = load_config(None, [f"model.path={folder}", "model.height=32", "model.width=32",
                                "model.max_sequence_length=8", "prompts_per_iteration=2", "prompts.train=[a cat, a dog]",
                                "prompts.eval=[a cat]", "neighbor_grpo.group_size=4", "neighbor_grpo.rollout_steps=2",
                                "rewards=[{name: pickscore}]", *extra])
    return plan(config, gpus=1, gpu="h100-80gb")


@pytest.mark.usefixtures("small_source_areas")
@pytest.mark.parametrize("variant,family", [("edit", "qwen-image-edit"), ("plus", "qwen-image-edit-plus")])
def test_pipeline_folders_are_planned_from_their_config_files(folders, variant, family):
    """The folder's processor (56 x 56 .. 224 x 224 pixels, tiny_qwen.PROCESSOR_SIZE) sizes the VL tokens: a 64 x 64
    Edit source is resized to 56 x 56, 4 x 4 patches, 4 tokens; Plus's 32 x 32 copy is brought up to the 56 x 56
    minimum, the same 4."""
    spec = resolve_model(str(folders[variant]), {"max_sequence_length": 8, "height": 32})
    assert spec.family == family and spec.spec["text"] == (8 + 4, 16, 0)
    assert spec.text_encoders and all(n > 0 for n in spec.text_encoders.values())
    result = small_plan(folders[variant], "optim.finetune=lora")
    assert result["fits"] and result["flops_per_gpu"]["rollout"] > 0 and result["trainable_parameters"] > 0
    assert result["flops_per_gpu"]["reward"] > 0 and result["memory_gib"]["vae"] > 0


@pytest.mark.usefixtures("small_source_areas")
def test_velocity_calls_in_chunks_plan_the_same_flops(folders):
    """model.forward_batch_size slices a call's rows inside it (fake rows, under the planner's fake mode): the source
    latents and CFG's negative rows are read from those slices too (a fit option tries this on every run that does not
    fit). Chunks change how many samples run at once, never the FLOPs."""
    whole = small_plan(folders["edit"], "optim.finetune=lora", "model.cfg_scale=4.0", "model.negative_prompt=' '")
    chunked = small_plan(folders["edit"], "optim.finetune=lora", "model.cfg_scale=4.0", "model.negative_prompt=' '",
                         "model.forward_batch_size=3")
    for phase, flops in whole["flops_per_gpu"].items():
        assert chunked["flops_per_gpu"][phase] == pytest.approx(flops, rel=1e-9), phase


def test_an_edit_folder_without_its_processor_settings_is_one_line(folders, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(folders["edit"], tmp_path / "edit")
    (folder / "processor" / "processor_config.json").unlink()  # what transformers 5 saves the settings in
    assert main(["plan", f"model.path={folder}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "processor: expected the VL image processor's settings" in err


RED = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


def vl_image_pad_tokens(adapter, path: Path) -> int:
    """The `<|image_pad|>` tokens the real processor puts in the VL prompt for this source (what the planner adds to
    the caption's tokens)."""
    from PIL import Image

    condition, _ = adapter.source_inputs(Image.open(path).convert("RGB"))
    processor = adapter.pipeline.processor
    ids = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=condition, return_tensors="pt")
    return int((ids["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


@pytest.mark.usefixtures("small_source_areas")
@pytest.mark.parametrize("variant,extra", [
    # true CFG with its negative prompt on the same source: every call twice, the negative rows made in the call
    ("edit", ["model.cfg_scale=4.0", "model.negative_prompt=' '", "optim.finetune=lora", "neighbor_grpo.ref_beta=1.0"]),
    ("plus", ["model.cfg_scale=1.0", "neighbor_grpo.old_policy=recompute"]),  # 2511's zero_cond_t, full fine-tune
])
def test_planned_flops_equal_a_real_iteration_per_phase(folders, edits, variant, extra, monkeypatch):
    """The caption's share of the text condition is an input of the plan (model.max_sequence_length): it is set to
    what the tiny tokenizer makes of these prompts; the source image's VL tokens, the source latents' tokens, the
    calls and their batches are the planner's own."""
    torch.manual_seed(0)
    overrides = [f"model.path={folders[variant]}", "model.height=32", "model.width=32", "model.dtype=float32",
                 "prompts_per_iteration=2", f"prompts.file={edits / 'edits.jsonl'}",
                 f"prompts.eval_file={edits / 'edits.jsonl'}", "neighbor_grpo.group_size=4",
                 "neighbor_grpo.rollout_steps=3", "rewards=[{name: jpeg_compressibility}]", *extra]
    adapter = load_adapter(folders[variant], options=load_config(None, overrides).model)
    prompts = [EditPrompt("make it red", edits / "one.png"), EditPrompt("make it tan", edits / "two.png")]
    rows = adapter.encode_prompts(prompts)
    lengths = {int(adapter.cache.tensors["prompt_lengths"][r]) for r in rows.tolist()}
    assert len(lengths) == 1
    image_tokens = vl_image_pad_tokens(adapter, edits / "one.png")
    assert image_tokens == 4  # 64 x 64 (Plus: 32 x 32) -> the tiny processor's 56 x 56 minimum -> 4 x 4 patches / 4
    caption = lengths.pop() - image_tokens
    config = load_config(None, [*overrides, f"model.max_sequence_length={caption}"])
    result = plan(config, gpus=1, gpu="h100-80gb")
    planned = planned_groups(result)
    adapter = load_adapter(folders[variant], options=config.model)
    real = counted_iteration(config, adapter, RED, monkeypatch)
    for key in ("policy/rollout", "policy/old", "policy/grad", "reference", "decode"):
        assert planned.get(key, 0.0) == pytest.approx(real.get(key, 0), rel=1e-9), (key, planned, real)
    assert planned["policy/rollout"] > 0 and planned["policy/grad"] > 0 and planned["decode"] > 0
