"""What `ngrpo compare` runs: each method's settings (its paper's, or the library's defaults), the tuning grid of
learning rate x the method's main trust-region knob, the [D] scaling of clip ranges defined on element-averaged
log-ratios, each reference's evaluation EMA, and Neighbor GRPO's ablations. Plain data and small pure functions."""

from __future__ import annotations

import math

# Each baseline's optimizer as its reference repository sets it (table and file:line citations in
# docs/benchmarks.md, "Optimizer settings of the baselines"). All three use AdamW with betas (0.9, 0.999) and eps
# 1e-8, torch's defaults and the library's. The learning rate is swept alike for every method, not taken from here.
REFERENCE_OPTIMIZER: dict[str, list[str]] = {
    # yifan123/flow_grpo config/base.py:69 adam_weight_decay 1e-4, :76 max_grad_norm 1.0
    "flow_grpo": ["optim.weight_decay=1e-4", "optim.max_grad_norm=1.0"],
    # XueZeyue/DanceGRPO scripts/finetune/finetune_flux_grpo_8gpus.sh:46-47 (the FLUX recipe): max_grad_norm 0.01,
    # weight_decay 1e-4; its share of clipped steps is logged as grad_clipped_share
    "dance_grpo": ["optim.weight_decay=1e-4", "optim.max_grad_norm=0.01"],
    # Tencent-Hunyuan/MixGRPO scripts/finetune/finetune_flux_grpo_MixGRPO.sh:148-149 (and the Flash script's)
    "mix_grpo": ["optim.weight_decay=1e-4", "optim.max_grad_norm=1.0"],
}

# The library's defaults for Neighbor GRPO (ref_beta 1: reference anchoring, a [D] of ours, docs/design.md).
LIBRARY_DEFAULTS = ["algorithm=neighbor_grpo"]

# Each method at its own paper's settings: the main table (MAIN_TABLE, the default) and newer methods that
# `--methods` adds and later tables report against the main table's frozen target.
PAPER_SETTINGS: dict[str, list[str]] = {
    # The paper (spec algorithms.md section 1): 8-step DPM-Solver++, G 12, B 4, K 4 of 8, sigma 0.3, p 0.8, and "no
    # KL term": ref_beta 0. It has no public code; where it is silent (tau_rel, eps_clip, adv_clip, the distance's
    # mean) the library's [D] defaults stand. So the paper's settings differ from the defaults in ref_beta only.
    "neighbor_grpo": ["algorithm=neighbor_grpo", "neighbor_grpo.ref_beta=0"],
    # not a paper's setting: the library's defaults, the second Neighbor GRPO row of the table
    "neighbor_grpo_defaults": LIBRARY_DEFAULTS,
    # not a paper's setting: the paper's, with the leaping policy in clean-sample space (few-step models, issue 27)
    "neighbor_grpo_x0": ["algorithm=neighbor_grpo", "neighbor_grpo.ref_beta=0", "neighbor_grpo.policy_space=x0"],
    "flow_grpo": ["algorithm=flow_grpo", *REFERENCE_OPTIMIZER["flow_grpo"]],  # 10 SDE steps
    "dance_grpo": ["algorithm=dance_grpo", *REFERENCE_OPTIMIZER["dance_grpo"]],  # 25 SDE steps, fraction 0.6
    "mix_grpo": ["algorithm=mix_grpo", *REFERENCE_OPTIMIZER["mix_grpo"]],  # 25 steps, SDE window of 4
    "mix_grpo_flash": ["algorithm=mix_grpo", "mix_grpo.flash=true", *REFERENCE_OPTIMIZER["mix_grpo"]],
    # yifan123/flow_grpo config/grpo.py pickscore_sd3_fast_nocfg (L323-L363): CPS eta 0.8 in a window of 3 steps
    # starting in [0, N // 2 - 3], clip 1e-5, global std, KL off; 10 steps
    "flow_grpo_cps": ["algorithm=flow_grpo", "flow_grpo.sde_type=cps", "flow_grpo.cps_eta=0.8",
                      "flow_grpo.fast_window_size=3", "flow_grpo.eps_clip=1e-5", *REFERENCE_OPTIMIZER["flow_grpo"]],
    # yifan123/flow_grpo config/grpo_guard.py pickscore_hps_sd3_ratio_norm (L84-L129): rationorm (both
    # mechanisms), clip 4e-6, per-group std, eta 0.7, steps 0-8 of 10, KL off
    "grpo_guard": ["algorithm=flow_grpo", "flow_grpo.guard_ratio_norm=true", "flow_grpo.guard_grad_reweight=true",
                   "flow_grpo.eps_clip=4e-6", "flow_grpo.global_std=false", *REFERENCE_OPTIMIZER["flow_grpo"]],
    # spec competitors.md 1.3 / 2.3: the authors' PickScore settings are the sections' defaults (docs/algorithms.md)
    "diffusion_nft": ["algorithm=diffusion_nft"],
    "awm": ["algorithm=awm"],
    # spec competitors.md 5.2, Luo-Yihong/DGPO config/dgpo.py pickscore_sd3_4gpu without CFG: beta_dpo 10, kl_beta
    # 1e-3, clip 5e-2, M 4 times of grid indices 0..6, shared noise per group, global std, 10 ODE steps, EMA-old
    # rollouts after 200 steps; the section's defaults (docs/algorithms.md)
    "dgpo": ["algorithm=dgpo"],
}


def section_of(method: str) -> str:
    """The config section (= algorithm name) a row of PAPER_SETTINGS trains with."""
    return next(o.split("=", 1)[1] for o in PAPER_SETTINGS[method] if o.startswith("algorithm="))


# The authors' group size as a second row where it differs from the benchmark's G 12 (issue #16; spec
# competitors.md 1.3, 2.2, 3.3 pickscore_sd3_fast_nocfg, 4.3, 5.2 pickscore_sd3_4gpu): the row's settings plus G.
AUTHORS_GROUP_SIZE: dict[str, int] = {"diffusion_nft": 24, "awm": 24, "flow_grpo_cps": 18, "grpo_guard": 24, "dgpo": 24}
for _method, _size in AUTHORS_GROUP_SIZE.items():
    PAPER_SETTINGS[f"{_method}_g{_size}"] = [*PAPER_SETTINGS[_method], f"{section_of(_method)}.group_size={_size}"]
MAIN_TABLE = ("neighbor_grpo", "neighbor_grpo_defaults", "flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash")
REFERENCE_METHOD = "neighbor_grpo"  # every paired ratio and "no worse" verdict is against this one

# Clip ranges of the SDE methods are defined on log-ratios averaged over latent elements (sde.gaussian_log_prob's
# mean over dims, as Flow-GRPO's sd3_sde_with_logprob.py and DanceGRPO's flux_step do); the noise of such an
# average scales as 1 / sqrt(D), so on a small latent the reference clip binds much earlier ([D], issue #15 item
# 4). The reference model's latent elements at its resolution: SD3.5-Medium at 512 px (flow_grpo config/grpo.py
# config.resolution = 512; SD3's VAE: 16 channels, 8x downsampling) is 16 x 64 x 64; FLUX.1-dev at 720 px
# (DanceGRPO finetune_flux_grpo_8gpus.sh:39-40 and MixGRPO finetune_flux_grpo_MixGRPO.sh:141-142, --h 720 --w 720;
# FLUX's VAE: 16 channels, 8x) is 16 x 90 x 90.
REFERENCE_LATENT_ELEMENTS: dict[str, int] = {
    "flow_grpo": 16 * 64 * 64, "grpo_guard": 16 * 64 * 64,
    "dance_grpo": 16 * 90 * 90, "mix_grpo": 16 * 90 * 90, "mix_grpo_flash": 16 * 90 * 90,
}
CLIP_CHOICES = ("reference", "scaled")

# The tuning grid's second axis: each method's main trust-region knob (issue #16, "Settings that are fair"), the
# reference value first. Methods with a clip on element-averaged log-ratios tune that clip: CLIP_CHOICES.
KNOBS: dict[str, tuple[str, tuple]] = {
    "neighbor_grpo": ("neighbor_grpo.tau_rel", (0.1, 0.3)),
    "neighbor_grpo_defaults": ("neighbor_grpo.tau_rel", (0.1, 0.3)),
    "neighbor_grpo_x0": ("neighbor_grpo.tau_rel", (0.1, 0.3)),
    "flow_grpo": ("flow_grpo.eps_clip", CLIP_CHOICES),
    "dance_grpo": ("dance_grpo.eps_clip", CLIP_CHOICES),
    "mix_grpo": ("mix_grpo.eps_clip", CLIP_CHOICES),
    "mix_grpo_flash": ("mix_grpo.eps_clip", CLIP_CHOICES),
    "grpo_guard": ("flow_grpo.eps_clip", CLIP_CHOICES),
    "flow_grpo_cps": ("flow_grpo.cps_eta", (0.8, 0.7)),
    "diffusion_nft": ("diffusion_nft.beta", (1.0, 0.1)),
    "awm": ("awm.kl_beta", (1e-4, 1e-3)),
    "dgpo": ("dgpo.beta_dpo", (10.0, 100.0)),
}

# Each reference's evaluation EMA of the trained weights, where it has one: (largest decay, optimizer steps
# between updates); the decay at optimizer step k is min((1 + k) / (10 + k), largest) (flow_grpo/ema.py
# get_current_decay, shared by all three repositories). Flow-GRPO's configs set train.ema = True with decay 0.9
# every 8 steps (config/grpo.py; scripts/train_sd3.py:445); DiffusionNFT 0.9 every step and AWM 0.99 every step
# (spec competitors.md 1.2 item 8, 2.2 item 8). DanceGRPO's and MixGRPO's FLUX scripts do not pass --use_ema;
# Neighbor GRPO's paper states none.
REFERENCE_EMA: dict[str, tuple[float, int]] = {
    "flow_grpo": (0.9, 8), "flow_grpo_cps": (0.9, 8), "grpo_guard": (0.9, 8),
    "diffusion_nft": (0.9, 1), "awm": (0.99, 1),
}

# Ablations of Neighbor GRPO the paper reports: name -> {label: overrides}, on the library's defaults.
ABLATIONS: dict[str, dict[str, list[str]]] = {
    "sigma": {f"sigma={v}": [f"neighbor_grpo.neighbor_sigma={v}"] for v in (0.1, 0.3, 0.5, 0.7)},
    "anchors": {f"B={b}": [f"neighbor_grpo.num_anchors={b}"] for b in (1, 2, 4, 6)},
    "p": {f"p={p}": [f"neighbor_grpo.quasi_norm_p={p}"] for p in (0.8, 1.0, 2.0)},
    "solver": {"dpm++2m x8": ["neighbor_grpo.rollout_solver=dpm++2m", "neighbor_grpo.rollout_steps=8"],
               "euler x28": ["neighbor_grpo.rollout_solver=euler", "neighbor_grpo.rollout_steps=28"]},
    "tau": {f"tau_rel={t}": [f"neighbor_grpo.tau_rel={t}"] for t in (0.03, 0.1, 0.3)},
    "ref_beta": {f"ref_beta={b}": [f"neighbor_grpo.ref_beta={b}"] for b in (0.0, 1.0, 10.0)},
    "distance": {"relative tau (mean)": [],
                 # the relative tau is ~0.006 on this model (logged as `tau`); 0.384 = 0.006 x 64 latent dims
                 "fixed tau=0.006, mean": ["neighbor_grpo.tau=0.006", "neighbor_grpo.distance_reduction=mean"],
                 "fixed tau=0.384, sum": ["neighbor_grpo.tau=0.384", "neighbor_grpo.distance_reduction=sum"],
                 "fixed tau=0.006, sum": ["neighbor_grpo.tau=0.006", "neighbor_grpo.distance_reduction=sum"]},
    "clip": {f"eps_clip={e}": [f"neighbor_grpo.eps_clip={e}"] for e in (0.05, 0.2, 0.5)},
    "steps": {"random K=4": [], "first K=4": ["neighbor_grpo.step_selection=first"],
              "last K=4": ["neighbor_grpo.step_selection=last"], "all K=8": ["neighbor_grpo.step_selection=all"]},
    # GDPO's batch-standardised advantages against the per-group ones (one reward here: 'each' = 'sum')
    "reward_normalization": {"each": ["reward_normalization=each"],
                             "advantages (GDPO)": ["reward_normalization=advantages"]},
}


def clip_scale(reference_elements: int, latent_elements: int) -> float:
    """sqrt(D_ref / D): the factor that gives an element-averaged log-ratio's clip the same bite on a latent of D
    elements as the reference clip had on D_ref."""
    if reference_elements < 1 or latent_elements < 1:
        raise ValueError(f"latent elements: expected >= 1, got D_ref={reference_elements}, D={latent_elements}")
    return math.sqrt(reference_elements / latent_elements)


def _setting(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def knob_grid(method: str, settings: list[str], latent_elements: int) -> list[dict]:
    """The method's knob values as [{"label", "key", "value", "overrides"}], the reference value first; a method
    without a knob (an ablation's variant, --equal-steps rows keep theirs) gets one entry with no override."""
    if method not in KNOBS:
        return [{"label": "reference", "key": None, "value": None, "overrides": []}]
    from neighbor_grpo.config.train_config import load_config

    key, values = KNOBS[method]
    reference = _setting(load_config(None, settings), key)
    entries = []
    for value in values:
        if value == "reference":
            number, label = reference, f"{key.rsplit('.', 1)[1]}={reference:g} (reference)"
        elif value == "scaled":
            factor = clip_scale(REFERENCE_LATENT_ELEMENTS[method], latent_elements)
            number = float(f"{reference * factor:.4g}")
            label = f"{key.rsplit('.', 1)[1]}={number:.3g} (reference x sqrt({REFERENCE_LATENT_ELEMENTS[method]}/{latent_elements}))"
        else:
            number, label = float(value), f"{key.rsplit('.', 1)[1]}={value:g}"
        entries.append({"label": label, "key": key, "value": number, "overrides": [f"{key}={number!r}"]})
    return entries


def equal_steps_overrides(method: str, steps: int) -> list[str]:
    """The same method with `steps` rollout steps."""
    section = section_of(method)
    extra = [f"{section}.rollout_steps={steps}"]
    if section == "mix_grpo":
        extra.append(f"mix_grpo.window_size={min(4, steps - 2)}")
    return PAPER_SETTINGS[method] + extra


# ---- the issue #23 protocol: one selection rule over every method's candidates --------------------------------

# CPS's log-ratio is averaged over latent elements too (Flow-GRPO's sampler), so its clip is scaled like the others'.
REFERENCE_LATENT_ELEMENTS["flow_grpo_cps"] = 16 * 64 * 64

# The second axis under the protocol: KNOBS, except that DiffusionNFT's beta and AWM's kl_beta moved their curves
# little or not at all on the recorded grids (issue #23 item 6: their grid is lr x anchoring only) and CPS tunes
# its clip (reference and scaled) instead of eta.
PROTOCOL_KNOBS: dict[str, tuple[str, tuple]] = {
    **{m: knob for m, knob in KNOBS.items() if m not in ("diffusion_nft", "awm", "flow_grpo_cps")},
    "flow_grpo_cps": ("flow_grpo.eps_clip", CLIP_CHOICES),
}

# Anchoring parity: each method whose authors run a KL or reference term gets that variant as a candidate, and the
# rule picks among them as it picks the lr. Values: no anchor (or the row's own) and the authors' term.
ANCHORING: dict[str, tuple[str, tuple]] = {
    # Neighbor GRPO: the paper's "no KL term" (0) and the library's reference anchoring (1)
    "neighbor_grpo": ("neighbor_grpo.ref_beta", (0.0, 1.0)),
    # its clean-sample policy (AR-CoPO's form) likewise: the same algorithm, the same anchoring choice
    "neighbor_grpo_x0": ("neighbor_grpo.ref_beta", (0.0, 1.0)),
    # Flow-GRPO and CPS: kl_beta 0 in the Fast/PickScore configs, 0.04 in geneval_sd3 (spec competitors.md 3.2)
    "flow_grpo": ("flow_grpo.kl_beta", (0.0, 0.04)),
    "flow_grpo_cps": ("flow_grpo.kl_beta", (0.0, 0.04)),
    # DiffusionNFT: train.beta 1e-4 in every config (spec 1.3); without it for parity with the unanchored rows
    "diffusion_nft": ("diffusion_nft.kl_beta", (1e-4, 0.0)),
    # AWM: PickScore 1e-4, OCR 3e-3 (spec 2.3)
    "awm": ("awm.kl_beta", (1e-4, 3e-3)),
    # DGPO: PickScore 1e-3, OCR/GenEval 0.02 (spec 5.2)
    "dgpo": ("dgpo.kl_beta", (1e-3, 0.02)),
}

# Warm-ups the authors count in optimizer steps or iterations never finish within the benchmark's budgets (issue
# #23 item 3), so the scaled variant is a candidate beside the authors' value: a warm-up ends at WARMUP_FRACTION of
# the run's iterations (DGPO's switch to EMA-old rollouts), MixGRPO's window sweeps its positions once within the
# budget, AWM's 0.001 k ramp of the EMA policy's decay (300 steps to 0.3) is dropped ('constant'). DiffusionNFT's
# old-policy ramp (min(0.001 k, 0.5)) has no setting to scale: it runs the authors' ramp only.
WARMUP_FRACTION = 0.25


def warmup_variants(method: str, settings: list[str], iterations: int) -> list[dict]:
    """The authors' warm-up and the budget-scaled one as knob entries; one entry with no override where the method
    has no warm-up to scale."""
    from neighbor_grpo.config.train_config import load_config

    none = [{"label": "", "key": None, "value": None, "overrides": []}]
    if method not in PAPER_SETTINGS:
        return none
    section = section_of(method)
    config = getattr(load_config(None, settings), section)
    if section == "dgpo":
        key, value = "dgpo.switch_ema_ref", max(1, round(WARMUP_FRACTION * iterations * config.num_minibatches))
    elif section == "mix_grpo":
        positions = max(1, (config.rollout_steps - config.window_size) // config.window_stride + 1)
        key, value = "mix_grpo.window_interval", max(1, iterations // positions)
    elif section == "awm":
        key, value = "awm.ema_ramp", "constant"
    else:
        return none
    authors = _setting(load_config(None, settings), key)
    if authors == value:
        return [{"label": f"{key.rsplit('.', 1)[1]}={authors} (authors')", "key": key, "value": authors,
                 "overrides": []}]
    return [{"label": f"{key.rsplit('.', 1)[1]}={authors} (authors')", "key": key, "value": authors, "overrides": []},
            {"label": f"{key.rsplit('.', 1)[1]}={value} (scaled to the budget)", "key": key, "value": value,
             "overrides": [f"{key}={value!r}" if not isinstance(value, str) else f"{key}={value}"]}]


def _axis(method: str, settings: list[str], key: str, values: tuple, latent_elements: int) -> list[dict]:
    saved = KNOBS.get(method)
    KNOBS[method] = (key, values)  # knob_grid reads the axis from KNOBS: lend it this one
    try:
        return knob_grid(method, settings, latent_elements)
    finally:
        if saved is None:
            del KNOBS[method]
        else:
            KNOBS[method] = saved


def protocol_grid(method: str, settings: list[str], latent_elements: int, iterations: int) -> list[dict]:
    """The issue #23 candidates besides the lr: PROTOCOL_KNOBS x ANCHORING x warm-up variants, each a knob entry
    {"label", "key", "value", "overrides"} (labels and keys joined with ', ' and '+')."""
    axes = [[{"label": "", "key": None, "value": None, "overrides": []}]]
    if method in PROTOCOL_KNOBS:
        axes.append(_axis(method, settings, *PROTOCOL_KNOBS[method], latent_elements))
    if method in ANCHORING:
        axes.append(_axis(method, settings, *ANCHORING[method], latent_elements))
    axes.append(warmup_variants(method, settings, iterations))
    entries = axes[0]
    for axis in axes[1:]:
        entries = [{"label": ", ".join(x for x in (a["label"], b["label"]) if x),
                    "key": "+".join(x for x in (a["key"], b["key"]) if x) or None,
                    "value": [v for v in (a["value"], b["value"]) if v is not None] or None,
                    "overrides": a["overrides"] + b["overrides"]} for a in entries for b in axis]
    return entries
