"""Typed run configuration: dataclasses with one docstring per field, YAML in, `key=value` overrides,
unknown keys refused, every value checked with a message that names the field."""

from __future__ import annotations

import ast
import dataclasses
import math
import inspect
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from neighbor_grpo.config.algorithm_settings import (ALGORITHM_SETTINGS, SOLVER_NAMES, AWMConfig, DanceGRPOConfig,
                                              DGPOConfig, DiffusionNFTConfig, FlowGRPOConfig, MixGRPOConfig, NeighborGRPOConfig)

DIGITS = [str(d) for d in range(10)]


@dataclass
class ModelConfig:
    path: str = "builtin:digits"
    """A model checkpoint folder (model.json + weights), a local diffusers folder (model_index.json naming
    FluxPipeline, StableDiffusion3Pipeline, Flux2Pipeline, Flux2KleinPipeline, ZImagePipeline, QwenImagePipeline,
    FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline or WanPipeline; nothing is downloaded), or
    'builtin:digits' for the cached built-in base model (pretrained on first use); 'builtin:digits-unet' is its
    compute-bound conv U-Net sibling (~17 MFLOP per sample against 1.7, for wall-clock benchmarks; pretraining takes
    several minutes); 'builtin:digits-reflow' is a few-step student of 'builtin:digits' (reflow, `ngrpo distill`;
    1-4 Euler steps land near its 32-step samples). 'builtin:words' draws the quoted word of prompts like
    'the word "cat"' (a small SD3 transformer, scored by the `ocr` reward)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Diffusers models: weight/compute dtype of transformer, text encoders and VAE ('auto': bfloat16 on CUDA,
    float32 on CPU). Latents stay float32 in the solvers. LoRA weights are kept in float32 by peft. A full
    fine-tune at 'auto' on CUDA keeps the trained transformer, its gradients and AdamW moments in float32 (fp32
    master weights) and computes in bf16; frozen copies, text encoders and VAE stay bf16. An explicit 'bfloat16'
    is pure bf16 (half the optimizer memory, but an update smaller than 2^-9 of a weight rounds away: at lr 1e-6,
    every weight above ~0.0005)."""
    height: int | None = None
    """Diffusers models: image height in pixels, a multiple of 16 (null: the checkpoint's default, 1024)."""
    width: int | None = None
    """Diffusers models: image width in pixels, a multiple of 16 (null: the checkpoint's default, 1024)."""
    num_frames: int | None = None
    """Video models (Wan): frames per video, 4k + 1 for Wan's VAE (null: the pipeline's default, 81)."""
    guidance: float = 3.5
    """FLUX.1 and FLUX.2 [dev]: the guidance-embedding value (their distilled guidance; no extra cost). Used in
    rollouts, the training step and evaluation alike. Ignored by checkpoints without a guidance embedding (schnell,
    FLUX.2 [klein]), by SD3 and by Z-Image."""
    cfg_scale: float = 4.5
    """SD3/SD3.5, Qwen-Image, Wan, FLUX.2 [klein] base, Z-Image: classifier-free guidance scale w,
    v_neg + w (v_pos - v_neg) (> 1 enables CFG, which doubles the cost of every model call; 1 disables it:
    Z-Image-Turbo; Qwen-Image's card uses 4.0; Z-Image's own guidance_scale is w - 1). Used in rollouts, the
    training step and evaluation alike. Ignored by FLUX.1, FLUX.1 Kontext, FLUX.2 [dev] and the step-distilled
    [klein] checkpoints."""
    negative_prompt: str = ""
    """SD3/SD3.5, Qwen-Image, Wan, FLUX.2 [klein], Z-Image: the negative prompt of classifier-free guidance
    (Qwen-Image's card uses " ")."""
    max_sequence_length: int | None = None
    """Diffusers models: prompt tokens of the text encoder (null: T5's 512 for FLUX.1, 256 for SD3; 512 for FLUX.2
    and Z-Image; Qwen2.5-VL's 1024 for Qwen-Image)."""
    offload_text_encoders: bool = False
    """Diffusers models: keep the text encoders on the CPU and move them to the device only while new prompts are
    encoded (prompt embeddings are cached, so this is rare once the prompts have been seen)."""
    prompt_cache_on_cpu: bool = False
    """Diffusers models: keep the cached prompt embeddings in CPU memory (FLUX: about 4 MB per prompt in bf16) and
    move only the rows a call needs to the device."""
    forward_batch_size: int = 0
    """Diffusers models: run the transformer on at most this many samples at a time (0: the whole batch)."""
    decode_batch_size: int = 4
    """Diffusers models: VAE-decode this many latents at a time."""
    vae_tiling: bool = False
    """Diffusers models: decode each image in overlapping tiles (diffusers' enable_tiling), for large images on small
    cards; the seams are blended, so images differ very slightly from untiled decoding."""
    offload_vae: bool = False
    """Diffusers models: keep the VAE on the CPU and move it to the device only while it decodes."""
    export_pipeline: bool = False
    """Diffusers models: exports (best/, aligned/) are complete diffusers pipeline folders (a LoRA merged in)
    instead of a LoRA file (pytorch_lora_weights.safetensors) or a transformer/ folder next to a reference to the
    base folder."""


@dataclass
class RewardSpec:
    name: str = "digit_prob"
    """A registered reward (digit_prob, jpeg_compressibility, ...) or a dotted path 'package.module:factory'."""
    weight: float = 1.0
    """Weight of this reward in the combination; 0 makes it a monitor (logged, not trained on; a warning), and at
    least one weight must be != 0."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for the reward's factory (e.g. path of its weights)."""
    label: str | None = None
    """Name used in logs (defaults to `name`); lets one reward appear twice with different kwargs. Two entries with
    the same label (or, without one, the same name) are refused."""


@dataclass
class PromptsConfig:
    train: list[str] = field(default_factory=lambda: list(DIGITS))
    """Training prompts (ignored when `file` is given)."""
    eval: list[str] = field(default_factory=lambda: list(DIGITS))
    """Held-out evaluation prompts."""
    file: str | None = None
    """Optional prompt file replacing `train`: .txt (one per line), .jsonl (strings or objects with `field`) or
    .csv/.tsv (the `field` column). Editing (FLUX.1 Kontext): a .jsonl whose every object also gives `image`, the
    source image's path (relative to the file's folder); rewards may then ask for the source images."""
    field: str = "prompt"
    """The JSONL key or CSV column that holds the prompt."""
    eval_fraction: float = 0.0
    """Share of the distinct prompts of `file` held out for evaluation (replacing `eval`); 0 keeps all for training."""
    split_seed: int = 0
    """Seed of the fixed train/eval split of `file`."""
    eval_file: str | None = None
    """Optional prompt file (same formats) replacing `eval`."""
    eval_limit: int | None = None
    """Evaluate on at most this many held-out prompts (the first ones); null: all."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate (the paper uses 1e-5 for full FLUX; the small built-in model needs more)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping (0 disables); the share of optimizer steps it clipped is logged as grad_clipped_share."""
    ema_decay: float = 0.0
    """EMA of the trained weights for evaluation and export (0 disables)."""
    finetune: Literal["full", "lora"] = "full"
    """Train all weights, or a LoRA (peft) on the linear layers."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 8.0
    """LoRA alpha, > 0 (the update is scaled by alpha / r)."""
    lora_targets: list[str] = field(default_factory=lambda: ["fc1", "fc2"])
    """Module names (or dotted name suffixes like to_out.0) that get LoRA adapters. For the built-in model: fc1, fc2,
    modulation, inp, out. Left at this default, FLUX/SD3 adapters use their attention projections instead (to_q,
    to_k, to_v, to_out.0 and the add_* context projections)."""


@dataclass
class EvalConfig:
    every: int = 10
    """Held-out evaluation every this many iterations (0: only at the start and the end)."""
    samples_per_prompt: int = 16
    """Samples per eval prompt (independent noises from seeds never used in training)."""
    seed: int = 1_000_003
    """Seed of the held-out noises (training noises are keyed by `seed`, never this)."""
    solver: str = "dpm++2m"
    """ODE solver of the held-out samples (euler, heun, dpm++2m); every algorithm is evaluated with the ODE."""
    steps: int = 8
    """Solver steps of the held-out samples."""
    monitor_rewards: list[RewardSpec] = field(default_factory=list)
    """Rewards scored on the held-out samples only (entries like `rewards`: name, weight, kwargs, label), logged as
    heldout/monitor/<name> (and heldout/monitor/<name>/<metric> for their extra metrics); never trained on, never
    part of `reward`, best/ selection or lr selection. E.g. [{name: digit_gold}] on the built-in model, or train
    on PickScore and monitor HPS and CLIP."""


@dataclass
class SpeedConfig:
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast the velocity net's passes (rollouts, training, held-out samples) to bf16 or fp16; weights, optimizer
    state and the loss stay in the weights' dtype (fp32 master weights for fp32 weights). fp16 adds a gradient
    scaler, bf16 needs none. 'no' is bf16 for a full fine-tune with fp32 master weights (see model.dtype)."""
    tf32: bool = True
    """Allow TF32 matmuls and convolutions on CUDA (Ampere or newer); no effect on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations during the backward pass to save memory (through the adapter's
    enable_gradient_checkpointing(); an adapter without it trains without, with a warning)."""
    compile: bool = False
    """torch.compile the velocity net in place (the first iterations are slow while it compiles)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """torch's AdamW (its fused kernel where the parameters allow), or bitsandbytes' 8-bit AdamW (needs the
    bitsandbytes package and CUDA)."""
    micro_batch: int | None = None
    """Prompts (groups) per forward/backward pass of one process; gradients are accumulated over the passes, so
    results do not depend on it (null: all of the process's prompts in one pass). Lowers peak memory."""
    rollout_chunk: int | None = None
    """Prompts (whole groups) rolled out and scored together; an iteration runs its rollouts chunk by chunk (null:
    all of the process's prompts at once). Lowers rollout memory; results equal to float rounding."""
    async_scoring: bool = False
    """Decode and score each chunk of groups (speed.rollout_chunk) in a worker thread while the next chunk rolls
    out; results are identical to scoring in turn (bit for bit on CPU). Pays off with slow or remote rewards."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """With several processes (accelerate launch, torchrun): 'ddp' replicates the net and averages gradients,
    'fsdp' shards parameters, gradients and optimizer state (FSDP2, for full fine-tunes of large models); 'auto'
    is fsdp when accelerate's config has distributed_type FSDP, else ddp. Ignored in one process."""


@dataclass
class TrainConfig:
    algorithm: str = "neighbor_grpo"
    """Which algorithm trains: neighbor_grpo, or a baseline: flow_grpo, dance_grpo, mix_grpo (set
    mix_grpo.flash for MixGRPO-Flash), diffusion_nft, awm, dgpo. Its settings are the section of the same name."""
    iterations: int = 60
    """Rollout batches (each: rollout, reward, advantages, K optimizer steps)."""
    prompts_per_iteration: int = 8
    """Global number of prompts (groups) per iteration."""
    seed: int = 0
    """Keys every random number: (seed, iteration, prompt index, candidate index)."""
    device: str = "cpu"
    """torch device for the model and rewards."""
    reward_normalization: Literal["each", "sum", "advantages"] = "each"
    """[D] several rewards: each reward's group advantages, weighted and summed ('each'); the group advantages of
    the weighted sum ('sum'); or 'each' then normalised over the whole batch ('advantages', GDPO's form)."""
    checkpoint_every: int = 20
    """Write a resumable checkpoint every this many iterations (and at the end)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    max_nonfinite_in_row: int = 3
    """Abort after this many consecutive skipped updates with NaN/inf in rewards, loss or gradients."""
    wandb: bool = False
    """Also log to Weights & Biases (set WANDB_MODE=offline to log without a network)."""
    wandb_project: str = "neighbor-grpo"
    """Weights & Biases project name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    """Rewards and their weights: a list of {name, weight, kwargs, label}."""
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    neighbor_grpo: NeighborGRPOConfig = field(default_factory=NeighborGRPOConfig)
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    dance_grpo: DanceGRPOConfig = field(default_factory=DanceGRPOConfig)
    mix_grpo: MixGRPOConfig = field(default_factory=MixGRPOConfig)
    diffusion_nft: DiffusionNFTConfig = field(default_factory=DiffusionNFTConfig)
    awm: AWMConfig = field(default_factory=AWMConfig)
    dgpo: DGPOConfig = field(default_factory=DGPOConfig)

    @property
    def algorithm_config(self):
        """The settings of the selected algorithm (the section named like it)."""
        return getattr(self, self.algorithm)


class ConfigError(ValueError):
    """A configuration value or key that is not accepted; the message names the field."""


# ---- reading ----------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the field."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"valid keys{' under ' + where if where else ''}: {names}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**values)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


class DuplicateKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding the same key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                mark = key_node.start_mark
                if key in seen:
                    raise ConfigError(f"line {mark.line + 1}, column {mark.column + 1}: duplicate key {key!r} (first "
                                      f"at line {seen[key] + 1}); keep one of them")
                seen[key] = mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str):
    """YAML text -> Python values; duplicate keys are refused (ConfigError naming line and column)."""
    return yaml.load(text, Loader=DuplicateKeyLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 3e-4); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=3e-4")
    key, _, raw = text.partition("=")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except ConfigError as error:  # a duplicate key inside the value
        raise ConfigError(f"override {text!r}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({yaml_problem(error)}); quote it, "
                          f"e.g. {key.strip()}='\"{raw}\"'") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def yaml_where(error: yaml.YAMLError) -> str:
    """':LINE:COLUMN' (1-based) of a YAML error, when the parser knows it."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's own words, on one line ('mapping values are not allowed here')."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return "; ".join(p for p in parts if p) or str(error).splitlines()[0]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + overrides -> a validated TrainConfig."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            if not path.exists() and str(path).split(".")[0] in to_dict(TrainConfig()):  # `ngrpo train optim.lr`
                raise ConfigError(f"override {str(path)!r}: expected key=value, e.g. optim.lr=3e-4 (no config file "
                                  "has that name)")
            raise ConfigError(f"config file {str(path)!r} {'is a folder; expected a YAML file' if path.is_dir() else 'not found'}")
        try:
            data = read_yaml(path.read_text()) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {str(path)!r}: not UTF-8 text, expected YAML ({error.reason} at byte "
                              f"{error.start})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r}{yaml_where(error)}: not valid YAML ({yaml_problem(error)})") from None
        except ConfigError as error:  # a duplicate key
            raise ConfigError(f"config file {str(path)!r}, {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of config keys at the top level")
    data = apply_overrides(data, overrides or [])
    config = from_dict(TrainConfig, data)
    validate(config)
    return config


# ---- checking ranges --------------------------------------------------------------------------------------------

def _check(condition: bool, name: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Ranges and cross-field rules; raises ConfigError naming the field."""
    n = config.neighbor_grpo
    _check(config.algorithm in ALGORITHM_SETTINGS, "algorithm", f"one of {sorted(ALGORITHM_SETTINGS)}", config.algorithm)
    _check(0.0 < n.neighbor_sigma <= 1.0, "neighbor_grpo.neighbor_sigma", "a value in (0, 1]", n.neighbor_sigma)
    _check(n.group_size >= 2, "neighbor_grpo.group_size", "G >= 2 (advantages are relative inside a group)", n.group_size)
    _check(1 <= n.num_anchors <= n.group_size, "neighbor_grpo.num_anchors", f"1 <= B <= G = {n.group_size}", n.num_anchors)
    _check(n.rollout_steps >= 1, "neighbor_grpo.rollout_steps", "an integer >= 1", n.rollout_steps)
    _check(n.rollout_solver in SOLVER_NAMES, "neighbor_grpo.rollout_solver", f"one of {sorted(SOLVER_NAMES)}", n.rollout_solver)
    _check(n.shift is None or n.shift > 0, "neighbor_grpo.shift", "a value > 0 or null", n.shift)
    _check(0.0 < n.train_step_fraction <= 1.0, "neighbor_grpo.train_step_fraction", "a value in (0, 1]", n.train_step_fraction)
    _check(n.step_selection in ("random", "first", "last", "all"), "neighbor_grpo.step_selection", "random, first, last or all", n.step_selection)
    _check(n.quasi_norm_p > 0, "neighbor_grpo.quasi_norm_p", "p > 0", n.quasi_norm_p)
    _check(n.adv_eps >= 0, "neighbor_grpo.adv_eps", "a value >= 0", n.adv_eps)
    _check(n.adv_clip >= 0, "neighbor_grpo.adv_clip", "a value >= 0 (0 disables)", n.adv_clip)
    _check(n.tau_rel > 0, "neighbor_grpo.tau_rel", "a value > 0", n.tau_rel)
    _check(n.tau is None or n.tau > 0, "neighbor_grpo.tau", "null or a value > 0", n.tau)
    _check(n.distance_reduction in ("mean", "sum"), "neighbor_grpo.distance_reduction", "mean or sum", n.distance_reduction)
    _check(n.policy_space in ("next_state", "x0"), "neighbor_grpo.policy_space", "next_state or x0", n.policy_space)
    _check(n.x0_candidates in ("step", "final"), "neighbor_grpo.x0_candidates", "step or final", n.x0_candidates)
    _check(0 < n.eps_clip < 1, "neighbor_grpo.eps_clip", "a value in (0, 1)", n.eps_clip)
    _check(n.old_policy in ("rollout", "recompute"), "neighbor_grpo.old_policy", "rollout or recompute", n.old_policy)
    _check(0 <= n.ref_beta <= 1000, "neighbor_grpo.ref_beta", "a value in [0, 1000] (the demo's 10 anchors firmly; "
           "beyond 1000 the anchor swamps the reward and blows up)", n.ref_beta)
    _check(not (n.exclude_self and n.group_size < 3), "neighbor_grpo.exclude_self", "G >= 3 when the anchor is excluded", n.exclude_self)
    _validate_sde_baselines(config)
    _validate_forward_process(config)
    _validate_dgpo(config)
    _validate_model(config.model)
    o = config.optim
    _check(o.lr > 0, "optim.lr", "a learning rate > 0", o.lr)
    _check(0 <= o.weight_decay <= 1, "optim.weight_decay", "a value in [0, 1] (AdamW shrinks the weights by "
           "lr x weight_decay each step; 0 to 0.1 is usual)", o.weight_decay)
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "values in [0, 1)", (o.beta1, o.beta2))
    _check(o.max_grad_norm >= 0, "optim.max_grad_norm", "a value >= 0 (0 disables)", o.max_grad_norm)
    _check(0 <= o.ema_decay < 1, "optim.ema_decay", "a value in [0, 1) (0 disables)", o.ema_decay)
    _check(o.lora_rank >= 1, "optim.lora_rank", "an integer >= 1", o.lora_rank)
    _check(len(o.lora_targets) >= 1 and all(isinstance(t, str) and t for t in o.lora_targets), "optim.lora_targets",
           "a list of at least one linear layer name to adapt, e.g. ['fc1', 'fc2']", o.lora_targets)
    _check(o.lora_alpha > 0, "optim.lora_alpha", "a value > 0 (the update is scaled by alpha / rank)", o.lora_alpha)
    _check(config.iterations >= 1, "iterations", "an integer >= 1", config.iterations)
    _check(config.prompts_per_iteration >= 1, "prompts_per_iteration", "an integer >= 1", config.prompts_per_iteration)
    _check(config.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1", config.checkpoint_every)
    _check(config.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1 (the latest good one is always kept)", config.keep_checkpoints)
    _check(config.max_nonfinite_in_row >= 1, "max_nonfinite_in_row", "an integer >= 1", config.max_nonfinite_in_row)
    _check(len(config.rewards) >= 1, "rewards", "at least one reward", config.rewards)
    _validate_rewards(config.rewards)
    _check(config.eval.every >= 0, "eval.every", "an integer >= 0", config.eval.every)
    _check(config.eval.samples_per_prompt >= 2, "eval.samples_per_prompt", "an integer >= 2 (diversity needs pairs)", config.eval.samples_per_prompt)
    _check(config.eval.steps >= 1, "eval.steps", "an integer >= 1", config.eval.steps)
    _check(config.eval.solver in SOLVER_NAMES, "eval.solver", f"one of {sorted(SOLVER_NAMES)}", config.eval.solver)
    for k, spec in enumerate(config.eval.monitor_rewards):
        _check(bool(spec.name), f"eval.monitor_rewards[{k}].name", "a registered reward or 'package.module:factory'", spec.name)
    _check(config.eval.seed != config.seed, "eval.seed", "a seed different from the training seed", config.eval.seed)
    _check(len(config.prompts.train) >= 1 or config.prompts.file is not None, "prompts.train", "at least one prompt", config.prompts.train)
    _check(len(config.prompts.eval) >= 1, "prompts.eval", "at least one prompt", config.prompts.eval)
    _validate_speed(config.speed)
    _check(0.0 <= config.prompts.eval_fraction < 1.0, "prompts.eval_fraction", "a value in [0, 1)", config.prompts.eval_fraction)
    _check(config.prompts.eval_fraction == 0 or config.prompts.file is not None, "prompts.eval_fraction",
           "0 unless prompts.file is set (it splits that file)", config.prompts.eval_fraction)
    _check(config.prompts.eval_limit is None or config.prompts.eval_limit >= 1, "prompts.eval_limit", "null or an integer >= 1",
           config.prompts.eval_limit)


def _validate_rewards(rewards: list[RewardSpec]) -> None:
    """Distinct keys (label, else name: one would silently replace the other) and at least one weight != 0; a
    weight of 0 beside others makes that reward a monitor (logged, not trained on), with a warning."""
    first: dict[str, int] = {}
    for index, spec in enumerate(rewards):
        key = spec.label or spec.name
        if key in first:
            raise ConfigError(f"rewards[{index}]: a second reward keyed {key!r} (as rewards[{first[key]}]); give one "
                              f"of them a distinct label, e.g. label: {key}_2")
        first[key] = index
    _check(any(spec.weight != 0 for spec in rewards), "rewards", "at least one reward with a weight != 0 (all "
           "weights are 0: nothing to train on)", [spec.weight for spec in rewards])
    for index, spec in enumerate(rewards):
        if spec.weight == 0:
            warnings.warn(f"rewards[{index}] ({spec.label or spec.name}): weight 0, so it is logged as a monitor only "
                          "and does not steer training")


def _validate_speed(speed: SpeedConfig) -> None:
    for name, allowed in (("mixed_precision", ("no", "bf16", "fp16")), ("optimizer", ("adamw", "adamw8bit")),
                          ("parallel", ("auto", "ddp", "fsdp"))):
        _check(getattr(speed, name) in allowed, f"speed.{name}", f"one of {list(allowed)}", getattr(speed, name))
    _check(speed.micro_batch is None or speed.micro_batch >= 1, "speed.micro_batch", "null or an integer >= 1",
           speed.micro_batch)
    _check(speed.rollout_chunk is None or speed.rollout_chunk >= 1, "speed.rollout_chunk", "null or an integer >= 1",
           speed.rollout_chunk)


def _validate_model(m: ModelConfig) -> None:
    _check(bool(m.path), "model.path",
           "a checkpoint folder, a diffusers folder, 'builtin:digits', 'builtin:digits-unet', 'builtin:digits-reflow' "
           "or 'builtin:words'", m.path)
    for name in ("height", "width"):
        value = getattr(m, name)
        _check(value is None or (value >= 16 and value % 16 == 0), f"model.{name}", "null or a multiple of 16", value)
    _check(m.num_frames is None or m.num_frames >= 1, "model.num_frames", "null or a frame count >= 1", m.num_frames)
    _check(m.guidance >= 0, "model.guidance", "a value >= 0", m.guidance)
    _check(m.cfg_scale >= 0, "model.cfg_scale", "a value >= 0 (<= 1 disables classifier-free guidance)", m.cfg_scale)
    _check(m.max_sequence_length is None or 1 <= m.max_sequence_length <= 512, "model.max_sequence_length",
           "null or an integer in [1, 512]", m.max_sequence_length)
    _check(m.forward_batch_size >= 0, "model.forward_batch_size", "an integer >= 0 (0: whole batch)", m.forward_batch_size)
    _check(m.decode_batch_size >= 1, "model.decode_batch_size", "an integer >= 1", m.decode_batch_size)


def _validate_sde_baselines(config: TrainConfig) -> None:
    for name in ("flow_grpo", "dance_grpo", "mix_grpo"):
        c = getattr(config, name)
        _check(c.group_size >= 2, f"{name}.group_size", "G >= 2 (advantages are relative inside a group)", c.group_size)
        _check(c.shift is None or c.shift > 0, f"{name}.shift", "a value > 0 or null", c.shift)
        _check(c.adv_eps >= 0, f"{name}.adv_eps", "a value >= 0", c.adv_eps)
        _check(c.adv_clip >= 0, f"{name}.adv_clip", "a value >= 0 (0 disables)", c.adv_clip)
        _check(0 < c.eps_clip < 1, f"{name}.eps_clip", "a value in (0, 1)", c.eps_clip)
        _check(1 <= c.num_minibatches <= c.group_size, f"{name}.num_minibatches", "1 <= n <= G", c.num_minibatches)
        _check(c.minibatch_by in ("samples", "steps"), f"{name}.minibatch_by", "samples or steps", c.minibatch_by)
        _check(c.old_policy in ("rollout", "recompute"), f"{name}.old_policy", "rollout or recompute", c.old_policy)
    f = config.flow_grpo
    _check(f.noise_level > 0, "flow_grpo.noise_level", "a value > 0", f.noise_level)
    _check(f.rollout_steps >= 2, "flow_grpo.rollout_steps", "an integer >= 2 (the last step is deterministic)", f.rollout_steps)
    _check(0 < f.train_step_fraction <= 1, "flow_grpo.train_step_fraction", "a value in (0, 1]", f.train_step_fraction)
    _check(0 <= f.kl_beta <= 100, "flow_grpo.kl_beta", "a value in [0, 100] (the reference uses 0 to 0.04)", f.kl_beta)
    _check(f.fast_window_size >= 0, "flow_grpo.fast_window_size", "an integer >= 0 (0 disables)", f.fast_window_size)
    _check(f.sde_type in ("flow_sde", "cps"), "flow_grpo.sde_type", "flow_sde or cps", f.sde_type)
    _check(0 < f.cps_eta <= 1, "flow_grpo.cps_eta", "a value in (0, 1]", f.cps_eta)
    _check(f.cps_logprob in ("code", "gaussian"), "flow_grpo.cps_logprob", "code or gaussian", f.cps_logprob)
    if f.sde_type == "cps" and (f.guard_ratio_norm or f.guard_grad_reweight):
        raise ConfigError("flow_grpo.sde_type: cps cannot be combined with flow_grpo.guard_ratio_norm or "
                          "flow_grpo.guard_grad_reweight (GRPO-Guard is defined on the Flow-GRPO SDE only)")
    if f.fast_window_size > 0:
        end = f.rollout_steps // 2 if f.fast_window_end is None else f.fast_window_end
        _check(f.fast_window_size <= end <= f.rollout_steps - 1, "flow_grpo.fast_window_end",
               "null or an integer in [fast_window_size, rollout_steps - 1]", f.fast_window_end)
    d = config.dance_grpo
    _check(0 < d.eta <= 2, "dance_grpo.eta", "a value in (0, 2] (std = eta sqrt(s - s_next); 1 is Brownian noise, the "
           "reference's 0.3 less)", d.eta)
    _check(d.rollout_steps >= 2, "dance_grpo.rollout_steps", "an integer >= 2", d.rollout_steps)
    _check(0 < d.train_step_fraction <= 1, "dance_grpo.train_step_fraction", "a value in (0, 1]", d.train_step_fraction)
    m = config.mix_grpo
    _check(m.sde in ("flow_grpo", "dance_grpo"), "mix_grpo.sde", "flow_grpo or dance_grpo", m.sde)
    _check(m.noise_level > 0, "mix_grpo.noise_level", "a value > 0", m.noise_level)
    _check(m.rollout_steps >= 3, "mix_grpo.rollout_steps", "an integer >= 3 (the window ends before step N - 2)", m.rollout_steps)
    _check(1 <= m.window_size <= m.rollout_steps - 2, "mix_grpo.window_size", "1 <= size <= rollout_steps - 2", m.window_size)
    _check(m.window_stride >= 1, "mix_grpo.window_stride", "an integer >= 1", m.window_stride)
    _check(m.window_interval >= 1, "mix_grpo.window_interval", "an integer >= 1", m.window_interval)
    _check(0 < m.flash_compress_ratio <= 1, "mix_grpo.flash_compress_ratio", "a value in (0, 1]", m.flash_compress_ratio)


def _validate_forward_process(config: TrainConfig) -> None:
    """DiffusionNFT and AWM (forward-process methods: ODE rollouts, training on fresh noisy samples)."""
    for name in ("diffusion_nft", "awm"):
        c = getattr(config, name)
        _check(c.group_size >= 2, f"{name}.group_size", "G >= 2 (advantages are relative inside a group)", c.group_size)
        _check(c.rollout_solver in SOLVER_NAMES, f"{name}.rollout_solver", f"one of {list(SOLVER_NAMES)}", c.rollout_solver)
        _check(c.rollout_steps >= 2, f"{name}.rollout_steps", "an integer >= 2", c.rollout_steps)
        _check(c.shift is None or c.shift > 0, f"{name}.shift", "a value > 0 or null", c.shift)
        _check(c.adv_eps >= 0, f"{name}.adv_eps", "a value >= 0", c.adv_eps)
        _check(c.adv_clip > 0, f"{name}.adv_clip", "a value > 0 (it scales the loss)", c.adv_clip)
        _check(0 <= c.kl_beta <= 100, f"{name}.kl_beta", "a value in [0, 100] (0 disables)", c.kl_beta)
        _check(1 <= c.num_minibatches <= c.group_size, f"{name}.num_minibatches", "1 <= n <= G", c.num_minibatches)
        _check(0 < c.timestep_fraction <= 1, f"{name}.timestep_fraction", "a value in (0, 1]", c.timestep_fraction)
    n = config.diffusion_nft
    _check(n.beta > 0, "diffusion_nft.beta", "a value > 0", n.beta)
    _check(n.loss_scale in ("code", "paper"), "diffusion_nft.loss_scale", "code or paper", n.loss_scale)
    _check(n.time_sampling in ("grid", "uniform"), "diffusion_nft.time_sampling", "grid or uniform", n.time_sampling)
    _check(n.old_decay in (0, 1, 2), "diffusion_nft.old_decay", "0, 1 or 2", n.old_decay)
    _check(n.rollout_policy in ("old", "current"), "diffusion_nft.rollout_policy", "old or current", n.rollout_policy)
    a = config.awm
    _check(a.time_sampler in ("discrete", "discrete_wo_init"), "awm.time_sampler", "discrete or discrete_wo_init",
           a.time_sampler)
    _check(a.num_times >= 1, "awm.num_times", "an integer >= 1", a.num_times)
    first = 1 if a.time_sampler == "discrete_wo_init" else 0
    _check(a.strata_end - first >= a.num_times, "awm.num_times",
           f"at most int(rollout_steps * timestep_fraction) - {first} = {a.strata_end - first} (one grid index per stratum)",
           a.num_times)
    _check(a.times_per in ("minibatch", "sample"), "awm.times_per", "minibatch or sample", a.times_per)
    _check(a.weighting in ("ghuber", "uniform", "t", "t2", "huber"), "awm.weighting", "ghuber, uniform, t, t2 or huber",
           a.weighting)
    _check(a.ghuber_p > 0, "awm.ghuber_p", "a value > 0", a.ghuber_p)
    _check(0 < a.advantage_max <= 100, "awm.advantage_max", "a value in (0, 100] (the reference's 1 bounds the "
           "advantage weights; beyond 100 one sample's loss dominates and the update blows up)", a.advantage_max)
    _check(0 <= a.ema_beta <= 1000, "awm.ema_beta", "a value in [0, 1000] (0 disables)", a.ema_beta)
    _check(0 <= a.ema_decay < 1, "awm.ema_decay", "a value in [0, 1)", a.ema_decay)
    _check(a.ema_ramp in ("linear", "constant"), "awm.ema_ramp", "linear or constant", a.ema_ramp)


def _validate_dgpo(config: TrainConfig) -> None:
    d = config.dgpo
    _check(d.group_size >= 2, "dgpo.group_size", "G >= 2 (advantages are relative inside a group)", d.group_size)
    _check(d.rollout_solver in SOLVER_NAMES, "dgpo.rollout_solver", f"one of {list(SOLVER_NAMES)}", d.rollout_solver)
    _check(d.rollout_steps >= 2, "dgpo.rollout_steps", "an integer >= 2", d.rollout_steps)
    _check(d.shift is None or d.shift > 0, "dgpo.shift", "a value > 0 or null", d.shift)
    _check(d.beta_dpo > 0, "dgpo.beta_dpo", "a value > 0", d.beta_dpo)
    _check(0 <= d.kl_beta <= 100, "dgpo.kl_beta", "a value in [0, 100] (0 disables)", d.kl_beta)
    _check(0 <= d.clip_range < 1, "dgpo.clip_range", "a value in [0, 1) (0 disables the gate)", d.clip_range)
    _check(0 <= d.trunc_steps < d.rollout_steps, "dgpo.trunc_steps",
           f"a grid index in [0, rollout_steps - 1 = {d.rollout_steps - 1}]", d.trunc_steps)
    _check(1 <= d.num_times <= d.trunc_steps + 1, "dgpo.num_times",
           f"1 <= M <= trunc_steps + 1 = {d.trunc_steps + 1} (distinct grid indices)", d.num_times)
    _check(1 <= d.num_minibatches <= d.num_times, "dgpo.num_minibatches", "1 <= n <= num_times", d.num_minibatches)
    _check(d.switch_ema_ref >= 0, "dgpo.switch_ema_ref", "an integer >= 0", d.switch_ema_ref)
    _check(0 <= d.ema_decay < 1, "dgpo.ema_decay", "a value in [0, 1)", d.ema_decay)
    _check(d.adv_eps >= 0, "dgpo.adv_eps", "a value >= 0", d.adv_eps)
    _check(d.adv_clip >= 0, "dgpo.adv_clip", "a value >= 0 (0 disables)", d.adv_clip)


# ---- documentation ---------------------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def config_reference(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, nested sections flattened with dots."""
    rows = []
    hints, docs, default = typing.get_type_hints(cls), field_docs(cls), cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(config_reference(hints[f.name], f"{prefix}{f.name}."))
        else:
            if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                value = [dataclasses.asdict(v) for v in value]
            rows.append((prefix + f.name, _type_name(hints[f.name]), value, docs.get(f.name, "")))
    return rows
