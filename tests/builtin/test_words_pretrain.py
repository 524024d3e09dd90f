"""builtin:words pretraining: the first 50 steps against the recorded reference (cheap: tiny steps), and the
committed base (its checksums, that this code's first steps are the ones that built it, its legibility record)."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = Path(__file__).parent / "data" / "words_first_steps.json"


def same_setup(recorded: dict) -> bool:
    """Bitwise equality is promised only on the torch build, CPU kernels and thread count that recorded it."""
    return (recorded["torch"], recorded["cpu_capability"], recorded["threads"]) == (
        torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())


def test_first_50_steps_give_the_recorded_losses_and_weights():
    from neighbor_grpo.builtin.words_pretrain import (RECORDED_LOSS_STEPS, WordsPretrainSettings, train_words_model,
                                                      weights_sha256)

    reference = json.loads(REFERENCE.read_text())
    pipeline, record = train_words_model(WordsPretrainSettings(), progress=False, max_steps=RECORDED_LOSS_STEPS)
    assert len(record["losses"]) == RECORDED_LOSS_STEPS
    assert record["losses"][-1] < 0.9 * record["losses"][0]  # it learns
    if same_setup(reference):
        assert record["losses"] == reference["losses"]
        assert weights_sha256(pipeline) == reference["ema_weights_sha256"]
    else:  # another torch or CPU: the same computation up to float rounding
        torch.testing.assert_close(torch.tensor(record["losses"]), torch.tensor(reference["losses"]), rtol=1e-3, atol=0)


def test_the_committed_base_is_intact_and_was_built_by_this_code():
    from neighbor_grpo.builtin.pretrain import ensure_builtin_model
    from neighbor_grpo.builtin.words_pretrain import COMMITTED_BASE, WordsPretrainSettings
    from neighbor_grpo.models import load_adapter
    from neighbor_grpo.models.words import WordsAdapter
    from neighbor_grpo.runs.exports import verify_manifest
    from dataclasses import asdict

    if not (COMMITTED_BASE / "pretrain.json").is_file():
        pytest.skip("no committed builtin:words base yet (neighbor_grpo/builtin/words_base/); ngrpo pretrain --model "
                    "words builds one into the cache")
    record = json.loads((COMMITTED_BASE / "pretrain.json").read_text())
    verify_manifest(COMMITTED_BASE)  # every file's sha256 as recorded when it was built
    assert record["settings"] == asdict(WordsPretrainSettings())
    reference = json.loads(REFERENCE.read_text())
    torch.testing.assert_close(torch.tensor(record["losses"]), torch.tensor(reference["losses"]), rtol=1e-3, atol=0)
    final = record["heldout_final"]
    assert 0.2 <= final["exact"] <= 0.6 and final["samples_per_word"] == 12  # issue #24's window
    assert ensure_builtin_model("words", progress=False) == COMMITTED_BASE  # used as is, not rebuilt
    assert isinstance(load_adapter(COMMITTED_BASE), WordsAdapter)
