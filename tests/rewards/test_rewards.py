"""Rewards: registry and dotted-path factories, output checks, weighted combination, clamping, the model-free
JPEG reward and the built-in digit classifier reward."""

import sys

import pytest
import torch

import neighbor_grpo.rewards as rewards_module
from neighbor_grpo.builtin.data import load_digits_images, train_test_split
from neighbor_grpo.rewards import WeightedRewards, build_rewards, check_scores, register_reward
from neighbor_grpo.rewards.compressibility import make_jpeg_compressibility
from neighbor_grpo.rewards.digit_classifier import make_digit_probability_reward


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test go to a copy of the registry, so they do not leak into other tests."""
    monkeypatch.setattr(rewards_module, "REWARDS", dict(rewards_module.REWARDS))
    return rewards_module.REWARDS


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


# ---- building rewards -------------------------------------------------------------------------------------------

def test_registered_reward_builds_by_name(private_registry):
    seen = {}

    @register_reward("test_brightness")
    def make(scale=1.0):
        seen["scale"] = scale
        return lambda images, prompts: scale * brightness(images, prompts)

    assert private_registry["test_brightness"] is make
    combined = build_rewards([{"name": "test_brightness", "weight": 0.5, "kwargs": {"scale": 2.0}}])
    assert seen["scale"] == 2.0
    assert list(combined.rewards) == ["test_brightness"]
    assert combined.weights == {"test_brightness": 0.5}
    images = torch.rand(3, 1, 4, 4)
    scores = combined.score(images, ["0", "1", "2"])
    torch.testing.assert_close(scores["test_brightness"], 2.0 * images.mean(dim=(1, 2, 3)))


def test_unknown_reward_name_is_refused_with_the_registered_ones(private_registry):
    with pytest.raises(ValueError, match="no_such_reward") as info:
        build_rewards([{"name": "no_such_reward"}])
    assert "digit_prob" in str(info.value) and "jpeg_compressibility" in str(info.value)


USER_MODULE = '''
import torch

def make_darkness(offset=0.0, device="cpu"):
    def darkness(images, prompts):
        return 1.0 - images.mean(dim=(1, 2, 3)) + offset
    darkness.device = device
    return darkness
'''


@pytest.mark.parametrize("separator", [":", "."])
def test_dotted_path_factory_builds(tmp_path, monkeypatch, separator):
    module_name = f"user_rewards_{'colon' if separator == ':' else 'dot'}"
    (tmp_path / f"{module_name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    name = f"{module_name}{separator}make_darkness"
    combined = build_rewards([{"name": name, "kwargs": {"offset": 0.25}, "label": "dark"}], device="cpu")
    assert list(combined.rewards) == ["dark"]
    assert combined.rewards["dark"].device == "cpu"  # the factory's `device` parameter is filled in
    images = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(combined.score(images, ["0", "1"])["dark"], 1.25 - images.mean(dim=(1, 2, 3)))


def test_dotted_path_that_cannot_be_imported(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_missing_attr.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="user_rewards_missing_attr:make_nothing"):
        build_rewards([{"name": "user_rewards_missing_attr:make_nothing"}])
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        build_rewards([{"name": "no_such_module_xyz:make"}])


def test_same_reward_twice_with_labels(private_registry):
    register_reward("test_const")(lambda value=0.0: (lambda images, prompts: torch.full((len(prompts),), value)))
    combined = build_rewards([{"name": "test_const", "kwargs": {"value": 1.0}, "label": "one", "weight": 2.0},
                              {"name": "test_const", "kwargs": {"value": 3.0}, "label": "three", "weight": -1.0}])
    scores = combined.score(torch.rand(4, 1, 2, 2), ["0"] * 4)
    assert set(scores) == {"one", "three"}
    torch.testing.assert_close(combined.total(scores), torch.full((4,), 2.0 * 1.0 - 3.0))


# ---- check_scores -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, error, words", [
    (torch.zeros(3), ValueError, "shape"),                      # wrong count
    (torch.zeros(4, 1), ValueError, "shape"),                   # an extra dimension
    (torch.zeros(()), ValueError, "shape"),                     # a scalar
    ([0.1, 0.2, 0.3, 0.4], TypeError, "list"),                  # not a tensor
    (torch.arange(4), TypeError, "int64"),                      # not floating point
    (torch.tensor([0.1, float("nan"), 0.3, 0.4]), FloatingPointError, "NaN"),
    (torch.tensor([0.1, float("inf"), 0.3, 0.4]), FloatingPointError, "inf"),
])
def test_check_scores_refuses_bad_outputs_naming_the_reward(scores, error, words):
    with pytest.raises(error) as info:
        check_scores(scores, 4, "my_reward")
    assert "'my_reward'" in str(info.value)
    assert words in str(info.value)


def test_check_scores_accepts_and_converts_to_float32():
    out = check_scores(torch.tensor([1.0, 2.0], dtype=torch.float64), 2, "r")
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("bad", [lambda images, prompts: [0.0] * len(prompts),
                                 lambda images, prompts: torch.zeros(len(prompts), dtype=torch.long),
                                 lambda images, prompts: torch.zeros(len(prompts) + 1),
                                 lambda images, prompts: torch.full((len(prompts),), float("nan"))],
                         ids=["list", "int", "shape", "nan"])
def test_weighted_rewards_checks_each_reward_by_its_label(bad):
    combined = WeightedRewards({"good": brightness, "broken_one": bad})
    with pytest.raises((TypeError, ValueError, FloatingPointError), match="broken_one"):
        combined.score(torch.rand(3, 1, 4, 4), ["0", "1", "2"])


# ---- combination and clamping -----------------------------------------------------------------------------------

def test_total_is_the_weighted_sum():
    images = torch.rand(5, 1, 4, 4)
    prompts = ["0"] * 5
    combined = WeightedRewards({"bright": brightness, "first_pixel": lambda im, p: im[:, 0, 0, 0]},
                               {"bright": 0.3, "first_pixel": -2.0})
    scores = combined.score(images, prompts)
    expected = 0.3 * images.mean(dim=(1, 2, 3)) - 2.0 * images[:, 0, 0, 0]
    torch.testing.assert_close(combined.total(scores), expected)


def test_missing_weight_counts_as_one():
    images = torch.rand(2, 1, 3, 3)
    combined = WeightedRewards({"bright": brightness})
    scores = combined.score(images, ["0", "1"])
    torch.testing.assert_close(combined.total(scores), images.mean(dim=(1, 2, 3)))


def test_images_are_clamped_before_scoring():
    seen = []

    def spy(images, prompts):
        seen.append(images.clone())
        return images.mean(dim=(1, 2, 3))

    raw = torch.linspace(-1.5, 2.5, 2 * 16).view(2, 1, 4, 4)
    combined = WeightedRewards({"spy": spy})
    scores = combined.score(raw, ["0", "1"])
    assert seen[0].min() >= 0.0 and seen[0].max() <= 1.0
    torch.testing.assert_close(seen[0], raw.clamp(0, 1))
    torch.testing.assert_close(scores["spy"], raw.clamp(0, 1).mean(dim=(1, 2, 3)))
    assert raw.min() < 0  # the caller's tensor is not modified in place


def test_scoring_runs_without_gradients():
    def needs_no_grad(images, prompts):
        assert not torch.is_grad_enabled()
        return images.mean(dim=(1, 2, 3))

    images = torch.rand(2, 1, 4, 4, requires_grad=True)
    scores = WeightedRewards({"r": needs_no_grad}).score(images, ["0", "1"])
    assert not scores["r"].requires_grad


# ---- the model-free reward --------------------------------------------------------------------------------------

def test_jpeg_compressibility_prefers_a_constant_image_over_noise():
    reward = make_jpeg_compressibility()
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([torch.full((1, 16, 16), 0.5), torch.rand((1, 16, 16), generator=generator)])
    scores = check_scores(reward(images, ["0", "0"]), 2, "jpeg_compressibility")
    assert (scores < 0).all()  # minus a size in kilobytes
    assert scores[0] > scores[1]


def test_jpeg_compressibility_is_built_by_name_and_handles_colour():
    combined = build_rewards([{"name": "jpeg_compressibility", "kwargs": {"quality": 50}}])
    generator = torch.Generator().manual_seed(1)
    images = torch.stack([torch.zeros(3, 16, 16), torch.rand((3, 16, 16), generator=generator)])
    scores = combined.score(images, ["a", "b"])["jpeg_compressibility"]
    assert scores.shape == (2,)
    assert scores[0] > scores[1]


# ---- the built-in digit reward with the real classifier ---------------------------------------------------------

@pytest.fixture(scope="module")
def heldout_digits():
    images, labels = load_digits_images(16)
    _, test_idx = train_test_split(len(labels))
    return images[test_idx], labels[test_idx]


@pytest.fixture(scope="module")
def digit_reward(builtin_models):
    return make_digit_probability_reward(path=str(builtin_models["classifier"]))


def test_classifier_heldout_accuracy(builtin_models):
    assert builtin_models["classifier_accuracy"] >= 0.97, builtin_models["classifier_accuracy"]


def test_real_digits_score_high_for_their_prompt_and_low_for_another(digit_reward, heldout_digits):
    images, labels = heldout_digits
    for digit in range(10):
        batch = images[labels == digit]
        right = digit_reward(batch, [str(digit)] * len(batch))
        wrong = digit_reward(batch, [str((digit + 3) % 10)] * len(batch))
        assert right.median() > 0.9, (digit, float(right.median()))
        assert wrong.median() < 0.05, (digit, float(wrong.median()))
        assert (right > wrong).float().mean() > 0.95, digit


def test_accuracy_metric_matches_the_classifiers_heldout_accuracy(builtin_models, digit_reward, heldout_digits):
    images, labels = heldout_digits
    prompts = [str(int(y)) for y in labels]
    accuracy = digit_reward.extra_metrics(images, prompts)["accuracy"]
    # the same held-out split the pretraining measured on
    assert accuracy == pytest.approx(builtin_models["classifier_accuracy"], abs=1e-6)
    shifted = [str((int(y) + 1) % 10) for y in labels]
    assert digit_reward.extra_metrics(images, shifted)["accuracy"] < 0.05


def test_digit_prob_by_name_with_path_kwarg(builtin_models, heldout_digits):
    images, labels = heldout_digits
    combined = build_rewards([{"name": "digit_prob", "kwargs": {"path": str(builtin_models["classifier"])}}])
    scores = combined.score(images[:20], [str(int(y)) for y in labels[:20]])["digit_prob"]
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.mean() > 0.9


def test_digit_prob_refuses_unknown_prompts(digit_reward, heldout_digits):
    images, _ = heldout_digits
    with pytest.raises(ValueError, match="'cat'"):
        digit_reward(images[:1], ["cat"])


def test_missing_classifier_path_names_the_path(tmp_path):
    missing = tmp_path / "no-classifier-here"
    with pytest.raises(FileNotFoundError) as info:
        make_digit_probability_reward(path=str(missing))
    assert str(missing) in str(info.value)
