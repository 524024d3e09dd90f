"""What a run trains with, built from its config: the model (LoRA or full), the reference velocity, the
algorithm and the networks it declares, speed settings, DDP/FSDP over the processes, the optimizer and EMA."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.config.train_config import OptimConfig, TrainConfig
from neighbor_grpo.parallel.distributed import SINGLE_PROCESS, Processes
from neighbor_grpo.parallel.wrapping import parallel_net, shard_in_place, velocity_through
from neighbor_grpo.models.lora import EMA, apply_lora, make_net_velocity, make_reference_velocity
from neighbor_grpo.models import load_adapter, model_default_shift
from neighbor_grpo.config.prompts import resolve_prompt_sets
from neighbor_grpo.rewards import check_reward_inputs
from neighbor_grpo.training.speed import (allow_tf32, autocast_velocity, compile_in_place, compute_precision,
                                          enable_gradient_checkpointing, keeps_master_weights, make_grad_scaler,
                                          make_optimizer)


@dataclass
class TrainingParts:
    params: list
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    algorithm: object
    reference_velocity: Callable
    shift: float
    """The sigma shift actually used (the config's, or the model's own when the config leaves it null)."""
    velocity: Callable | None = None
    """v(x, s, cond) for no-grad passes (rollouts, old policy, held-out samples): adapter.velocity under autocast."""
    train_velocity: Callable | None = None
    """v(x, s, cond) for training passes: through DDP (or the FSDP-sharded net) and autocast."""
    train_module: torch.nn.Module | None = None
    """The module whose gradients are synchronised over processes (the DDP wrapper, or the sharded net)."""
    processes: Processes = SINGLE_PROCESS
    scaler: object | None = None
    """torch.amp.GradScaler for speed.mixed_precision=fp16, else None."""
    export_net: torch.nn.Module | None = None
    """FSDP, main process: an unsharded CPU copy of the net that exports and checkpoints load the gathered weights into."""
    reference_net: torch.nn.Module | None = None
    """The frozen copy behind reference_velocity in full fine-tunes (None with LoRA: the net with adapters off)."""
    algorithm_nets: dict[str, torch.nn.Module] = field(default_factory=dict)
    """The networks the algorithm declares (`algorithm.networks`), built, counted, sharded and checkpointed here."""


def load_model(path: str, device: str, progress: bool = True, options=None):
    """A model adapter from a checkpoint folder (ours, or a diffusers folder), or the built-in base model (built and
    cached on first use). `options` (the config's `model` section) reaches adapters that take options."""
    if path == "builtin:digits-reflow":  # the few-step (reflowed) student of builtin:digits
        from neighbor_grpo.builtin.distill import ensure_reflow_model

        path = str(ensure_reflow_model(progress=progress))
    elif path.startswith("builtin:"):  # builtin:digits (the default), builtin:digits-unet (the compute-bound one)
        from neighbor_grpo.builtin.pretrain import ensure_builtin_model

        path = str(ensure_builtin_model(path.removeprefix("builtin:"), progress=progress))
    return load_adapter(path, device=device, options=options)


def read_prompts(config: TrainConfig) -> list[str]:
    """The training prompts: `prompts.train`, or `prompts.file` without its held-out split."""
    return resolve_prompt_sets(config.prompts)[0]


def checked_prompt_sets(config: TrainConfig, rewards) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts; a reward that needs what they lack (source images) stops the run here."""
    train, held_out = resolve_prompt_sets(config.prompts)
    check_reward_inputs(rewards, training=train, held_out=held_out)
    return train, held_out


def model_shift(config: TrainConfig, adapter) -> float:
    """The rollout/evaluation grid's shift: the config's value, else the adapter's default (1 if it has none)."""
    if config.algorithm_config.shift is not None:
        return float(config.algorithm_config.shift)
    return model_default_shift(adapter, getattr(config.algorithm_config, "rollout_steps", None))


def lora_targets(config: TrainConfig, adapter) -> list[str]:
    """optim.lora_targets, or the adapter's own default targets when the config leaves the built-in model's."""
    default = getattr(adapter, "default_lora_targets", None)
    if config.optim.lora_targets == OptimConfig().lora_targets and callable(default):
        return list(default())
    return list(config.optim.lora_targets)


def frozen_copy(net: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(net).requires_grad_(False)


def needs_reference(config: TrainConfig) -> bool:
    """Whether the algorithm evaluates the base model: its own answer (DGPO's group score needs it even without a
    KL), else a KL or anchoring weight > 0."""
    own = getattr(ALGORITHMS[config.algorithm], "needs_reference", None)
    c = config.algorithm_config
    return own(c) if own is not None else getattr(c, "ref_beta", 0) > 0 or getattr(c, "kl_beta", 0) > 0


def build_training_parts(config: TrainConfig, adapter, processes: Processes = SINGLE_PROCESS) -> TrainingParts:
    """LoRA (if asked), the reference velocity, fp32 master weights (speed.keeps_master_weights), speed settings,
    DDP/FSDP over `processes`, the optimizer over the trainable parameters, EMA, the algorithm and its own networks."""
    speed = config.speed
    frozen = None
    if config.optim.finetune == "lora":
        with torch.random.fork_rng(devices=[]):  # LoRA's random init keyed by the seed, not by the global RNG's state
            torch.manual_seed(config.seed)
            adapter.net = apply_lora(adapter.net, config.optim.lora_rank, config.optim.lora_alpha, lora_targets(config, adapter))
    elif needs_reference(config):
        frozen = frozen_copy(adapter.net)
    # the algorithm's own networks start as copies of the policy: an old policy kept by soft update, an EMA copy
    algorithm_nets = {name: frozen_copy(adapter.net) for name in getattr(ALGORITHMS[config.algorithm], "networks", ())}
    weights = next(adapter.net.parameters())
    master = keeps_master_weights(config.model.dtype, weights.device.type, config.optim.finetune, weights.dtype)
    if master:  # after the frozen copies were taken: they stay in the loaded dtype
        adapter.net.float()
    allow_tf32(speed.tf32)
    if speed.gradient_checkpointing:
        enable_gradient_checkpointing(adapter)
    export_net = None
    if processes.sharded:
        export_net = copy.deepcopy(adapter.net).cpu() if processes.is_main else None
        for net in (frozen, *algorithm_nets.values()):
            if net is not None:
                shard_in_place(net)
    if speed.compile:
        compile_in_place(adapter.net)
    train_module = parallel_net(adapter.net, processes)
    params = [p for p in adapter.net.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.optim.lr, (config.optim.beta1, config.optim.beta2),
                               config.optim.weight_decay, speed.optimizer)
    ema = EMA(adapter.net, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
    shift = model_shift(config, adapter)
    algorithm = ALGORITHMS[config.algorithm](dataclasses.replace(config.algorithm_config, shift=shift), seed=config.seed)
    device = next(adapter.net.parameters()).device
    precision = compute_precision(speed.mixed_precision, master)
    if algorithm_nets:
        algorithm.attach({name: autocast_velocity(make_net_velocity(adapter, net), precision, device)
                          for name, net in algorithm_nets.items()}, algorithm_nets)
    return TrainingParts(params, optimizer, ema, algorithm,
                         autocast_velocity(make_reference_velocity(adapter, frozen), precision, device), shift,
                         velocity=autocast_velocity(adapter.velocity, precision, device),
                         train_velocity=autocast_velocity(velocity_through(adapter, train_module), precision, device),
                         train_module=train_module, processes=processes,
                         scaler=make_grad_scaler(precision, device), export_net=export_net, reference_net=frozen,
                         algorithm_nets=algorithm_nets)
