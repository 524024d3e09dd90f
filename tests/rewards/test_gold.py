"""The digits gold: split A/B separation, preprocessing, components, the cached fit and its validity checks."""

import json
import pickle

import numpy as np
import pytest
import torch

from neighbor_grpo.builtin import pretrain
from neighbor_grpo.builtin.data import gold_split_b, load_digits_images, train_test_split
from neighbor_grpo.rewards import build_rewards, gold_checks
from neighbor_grpo.rewards.gold import GoldSettings, ensure_gold, load_gold, loo_nn_radius, shifted_copies, user_view

pytestmark = pytest.mark.usefixtures("single_thread")
N_DIGITS = 1797


@pytest.fixture(scope="module")
def gold():
    return load_gold()


# ---- split A / split B ------------------------------------------------------------------------------------------

def test_split_a_and_b_are_disjoint_and_cover_the_digits():
    a, b = train_test_split(N_DIGITS)[0], gold_split_b(N_DIGITS)
    assert len(b) == 359 and len(a) == N_DIGITS - 359
    assert not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(N_DIGITS))


def _poison_b(monkeypatch):
    """load_digits_images as pretrain sees it, with every split-B digit replaced by NaN pixels and label -1:
    a training step that touched one would make NaN weights or fail on the label."""
    real = load_digits_images

    def poisoned(image_size=16):
        images, labels = real(image_size)
        b = gold_split_b(len(labels))
        images, labels = images.clone(), labels.clone()
        images[b], labels[b] = float("nan"), -1
        return images, labels

    monkeypatch.setattr(pretrain, "load_digits_images", poisoned)


def _train_both():
    torch.manual_seed(0)
    classifier, _ = pretrain.train_classifier(pretrain.ClassifierSettings(epochs=1, batch_size=512), progress=False)
    settings = pretrain.BaseModelSettings(steps=3, batch_size=256)
    base = pretrain.train_base_model(settings, progress=False)
    return classifier.state_dict(), base.net.state_dict()


def test_proxy_and_base_model_training_never_read_split_b(monkeypatch):
    clean_classifier, clean_base = _train_both()
    _poison_b(monkeypatch)
    poisoned_classifier, poisoned_base = _train_both()
    # the weights are a function of split A alone: bitwise the same whatever B holds
    for clean, poisoned in ((clean_classifier, poisoned_classifier), (clean_base, poisoned_base)):
        for key in clean:
            assert torch.equal(clean[key], poisoned[key]), key


def test_the_poison_check_catches_training_that_reads_split_b(monkeypatch):
    """The control: the same check fails when training uses every digit, B included."""
    _poison_b(monkeypatch)
    monkeypatch.setattr(pretrain, "train_test_split", lambda n: (np.arange(n), gold_split_b(n)))
    with pytest.raises((IndexError, RuntimeError)):  # label -1 in the embedding / the cross-entropy
        _train_both()


# ---- preprocessing and components ----------------------------------------------------------------------------------

def test_user_view_clamps_quantises_and_pools():
    images = torch.zeros(2, 1, 16, 16)
    images[0, 0, :2, :2] = torch.tensor([[2.0, -3.0], [0.5, 0.5]])  # clamp -> 1, 0, 0.5, 0.5
    images[1] = 0.3
    view = user_view(images)
    assert view.shape == (2, 64)
    assert view[0, 0] == pytest.approx((1.0 + 0.0 + 2 * round(0.5 * 255) / 255) / 4)
    assert view[1, 0] == pytest.approx(round(0.3 * 255) / 255)  # 8-bit quantised
    assert np.all(view[0, 1:] == 0)


def test_user_view_refuses_other_resolutions():
    with pytest.raises(ValueError, match="16x16"):
        user_view(torch.zeros(1, 1, 32, 32))


def test_shifted_copies_move_pixels_by_one():
    grid = np.zeros((1, 64))
    grid[0, 3 * 8 + 3] = 1.0
    copies, labels, source = shifted_copies(grid, np.array([7]), 1, 8)
    assert copies.shape == (9, 64) and set(labels) == {7} and set(source) == {0}
    positions = {int(np.argmax(c)) for c in copies}
    assert positions == {r * 8 + c for r in (2, 3, 4) for c in (2, 3, 4)}


def test_loo_radius_ignores_each_members_own_distance():
    members = np.array([[0.0], [1.0], [3.0]])  # nearest others: 1, 1, 2
    assert loo_nn_radius(members, 0.0) == 1.0
    assert loo_nn_radius(members, 1.0) == 2.0


def test_gold_is_class_probability_times_typical(gold):
    images, labels = load_digits_images(16)
    b = gold_split_b(len(labels))[:40]
    real = images[b]
    noise = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 3 - 1  # outside [0, 1] too
    batch = torch.cat([real, noise, torch.zeros(5, 1, 16, 16)])
    prompts = [str(int(y)) for y in labels[b]] + [str(d) for d in range(10)] + ["1"] * 5
    parts = gold.components(batch, prompts)
    assert set(parts) == {"gold", "gold_class", "typical"}
    assert torch.allclose(parts["gold"], parts["gold_class"] * parts["typical"])
    assert torch.equal(gold(batch, prompts), parts["gold"])
    assert parts["typical"][:40].eq(1).all()  # B's own digits: distance 0 to themselves
    assert parts["typical"][40:].eq(0).all()  # noise and blank images look like no digit
    assert parts["gold_class"][:40].mean() > 0.8
    metrics = gold.extra_metrics(batch, prompts)
    assert metrics["gold"] == pytest.approx(float(parts["gold"].mean()))


def test_gold_reads_the_prompted_class(gold):
    images, labels = load_digits_images(16)
    b = gold_split_b(len(labels))
    seven = images[b][labels[b] == 7][:3]
    right, wrong = gold(seven, ["7"] * 3), gold(seven, ["1"] * 3)
    assert (right > 0.5).all() and (wrong < 0.2).all()
    with pytest.raises(ValueError, match="prompts '0'..'9'"):
        gold(seven[:1], ["cat"])


def test_digit_gold_is_registered_and_cached_once(gold, isolated_cache):
    folder = ensure_gold()
    assert str(folder.parent) == str(isolated_cache) and (folder / "gold.pkl").is_file()
    meta = json.loads((folder / "gold.json").read_text())
    assert meta["settings"] == GoldSettings().__dict__ and len(meta["radii"]) == 10
    reward = build_rewards([{"name": "digit_gold"}]).rewards["digit_gold"]
    images = load_digits_images(16)[0][:8]
    assert torch.equal(reward(images, ["0"] * 8), gold(images, ["0"] * 8))


def test_a_gold_that_no_longer_matches_its_fingerprint_is_refused(gold, tmp_path):
    from sklearn.linear_model import LogisticRegression

    folder = ensure_gold()
    copy = tmp_path / "gold"
    copy.mkdir()
    (copy / "gold.json").write_text((folder / "gold.json").read_text())
    saved = pickle.loads((folder / "gold.pkl").read_bytes())
    x = user_view(load_digits_images(16)[0][:200])
    saved["classifier"] = LogisticRegression(max_iter=200).fit(x, load_digits_images(16)[1][:200].numpy())
    (copy / "gold.pkl").write_bytes(pickle.dumps(saved))
    with pytest.raises(ValueError, match="fingerprint"):
        load_gold(copy)


# ---- validity (pre-registered thresholds; a failure means the gold does not discriminate) ---------------------------

def test_gold_class_accuracy_on_split_a(gold):
    assert gold_checks.gold_class_accuracy_on_a(gold) >= gold_checks.THRESHOLDS["gold_class_accuracy_on_a"]


def test_split_a_real_digits_pass_typical(gold):
    assert gold_checks.typical_share_on_a(gold) >= gold_checks.THRESHOLDS["typical_share_on_a"]


def test_spearman_matches_its_definition():
    x = np.array([0.1, 0.4, 0.4, 0.9, 0.2])
    y = np.array([1.0, 3.0, 2.0, 5.0, 0.0])
    assert gold_checks.average_ranks(x).tolist() == [1.0, 3.5, 3.5, 5.0, 2.0]
    rx, ry = gold_checks.average_ranks(x), gold_checks.average_ranks(y)
    assert gold_checks.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert gold_checks.spearman(x, 2 * x + 1) == pytest.approx(1.0)
    assert gold_checks.spearman(x, -x) == pytest.approx(-1.0)


@pytest.mark.slow
def test_proxy_and_gold_agree_on_base_model_samples(gold, builtin_models):
    scores = gold_checks.proxy_and_gold_on_base(builtin_models["base"], builtin_models["classifier"], gold)
    assert len(scores["gold"]) == 320
    assert gold_checks.spearman(scores["proxy"], scores["gold"]) >= gold_checks.THRESHOLDS["spearman_proxy_gold_base"]


@pytest.mark.slow
def test_pre_registered_hack_run_opens_a_gap_between_proxy_and_gold(builtin_models, tmp_path):
    """`ngrpo train neighbor_grpo.ref_beta=0 optim.lr=1e-3 iterations=150 seed=0` with the gold monitored."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gold_validation.py"
    spec = importlib.util.spec_from_file_location("gold_validation", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    curves, _ = module.hack_run(tmp_path / "hack", "cpu")
    assert curves["iteration"][-1] == 150
    gap = curves["proxy"][-1] - curves["gold"][-1]
    assert gap >= gold_checks.THRESHOLDS["hack_proxy_minus_gold"], curves
