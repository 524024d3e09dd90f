import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Built models go to a fresh cache for the test session (the tests build what they need themselves).
    Developers iterating locally may set NGRPO_TEST_CACHE to a folder kept between sessions (CI never does)."""
    kept = os.environ.get("NGRPO_TEST_CACHE")
    cache = tmp_path_factory.mktemp("ngrpo-cache") if not kept else os.path.abspath(kept)
    previous = os.environ.get("NGRPO_CACHE")
    os.environ["NGRPO_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("NGRPO_CACHE", None)
    else:
        os.environ["NGRPO_CACHE"] = previous


@pytest.fixture(scope="session")
def builtin_models(isolated_cache):
    """The built-in base model and reward classifier, built once per session with the default settings."""
    from neighbor_grpo.builtin.pretrain import ensure_base_model, ensure_classifier

    classifier_dir, accuracy = ensure_classifier(progress=False)
    base_dir = ensure_base_model(progress=False)
    return {"base": base_dir, "classifier": classifier_dir, "classifier_accuracy": accuracy}


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules that ask for it: tiny tensors gain nothing from threads, on a busy 2-core
    machine OpenMP spinning made the same test take 1.5 s or 17 s, and the fault tests compare bitwise with a
    single-threaded subprocess. Restored afterwards."""
    from neighbor_grpo.builtin.demo import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def words_folder(tmp_path_factory):
    """A tiny random WordsPipeline saved as a diffusers folder (one per test module)."""
    from neighbor_grpo.models.words_pipeline import WordsModelConfig, create_words_pipeline

    folder = tmp_path_factory.mktemp("tiny-words") / "words"
    create_words_pipeline(WordsModelConfig(dim=32, heads=2, num_layers=1), seed=0).save_pretrained(folder)
    return folder
