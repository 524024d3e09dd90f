"""Pretraining of `builtin:words` from scratch: rectified flow on words rendered on the fly, the transformer and the
character encoder trained together, the EMA weights kept. Legibility (rapidocr exact match on held-out words, with
the evaluation sampler) is recorded against CPU time as it trains, and training stops at the first evaluation whose
held-out exact match reaches `stop_exact`: a base that writes words partly legibly, the regime alignment needs.

The base the demo uses is committed (neighbor_grpo/builtin/words_base/, with the command and settings that made it
in pretrain.json), so a fresh machine does not wait ~20 CPU-minutes for it; tests/builtin/test_words_pretrain.py
checks its checksum and that the first 50 steps still give the recorded losses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neighbor_grpo.builtin.cache import cache_root, settings_key
from neighbor_grpo.builtin.words import (HELDOUT_WORDS, TRAIN_WORDS, decode_word_latents, render_words, word_prompt)
from neighbor_grpo.maths.flow import interpolate, sigma_grid
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models.words_pipeline import WordsModelConfig, WordsPipeline, create_words_pipeline
from neighbor_grpo.runs.exports import write_manifest
from neighbor_grpo.runs.io import atomic_write_text

COMMITTED_BASE = Path(__file__).parent / "words_base"
EVAL_SOLVER, EVAL_STEPS = "euler", 32
"""The evaluation sampler: a many-step Euler ODE, neutral between the methods (none trains with it)."""
RECORDED_LOSS_STEPS = 50


@dataclass
class WordsPretrainSettings:
    model: WordsModelConfig = field(default_factory=WordsModelConfig)
    max_steps: int = 7000
    """Upper bound; training normally stops earlier, at the first evaluation with held-out exact >= stop_exact."""
    stop_exact: float = 0.3
    """Stop when the EMA model writes this share of held-out words exactly (rapidocr): inside issue #24's 20-60%."""
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 300
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    variants_per_word: int = 16
    """Jittered renders of each training word drawn once up front (shift <= 3 px, size +-10%): the data bank."""
    eval_every: int = 400
    eval_samples_per_word: int = 2
    """Samples per held-out word at the in-training checks (the final check takes 12: groups of 12)."""
    time_sampling: str = "logit_normal"
    """Flow times of the training pairs: "uniform" on [0, 1], or "logit_normal" (SD3's, mean 0 std 1)."""
    seed: int = 0


def sample_flow_times(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Training flow times: uniform, or SD3's logit-normal (more weight on the middle of the path)."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"time_sampling {kind!r}: expected 'uniform' or 'logit_normal'")


def default_words_dir(settings: WordsPretrainSettings = WordsPretrainSettings()) -> Path:
    return cache_root() / f"words-base-{settings_key(settings)}"


def ocr_reward():
    """The rapidocr recognition-only reader every legibility figure of builtin:words uses (one thread)."""
    from neighbor_grpo.rewards.ocr import make_ocr

    return make_ocr(mode="recognize", engine_options={"intra_op_num_threads": 1, "inter_op_num_threads": 1})


def pipeline_velocity(pipeline: WordsPipeline, prompts: list[str]):
    """v(x, s, _) of a bare pipeline for the solvers (the adapter's velocity without its prompt cache)."""
    with torch.no_grad():
        embeds, pooled = pipeline.encode_prompt(prompts)

    def velocity(x, s, _cond=None):
        t = torch.as_tensor(s, dtype=torch.float32).reshape(-1).expand(x.shape[0]) * 1000
        return pipeline.transformer(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                                    return_dict=False)[0]
    return velocity


@torch.no_grad()
def legibility(pipeline: WordsPipeline, words, samples_per_word: int, reward=None, seed: int = 1234,
               steps: int = EVAL_STEPS, gold=None) -> dict:
    """Exact-match share, mean OCR reward and the share of per-word groups whose rewards are not all equal, over
    `samples_per_word` samples of each word (evaluation sampler, noise keyed by `seed`). With `gold` (another
    reader, e.g. `ocr_tesseract`), its exact-match share and mean reward on the same samples too."""
    reward = reward or ocr_reward()
    prompts = [word_prompt(w) for w in words for _ in range(samples_per_word)]
    noise = torch.randn((len(prompts), *pipeline.latent_shape()), generator=torch.Generator().manual_seed(seed))
    final = integrate(pipeline_velocity(pipeline, prompts), noise, sigma_grid(steps), EVAL_SOLVER).states[-1]
    images = decode_word_latents(final)
    scores = reward(images, prompts).view(len(words), samples_per_word)
    record = {"exact": (scores == 1).float().mean().item(), "reward": scores.mean().item(),
              "groups_with_spread": (scores.max(1).values > scores.min(1).values).float().mean().item()}
    if gold is not None:
        gold_scores = gold(images, prompts)
        record.update(gold_exact=(gold_scores == 1).float().mean().item(), gold_reward=gold_scores.mean().item())
    return record


def weights_sha256(pipeline: WordsPipeline) -> str:
    """A hash of every weight's bytes, in name order (what the CI check of the first steps compares)."""
    digest = hashlib.sha256()
    for module in (pipeline.transformer, pipeline.char_encoder):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_words_model(settings: WordsPretrainSettings = WordsPretrainSettings(), progress: bool = True,
                      max_steps: int | None = None, log=None) -> tuple[WordsPipeline, dict]:
    """Pretrain; returns the EMA pipeline and the record (losses of the first steps, the legibility curve against
    CPU seconds, the stopping step). `max_steps` caps the run without evaluations (the CI check of the first steps).
    `log(record)` is called after every evaluation (the benchmark writes the curve as it goes)."""
    generator = torch.Generator().manual_seed(settings.seed)
    words = [w for w in TRAIN_WORDS for _ in range(settings.variants_per_word)]
    bank = render_words(words, image_size=(settings.model.height, settings.model.width), generator=generator) * 2 - 1
    pipeline = create_words_pipeline(settings.model, seed=settings.seed)
    ids = pipeline.char_encoder.tokenize([word_prompt(w) for w in words])
    ema = copy.deepcopy(pipeline)
    ema.transformer.requires_grad_(False).eval(), ema.char_encoder.requires_grad_(False).eval()
    params = [*pipeline.transformer.parameters(), *pipeline.char_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps))
    reward = None if max_steps else ocr_reward()
    record = {"losses": [], "curve": [], "stopped_at": None}
    cpu_start = time.process_time()
    steps = max_steps or settings.max_steps
    bar = tqdm(range(1, steps + 1), desc="builtin:words base", unit="step", disable=not progress)
    for step in bar:
        batch = torch.randint(0, len(bank), (settings.batch_size,), generator=generator)
        x0, eps = bank[batch], torch.randn(bank[batch].shape, generator=generator)
        s = sample_flow_times(settings.batch_size, settings.time_sampling, generator)
        states, pooled = pipeline.char_encoder(ids[batch])
        v = pipeline.transformer(interpolate(x0, eps, s.view(-1, 1, 1, 1)), encoder_hidden_states=states,
                                 pooled_projections=pooled, timestep=s * 1000, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for module in ("transformer", "char_encoder"):
                for p_ema, p in zip(getattr(ema, module).parameters(), getattr(pipeline, module).parameters()):
                    p_ema.lerp_(p, 1 - settings.ema_decay)
        if step <= RECORDED_LOSS_STEPS:
            record["losses"].append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if max_steps is None and step % settings.eval_every == 0:
            point = {"step": step, "cpu_s": round(time.process_time() - cpu_start, 1), "loss": loss.item(),
                     **legibility(ema, HELDOUT_WORDS, settings.eval_samples_per_word, reward)}
            record["curve"].append(point)
            print(f"step {step}  cpu {point['cpu_s']:.0f} s  held-out exact {point['exact']:.3f}  "
                  f"reward {point['reward']:.3f}", flush=True)
            if log is not None:
                log(ema, record)
            if point["exact"] >= settings.stop_exact:
                record["stopped_at"] = step
                break
    record["train_cpu_s"] = round(time.process_time() - cpu_start, 1)
    return ema, record


def save_words_model(pipeline: WordsPipeline, folder: Path, extra: dict) -> None:
    """The diffusers folder (safetensors) plus pretrain.json, built beside `folder` and renamed into place."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(str(tmp))
    atomic_write_text(tmp / "pretrain.json", json.dumps(extra, indent=2))
    write_manifest(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def pretrain_words(settings: WordsPretrainSettings, folder: Path, progress: bool = True, final_samples: int = 12) -> dict:
    """Pretrain, check the stopped model on the held-out words in groups of `final_samples`, save to `folder`."""
    started = time.process_time()
    partial = folder.with_name(folder.name + ".partial")  # the latest evaluated EMA, kept should the run be stopped

    def keep_partial(ema: WordsPipeline, record: dict) -> None:
        save_words_model(ema, partial, {"settings": asdict(settings), **record})

    pipeline, record = train_words_model(settings, progress=progress, log=keep_partial)
    final = legibility(pipeline, HELDOUT_WORDS, final_samples)
    extra = {"settings": asdict(settings), **record, "heldout_final": {**final, "samples_per_word": final_samples},
             "sampler": {"solver": EVAL_SOLVER, "steps": EVAL_STEPS}, "cpu_s_total": round(time.process_time() - started, 1),
             "threads": torch.get_num_threads(), "torch": torch.__version__,
             "cpu_capability": torch.backends.cpu.get_cpu_capability(), "weights_sha256": weights_sha256(pipeline)}
    save_words_model(pipeline, folder, extra)
    shutil.rmtree(partial, ignore_errors=True)
    return extra


def ensure_words_model(progress: bool = True, settings: WordsPretrainSettings = WordsPretrainSettings()) -> Path:
    """The committed base when it was made with these settings, else the cached one (pretrained on first use)."""
    committed = COMMITTED_BASE / "pretrain.json"
    if committed.is_file() and json.loads(committed.read_text()).get("settings") == asdict(settings):
        return COMMITTED_BASE
    folder = default_words_dir(settings)
    if not (folder / "pretrain.json").is_file():
        pretrain_words(settings, folder, progress=progress)
    return folder
