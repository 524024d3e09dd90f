"""`ngrpo sample` and `ngrpo eval`: a checkpoint (ours, or a diffusers folder with LoRAs) sampled to a grid or
arrays, or scored by several rewards on held-out prompts with fixed seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _load_model_for(args, config=None):
    """The checkpoint (ours or a diffusers folder) with model options: a run config's `model` section (eval
    --config), overridden by the flags (--resolution, --guidance, ...), then the --lora files merged in order."""
    import dataclasses

    from neighbor_grpo.models import load_adapter

    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise ValueError("--resolution sets both sides; give it or --height/--width, not both")
    flags = {"height": args.height or args.resolution, "width": args.width or args.resolution,
             "num_frames": getattr(args, "num_frames", None),
             "guidance": args.guidance, "cfg_scale": args.cfg_scale, "negative_prompt": args.negative_prompt,
             "dtype": args.dtype, "max_sequence_length": args.max_sequence_length}
    options = {k: v for k, v in dataclasses.asdict(config.model).items() if k != "path"} if config is not None else {}
    options.update({k: v for k, v in flags.items() if v is not None})
    adapter = load_adapter(args.checkpoint, device=args.device, options=options or None)
    for lora in args.lora or []:
        if not hasattr(adapter, "load_lora"):
            raise ValueError(f"--lora {lora!r}: the checkpoint's model ({type(adapter).__name__}) takes no LoRA files; "
                             "--lora is for diffusers models (FLUX.1, SD3/SD3.5)")
        adapter.load_lora(lora)
    return adapter


def _cmd_sample(args) -> None:
    import numpy as np
    import torch

    from neighbor_grpo.parallel.distributed import check_device
    from neighbor_grpo.runs.io import atomic_write_bytes
    from neighbor_grpo.training.logs import VIDEO_SUFFIXES, save_grid, save_video
    from neighbor_grpo.models import model_default_shift
    from neighbor_grpo.training.monitors import generate
    from neighbor_grpo.runs.ownership import check_file_outputs

    if args.num < 1:
        raise ValueError(f"--num: expected a count >= 1, got {args.num}")
    if args.steps < 1:
        raise ValueError(f"--steps: expected a count of solver steps >= 1, got {args.steps}")
    out = Path(args.out)
    if out.suffix not in (".png", ".npz", *VIDEO_SUFFIXES):
        raise ValueError(f"--out {str(out)!r}: expected a file ending in .png (grid), .npz (arrays), or for a video "
                         "model .mp4 or .gif")
    if args.fps < 1:
        raise ValueError(f"--fps: expected a frame rate >= 1, got {args.fps}")
    videos = [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(args.num)] if out.suffix in VIDEO_SUFFIXES else [out]
    check_file_outputs(videos, args.overwrite)
    check_device(args.device, "--device")
    prompt = args.prompt
    if getattr(args, "image", None):
        from neighbor_grpo.config.prompts import EditPrompt

        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image!r}: no such file")
        prompt = EditPrompt(args.prompt, Path(args.image).resolve())
    adapter = _load_model_for(args)
    if out.suffix in VIDEO_SUFFIXES and len(adapter.latent_shape()) != 4:  # video latents are (C, T, H, W)
        raise ValueError(f"--out {str(out)!r}: .mp4/.gif need a video model (Wan); this checkpoint samples images")
    shift = args.shift if args.shift is not None else model_default_shift(adapter, args.steps)
    _, images = generate(adapter, [prompt], args.num, args.seed, args.solver, args.steps, shift)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"--checkpoint {str(args.checkpoint)!r}: the samples hold NaN/inf "
                         f"({int((~torch.isfinite(images)).sum())} of {images.numel()} values); nothing written")
    images = images.clamp(0, 1)
    if out.suffix in VIDEO_SUFFIXES:  # one file per sample: name-0.mp4, name-1.mp4, ...
        for video, path in zip(images[0], videos):
            save_video(video, path, args.fps)
        print(f"wrote {args.num} video(s) of {args.prompt!r} to {', '.join(str(p) for p in videos)}")
        return
    if out.suffix == ".png" and images.dim() == 6:  # videos: one row per sample, its frames left to right
        save_grid(images[0], out)
    elif out.suffix == ".png":
        columns = min(args.num, 8)
        rows = (args.num + columns - 1) // columns
        padded = torch.ones(rows * columns, *images.shape[2:])
        padded[: args.num] = images[0]
        save_grid(padded.view(rows, columns, *images.shape[2:]), out)
    else:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, images=images[0].float().cpu().numpy().astype(np.float32), prompts=np.array([args.prompt] * args.num))
        atomic_write_bytes(out, buffer.getvalue())
    print(f"wrote {args.num} sample(s) of {args.prompt!r} to {out}")


def _parse_reward_flag(text: str) -> dict:
    """'pickscore' or 'pickscore:path=/w/PickScore,weight=0.5' -> a reward spec {name, weight, kwargs}.
    Values are read as YAML scalars (numbers, true/false, strings)."""
    import yaml

    name, _, rest = text.partition(":")
    if not name.strip():
        raise ValueError(f"--reward {text!r}: expected NAME or NAME:key=value,... (e.g. pickscore:path=/weights/PickScore)")
    spec: dict = {"name": name.strip(), "weight": 1.0, "kwargs": {}}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--reward {text!r}: {item!r} is not key=value")
        parsed = yaml.safe_load(value) if value.strip() else ""
        if key.strip() == "weight":
            if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
                raise ValueError(f"--reward {text!r}: weight must be a number, got {value!r}")
            spec["weight"] = float(parsed)
        elif key.strip() == "label":
            spec["label"] = str(parsed)
        else:
            spec["kwargs"][key.strip()] = parsed
    return spec


def _eval_settings(args):
    """Rewards, prompts and sampling settings: a run config (--config) gives the defaults, flags override them."""
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.config.prompts import read_prompt_file, resolve_prompt_sets

    config = load_config(args.config) if args.config else None
    if args.reward:
        specs = [_parse_reward_flag(text) for text in args.reward]
    elif config is not None:
        specs = [{"name": r.name, "weight": r.weight, "kwargs": dict(r.kwargs), "label": r.label} for r in config.rewards]
    else:
        specs = [{"name": "digit_prob"}]
    if args.prompts_file:
        prompts = read_prompt_file(args.prompts_file, args.prompt_field, "--prompts-file")
    elif args.prompts is not None:
        prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    elif config is not None:
        prompts = resolve_prompt_sets(config.prompts)[1]
    else:
        prompts = [str(d) for d in range(10)]
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: expected a count of solver steps >= 1, got {args.steps}")
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit: expected a count >= 1, got {args.limit}")
        prompts = prompts[: args.limit]
    if not prompts:
        raise ValueError("no prompts: give --prompts '0,1,2', a non-empty --prompts-file, or --config with eval prompts")
    sampling = {"samples_per_prompt": 16, "seed": 1_000_003, "solver": "dpm++2m", "steps": 8}
    if config is not None:
        sampling = {"samples_per_prompt": config.eval.samples_per_prompt, "seed": config.eval.seed,
                    "solver": config.eval.solver, "steps": config.eval.steps}
    for key in sampling:
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    return config, specs, prompts, sampling


def _cmd_eval(args) -> None:
    from neighbor_grpo.parallel.distributed import check_device
    from neighbor_grpo.runs.io import atomic_write_text
    from neighbor_grpo.runs.ownership import check_file_outputs
    from neighbor_grpo.training.logs import save_grid
    from neighbor_grpo.models import model_default_shift
    from neighbor_grpo.training.monitors import score_model
    from neighbor_grpo.rewards import build_rewards

    config, specs, prompts, sampling = _eval_settings(args)
    if sampling["samples_per_prompt"] < 2:
        raise ValueError(f"--samples-per-prompt: expected at least 2 (diversity needs pairs), got {sampling['samples_per_prompt']}")
    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out {str(out)!r}: expected a .json file (the grid is written beside it as .png)")
    check_file_outputs([out, out.with_suffix(".png")], args.overwrite)
    check_device(args.device, "--device")
    adapter = _load_model_for(args, config)
    if args.shift is not None:
        shift = args.shift
    else:  # as training uses: the config's shift, else the model's own
        from neighbor_grpo.training.parts import model_shift

        shift = model_shift(config, adapter) if config is not None else model_default_shift(adapter)
    rewards = build_rewards(specs, device=args.device)
    if args.monitor:  # scored beside the rewards, never part of `reward`
        monitor_specs = [_parse_reward_flag(text) for text in args.monitor]
    else:
        monitor_specs = [dict(vars(r)) for r in config.eval.monitor_rewards] if config is not None else []
    monitors = build_rewards(monitor_specs, device=args.device) if monitor_specs else None
    try:  # non-finite samples or scores: an error, never NaN in the results
        result, images = score_model(adapter, rewards, prompts, sampling["samples_per_prompt"], sampling["seed"],
                                     sampling["solver"], sampling["steps"], shift, monitors)
    except FloatingPointError as error:  # NaN samples: the checkpoint is unusable (2); a NaN score: the reward failed (1)
        failed = ValueError if "samples hold" in str(error) else RuntimeError
        raise failed(f"--checkpoint {str(args.checkpoint)!r}: {error}; nothing written") from None
    nonfinite = sorted(k for k, v in result["metrics"].items() if isinstance(v, float) and not math.isfinite(v))
    if nonfinite:
        raise ValueError(f"--checkpoint {str(args.checkpoint)!r}: non-finite metrics {nonfinite}; nothing written")
    result = {"checkpoint": str(args.checkpoint), "prompts": prompts, **sampling, "shift": shift,
              "rewards_config": specs, "monitor_rewards_config": monitor_specs, **result}
    atomic_write_text(out, json.dumps(result, indent=2))
    save_grid(images[:16, :8], out.with_suffix(".png"), row_labels=prompts[:16])
    print(json.dumps(result["metrics"], indent=2))
