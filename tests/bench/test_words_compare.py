"""`ngrpo compare --base builtin:words` on a tiny random WordsPipeline saved by the test: the task chosen from the
base (proxy `ocr` recognize, gold `ocr_tesseract`, training words to train, held-out words to evaluate, realism
against clean renders of the training words only), one tiny comparison end to end, the refusal without Tesseract,
the bands on the words' held-out prompts, and one iteration of every method of the harness through the bench's
own settings with the OCR proxy, at the forward-equivalent cost the budget assumes."""

import dataclasses
import json
import math

import pytest
import torch

from neighbor_grpo.bench import tasks
from neighbor_grpo.builtin.words import HELDOUT_PROMPTS, HELDOUT_WORDS, TRAIN_PROMPTS, TRAIN_WORDS, render_words
from neighbor_grpo.cli import main
from neighbor_grpo.rewards.tesseract import tesseract_missing

pytest.importorskip("diffusers")
pytest.importorskip("rapidocr_onnxruntime", reason="the words proxy is rapidocr (pip install rapidocr-onnxruntime)")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def few_words(monkeypatch):
    """The words task with 3 held-out words and 2 prompts per iteration: the same code, a test-sized table."""
    task = tasks.TASKS["words"]()
    small = dataclasses.replace(task, eval_prompts=HELDOUT_PROMPTS[:3],
                                settings=tuple(s if not s.startswith("prompts_per_iteration=") else
                                               "prompts_per_iteration=2" for s in task.settings))
    monkeypatch.setitem(tasks.TASKS, "words", lambda: small)
    return small


def test_the_task_is_chosen_from_the_base(words_folder, tmp_path):
    from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig

    digits_folder = tmp_path / "digits"
    DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8)).save(digits_folder)
    words = tasks.task_for_base("builtin:words")
    assert tasks.task_for_base(str(words_folder)).name == "words" and words.name == "words"
    assert tasks.task_for_base("builtin:digits").name == "digits"
    assert tasks.task_for_base(str(digits_folder)).name == "digits"
    assert words.proxy["name"] == "ocr" and words.proxy["kwargs"]["mode"] == "recognize"
    assert words.gold == {"name": "ocr_tesseract"}
    assert words.train_prompts == TRAIN_PROMPTS and words.eval_prompts == HELDOUT_PROMPTS
    assert not set(words.train_prompts) & set(words.eval_prompts)  # never trained on what the table reports
    assert tasks.resolve_words_base(str(words_folder), False) == str(words_folder)
    with pytest.raises(ValueError, match="expected builtin:words or a WordsPipeline folder"):
        tasks.resolve_words_base(str(digits_folder), False)


def test_words_realism_reads_the_training_words_never_the_held_out_ones(words_folder):
    from neighbor_grpo.models import load_adapter
    from neighbor_grpo.training.monitors import nearest_real_distance

    adapter = load_adapter(words_folder)
    reference = tasks.training_words(adapter)
    assert reference.shape == (len(TRAIN_WORDS), 1, 32, 128)
    clean = lambda words: adapter.decode(render_words(words, image_size=(16, 64)) * 2 - 1)  # noqa: E731
    assert nearest_real_distance(clean(TRAIN_WORDS[:5]), reference) < 1e-3  # cdist rounding
    assert nearest_real_distance(clean(HELDOUT_WORDS[:5]), reference) > 0.01  # not in the reference
    noise = torch.rand(5, 1, 32, 128, generator=torch.Generator().manual_seed(0))
    assert nearest_real_distance(noise, reference) > nearest_real_distance(clean(HELDOUT_WORDS[:5]), reference)


def test_a_gold_without_components_is_scored_as_the_gold(words_folder):
    from neighbor_grpo.bench.method_run import DistanceProbe, heldout_record
    from neighbor_grpo.models import load_adapter
    from neighbor_grpo.rewards import build_rewards

    adapter = load_adapter(words_folder)
    proxy = build_rewards([tasks.TASKS["words"]().proxy])
    reader = proxy.rewards["ocr"]  # a gold without `components` (as ocr_tesseract): the reward object itself
    prompts = list(HELDOUT_PROMPTS[:2])
    probe = DistanceProbe(adapter, prompts, 0, 1.0)
    record = heldout_record(adapter, proxy, reader, probe, prompts, 2, 0, 1.0, realism_reference=tasks.training_words)
    assert record["gold"] == pytest.approx(record["proxy"])  # the same reader on the same images
    assert "gold_class" not in record and "typical" not in record
    assert record["realism"] > 0 and record["distance"] == 0.0
    parts = tasks.gold_components(reader, torch.ones(2, 1, 32, 128), prompts)
    assert list(parts) == ["gold"] and parts["gold"].tolist() == [0.0, 0.0]  # a blank image reads as nothing


def _budget_for_three_evaluations(rows: list[str], task) -> float:
    from neighbor_grpo.bench.settings import PAPER_SETTINGS
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.cost import config_schedule, schedule_forward_equivalents

    costs = []
    for row in rows:
        config = load_config(None, ["device=cpu", *task.settings, *PAPER_SETTINGS[row]])
        costs.append(schedule_forward_equivalents(config_schedule(config), config.optim.finetune))
    return 3 * max(costs)


@pytest.mark.skipif(bool(tesseract_missing()), reason=f"the words gold needs Tesseract: {tesseract_missing()}")
def test_a_tiny_words_comparison_runs_end_to_end(words_folder, few_words, tmp_path, monkeypatch):
    """The words task end to end (LoRA, held-out words, Tesseract gold, training-words realism), with a proxy that
    has spread on a random model's samples so the runs move: rapidocr reads nearly all of them as nothing (0), and
    groups without spread give no update (the OCR proxy itself trains in the every-method test below)."""
    from neighbor_grpo.bench.compare import compare

    monkeypatch.setitem(tasks.TASKS, "words", lambda: dataclasses.replace(few_words, proxy={"name": "jpeg_compressibility"}))
    rows = ["neighbor_grpo", "flow_grpo"]
    out = tmp_path / "words.json"
    compare(out, budget_fe=_budget_for_three_evaluations(rows, few_words), lrs=(1e-3,), methods=rows, seeds=(0,),
            evals_per_run=3, eval_samples=2, base_path=str(words_folder), progress=False, grid=False,
            throughput_iters=0)
    saved = json.loads(out.read_text())
    settings = saved["settings"]
    assert settings["task"] == "words" and settings["gold"] == "ocr_tesseract" and settings["finetune"] == "lora"
    assert "training words" in settings["realism_reference"]
    assert settings["eval_prompts"] == list(HELDOUT_PROMPTS[:3]) and settings["train_prompts"] == list(TRAIN_PROMPTS)
    for row in rows:
        run = saved["runs"][row]["0"]
        assert len(run["curve"]) >= 4 and run["curve"][0]["distance"] == 0.0 and run["curve"][-1]["distance"] > 0
        for record in run["curve"]:
            assert 0.0 <= record["gold"] <= 1.0 and math.isfinite(record["proxy"])
            assert "gold_class" not in record and math.isfinite(record["realism"])
    base = [saved["runs"][row]["0"]["curve"][0] for row in rows]  # the same base, the same held-out samples
    assert base[0]["gold"] == base[1]["gold"] and base[0]["proxy"] == base[1]["proxy"]
    assert set(saved["methods"]["flow_grpo"]["final"]) >= {"gold", "proxy", "realism", "diversity"}
    table = (tmp_path / "words.md").read_text()
    assert "| method | lr | knob | FE/iter | s/iter | final gold | final proxy |" in table
    assert "gold_class" not in table and "| flow_grpo | 0.001 |" in table


def test_without_tesseract_the_words_comparison_refuses_naming_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract program on the PATH
    code = main(["compare", "--base", "builtin:words", "--out", str(tmp_path / "r" / "w.json"), "--no-progress",
                 "--budget-fe", "60000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "ocr_tesseract" in err and "apt-get install tesseract-ocr" in err and "pip install pytesseract" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_words_bands_read_the_held_out_prompts_and_the_training_words(words_folder, few_words, tmp_path):
    from neighbor_grpo.bench import rules
    from neighbor_grpo.bench.bands import read_bands, write_bands

    record = write_bands(str(words_folder), tmp_path / "bands.json", samples=2, steps=4)
    assert record["task"] == "words" and record["prompts"] == list(few_words.eval_prompts)
    assert "training words" in record["rule"] and set(record["bands"]) <= set(rules.MONITOR_HARM)
    assert len(record["per_sample"]["realism"]) == 2 * len(few_words.eval_prompts)
    assert len(record["per_sample"]["distance"]) == 3 * 2 * 8  # each word's 8 probe states, swapped for the 2 others
    assert read_bands(tmp_path / "bands.json")["bands"] == record["bands"]
    with pytest.raises(ValueError, match="--realism-split: expected A \\(B: the digits gold's own split"):
        write_bands(str(words_folder), tmp_path / "b.json", samples=2, steps=4, realism_split="B")


def _every_method():
    from neighbor_grpo.bench.settings import PAPER_SETTINGS

    return sorted(PAPER_SETTINGS)


@pytest.mark.parametrize("row", _every_method())
def test_every_method_trains_one_iteration_on_words_with_the_ocr_proxy(words_folder, row):
    from neighbor_grpo.bench.settings import PAPER_SETTINGS
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.cost import config_schedule, forward_equivalents, schedule_forward_equivalents
    from neighbor_grpo.training.iteration import train_iteration, training_counter
    from neighbor_grpo.training.parts import build_training_parts, load_model

    task = tasks.TASKS["words"]()
    proxy, _ = tasks.load_rewards(dataclasses.replace(task, gold=task.proxy), "cpu")  # no Tesseract needed here
    config = load_config(None, ["device=cpu", *task.settings, *PAPER_SETTINGS[row], "prompts_per_iteration=1",
                                "optim.lr=1e-3", "seed=0"])
    adapter = load_model(str(words_folder), "cpu", progress=False)
    parts = build_training_parts(config, adapter)
    assert parts.reference_net is None and any("lora" in n for n, _ in adapter.net.named_parameters())
    counter = training_counter(adapter, parts)
    values, skipped = train_iteration(config, adapter, proxy, parts.algorithm, parts.optimizer, parts.params, None,
                                      parts.reference_velocity, list(task.train_prompts), 0, lambda point: None,
                                      parts=parts)
    no_grad, with_grad = counter.reset()
    counter.remove()
    assert skipped == "" and 0.0 <= values["reward_ocr"] <= 1.0  # the OCR reader scored every sample
    assert math.isfinite(values["loss"]) and all(math.isfinite(v) for v in values.values() if isinstance(v, float))
    # the cost the comparison's budget and its evaluation points are computed from
    assert forward_equivalents(no_grad, with_grad, config.optim.finetune) == pytest.approx(
        schedule_forward_equivalents(config_schedule(config), config.optim.finetune))
