"""The settings of each algorithm (the config sections `neighbor_grpo`, `flow_grpo`, `dance_grpo`, `mix_grpo`,
`diffusion_nft`, `awm`, `dgpo`), one
dataclass each with a docstring per field. They sit in the config layer, below the algorithms that read them;
each algorithm module re-exports its own."""

from __future__ import annotations

from dataclasses import dataclass

SOLVER_NAMES = ("euler", "heun", "dpm++2m")
"""The ODE solvers a config may name (the keys of `solvers.SOLVERS`, which a test keeps equal)."""


@dataclass
class NeighborGRPOConfig:
    group_size: int = 12
    """G: candidates per prompt."""
    neighbor_sigma: float = 0.3
    """Perturbation strength of Eq. 7 in (0, 1] (not flow time); 1 gives independent noises."""
    num_anchors: int = 4
    """B: candidates per group that act as anchors and get forward/backward passes."""
    rollout_solver: str = "dpm++2m"
    """ODE solver for rollouts: euler, heun or dpm++2m."""
    rollout_steps: int = 8
    """N: solver steps per rollout."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid; None: the model's own (1 for the built-in model, the
    scheduler's shift for SD3, the resolution-dependent shift for FLUX). 1 = no shift."""
    train_step_fraction: float = 0.5
    """[D] K = round(fraction * N) trained steps per rollout batch (the paper's cost figure implies K = 4 of 8)."""
    step_selection: str = "random"
    """[D] which K steps: random (drawn once per rollout batch), first, last, or all."""
    quasi_norm_p: float = 0.8
    """p of Eq. 11's power mean; 2 is standard GRPO (population std)."""
    adv_eps: float = 1e-4
    """[D] added to the power mean; stops near-flat groups from getting O(1) advantages."""
    adv_clip: float = 5.0
    """[D] advantages clipped to [-adv_clip, adv_clip]; 0 disables."""
    adv_recenter: bool = False
    """[D] re-centre each group's advantages after clipping (clipping breaks sum_i A_i = 0)."""
    tau_rel: float = 0.1
    """[D] temperature relative to the median old distance per (anchor, step); ignored when `tau` is set."""
    tau: float | None = None
    """[D] a fixed temperature instead of the relative one."""
    distance_reduction: str = "mean"
    """[D] squared L2 distance reduced over latent dimensions by 'mean' or 'sum'."""
    exclude_self: bool = False
    """[D] leave the anchor's own candidate out of its policy."""
    policy_space: str = "next_state"
    """Where the leaping policy measures distances: 'next_state' (the paper's Eq. 8: one Euler step to s_{j+1}
    against the candidates' next states) or 'x0' (predicted clean samples x - s v, for few-step models)."""
    x0_candidates: str = "step"
    """[D] with policy_space x0, what each candidate contributes: 'step' (its old prediction x_j - s_j v_old at the
    trained step) or 'final' (its rollout sample)."""
    eps_clip: float = 0.2
    """[D] PPO clip range of the ratio."""
    old_policy: str = "rollout"
    """[D] where pi_old comes from: 'rollout' (the rollout's stored velocities, free) or 'recompute' (an extra
    no-grad pass over all anchors and steps before the first update, same batching, so rho = 1 bitwise)."""
    ref_beta: float = 1.0
    """[D] reference anchoring: beta * mean ||v_theta - v_ref||^2 at the anchor states (0 disables). Default 1
    from `ngrpo compare --ablation ref_beta` (docs/design.md): far fewer out-of-range pixels, better realism and
    diversity, same time to target as 0."""

    @property
    def trained_steps(self) -> int:
        return max(1, min(self.rollout_steps, round(self.train_step_fraction * self.rollout_steps)))


# ---- Eq. 8: the leaping policy -------------------------------------------------------------------------------


@dataclass
class FlowGRPOConfig:
    group_size: int = 12
    """G: samples per prompt (the reference uses 24 on SD3.5; 12 here, as Neighbor GRPO)."""
    noise_level: float = 0.7
    """a in sigma_t = a * sqrt(s / (1 - s)): the SDE's noise level."""
    rollout_steps: int = 10
    """N: SDE sampling steps per rollout (the reference trains with 10, evaluates with 40 ODE steps)."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid; None: the model's own (1 for the built-in model, the
    scheduler's shift for SD3, the resolution-dependent shift for FLUX). 1 = no shift."""
    train_step_fraction: float = 1.0
    """Fraction of the SDE steps trained, the first ones as the reference's range(num_train_timesteps)."""
    fast_window_size: int = 0
    """Flow-GRPO-Fast: SDE (and training) only inside a window of this many steps, ODE elsewhere (0 = off: every
    step but the last is SDE, as the reference)."""
    fast_window_end: int | None = None
    """Flow-GRPO-Fast: the window starts at a keyed random step in [0, end - size] each iteration; None = N // 2
    (the reference's sde_window_range = (0, num_steps // 2))."""
    same_initial_noise: bool = False
    """One initial noise for the whole group (the reference's same_latent, default off: independent noises)."""
    global_std: bool = True
    """Divide by the std of all rewards in the batch instead of each prompt's (the reference's sample.global_std,
    True in its base and SD3 configs); the mean is always per prompt."""
    adv_eps: float = 1e-4
    """Added to the (population) std of the advantages."""
    adv_clip: float = 5.0
    """Advantages clipped to [-adv_clip, adv_clip] (the reference's adv_clip_max); 0 disables."""
    eps_clip: float = 1e-4
    """PPO clip range of the per-sample ratio (the reference's clip_range)."""
    kl_beta: float = 0.0
    """Weight of the KL to the reference model, ||mean_theta - mean_ref||^2 / (2 sigma_t^2) averaged (the
    reference's train.beta: 0 in its base config, 0.04 on GenEval/OCR, 0.01 on PickScore)."""
    num_minibatches: int = 2
    """Optimizer steps per rollout batch when minibatch_by='samples' (the reference updates twice per epoch:
    gradient_accumulation_steps = num_batches_per_epoch // 2)."""
    minibatch_by: str = "samples"
    """'samples': the candidates are split into num_minibatches slices, each trained on all trained steps (as the
    reference accumulates gradients over timesteps); 'steps': one optimizer step per trained step, all candidates."""
    old_policy: str = "rollout"
    """Where the old log-probs come from: 'rollout' (recorded while sampling, free) or 'recompute' (a no-grad
    pass batched like the training pass before the first update, so the ratio is exactly 1)."""
    sde_type: str = "flow_sde"
    """The stochastic step: 'flow_sde' (Flow-GRPO's SDE) or 'cps' (Coefficients-Preserving Sampling, the
    reference's sde_type 'cps': a DDIM-style step whose noise keeps the forward marginal's std s'). The reference
    runs CPS in its Fast no-CFG configs: fast_window_size 3, eps_clip 1e-5, cps_eta 0.8."""
    cps_eta: float = 0.8
    """CPS's eta in (0, 1]: injected noise std sigma_j = s_{j+1} sin(eta pi / 2) (the reference's noise_level
    with sde_type 'cps'; 0.8 as its README recommends)."""
    cps_logprob: str = "code"
    """[D] CPS log-prob: 'code' (the reference's -mean_d (x' - mean)^2, no 1 / (2 sigma^2); eps_clip 1e-5) or
    'gaussian' (the true Gaussian log-density averaged over dims; the clip range must be re-tuned)."""
    guard_ratio_norm: bool = False
    """GRPO-Guard's RatioNorm: log rho = (logp - logp_old + mean_d (mean - mean_old)^2 / (2 shat^2)) * shat,
    shat the step's std; removes the negative bias of the log-ratio and its 1/shat scale (the reference's
    rationorm, with guard_grad_reweight). Not defined with sde_type 'cps'."""
    guard_grad_reweight: bool = False
    """GRPO-Guard's gradient reweighting: each step's clipped loss divided by |dt| = s_j - s_{j+1}, so every
    noise level gets a comparable gradient (the reference's rationorm, with guard_ratio_norm). Not defined with
    sde_type 'cps'."""


@dataclass
class DanceGRPOConfig:
    group_size: int = 12
    """G: samples per prompt (the reference's num_generations)."""
    eta: float = 0.3
    """Noise scale of the SDE: std = eta * sqrt(s - s_next)."""
    rollout_steps: int = 25
    """N: SDE sampling steps per rollout (the Neighbor GRPO paper's comparison; the FLUX script uses 16)."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid; None: the model's own (1 for the built-in model, the
    scheduler's shift for SD3, the resolution-dependent shift for FLUX). 1 = no shift."""
    train_step_fraction: float = 0.6
    """The reference's timestep_fraction: int(fraction * (N - 1)) random steps of the N - 1 trainable ones, drawn
    once per rollout batch: 14 of 25 (the reference drops the last step, train_grpo_flux.py:512-519, and trains
    int(fraction * (N - 1)) of the rest, :570)."""
    same_initial_noise: bool = True
    """One initial noise for the whole group (the reference's init_same_noise, on in its recipes)."""
    adv_eps: float = 1e-8
    """Added to the group's unbiased std (torch.std) of the rewards."""
    adv_clip: float = 5.0
    """Advantages clipped to [-adv_clip, adv_clip] (the reference's adv_clip_max); 0 disables."""
    eps_clip: float = 1e-4
    """PPO clip range of the per-sample ratio (the reference's clip_range)."""
    num_minibatches: int = 3
    """Optimizer steps per rollout batch when minibatch_by='samples' (the FLUX recipe: 12 samples per GPU,
    gradient_accumulation_steps 4, so 3 updates per rollout)."""
    minibatch_by: str = "samples"
    """'samples': the candidates are split into num_minibatches slices, each trained on all trained steps (as the
    reference accumulates gradients over timesteps); 'steps': one optimizer step per trained step, all candidates."""
    old_policy: str = "rollout"
    """Where the old log-probs come from: 'rollout' (recorded while sampling, free) or 'recompute' (a no-grad
    pass batched like the training pass before the first update, so the ratio is exactly 1)."""


@dataclass
class MixGRPOConfig:
    group_size: int = 12
    """G: samples per prompt (the reference's num_generations)."""
    sde: str = "flow_grpo"
    """SDE inside the window: 'flow_grpo' (the reference's --flow_grpo_sampling, used in its recipes) or
    'dance_grpo'."""
    noise_level: float = 0.7
    """The reference's eta: Flow-GRPO's noise level (sde='flow_grpo') or DanceGRPO's eta (sde='dance_grpo')."""
    rollout_steps: int = 25
    """N: sampling steps per rollout on the full grid (Flash replaces the steps after the window by fewer)."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid; None: the model's own (1 for the built-in model, the
    scheduler's shift for SD3, the resolution-dependent shift for FLUX). 1 = no shift."""
    window_size: int = 4
    """SDE steps in the sliding window (the reference's group_size)."""
    window_stride: int = 1
    """Steps the window moves each time (the reference's prog_overlap_step, with prog_overlap on)."""
    window_interval: int = 25
    """Iterations before the window moves (the reference's iters_per_group: 25, 20 in the Flash recipe)."""
    window_roll_back: bool = True
    """Restart the window at step 0 after it passed the last trainable step (the reference's roll_back)."""
    flash: bool = False
    """MixGRPO-Flash: after the window, DPM-Solver++(2M) on a grid compressed by flash_compress_ratio."""
    flash_compress_ratio: float = 0.4
    """Flash: the steps after the window are cut to int(ratio * steps left) (the reference's dpm_post_compress_ratio)."""
    same_initial_noise: bool = True
    """One initial noise for the whole group (the reference's init_same_noise, on in its recipes)."""
    adv_eps: float = 1e-8
    """Added to the group's unbiased std (torch.std) of the rewards."""
    adv_clip: float = 5.0
    """Advantages clipped to [-adv_clip, adv_clip] (the reference's adv_clip_max); 0 disables."""
    eps_clip: float = 1e-4
    """PPO clip range of the per-sample ratio (the reference's clip_range)."""
    num_minibatches: int = 4
    """Optimizer steps per rollout batch when minibatch_by='samples' (the recipe: 12 samples per GPU,
    gradient_accumulation_steps 3, so 4 updates per rollout)."""
    minibatch_by: str = "samples"
    """'samples': the candidates are split into num_minibatches slices, each trained on all window steps (as the
    reference accumulates gradients over timesteps); 'steps': one optimizer step per window step, all candidates."""
    old_policy: str = "rollout"
    """Where the old log-probs come from: 'rollout' (recorded while sampling, free) or 'recompute' (a no-grad
    pass batched like the training pass before the first update, so the ratio is exactly 1)."""


@dataclass
class DiffusionNFTConfig:
    group_size: int = 12
    """G: samples per prompt (the reference uses 24 on SD3.5; 12 here, as Neighbor GRPO)."""
    rollout_solver: str = "dpm++2m"
    """ODE solver of the rollouts: euler, heun or dpm++2m (the reference's dpm2 is DPM-Solver++(2M))."""
    rollout_steps: int = 10
    """N: solver steps per rollout (10 in the reference's PickScore, GenEval and OCR configs)."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid; None: the model's own. 1 = no shift."""
    beta: float = 1.0
    """[D] nft_beta: the implicit policies' step, v+- = v_old +- beta (v_theta - v_old); the trust-region strength
    (1.0 for PickScore/HPSv2/GenEval, 0.1 for OCR and multi-reward)."""
    adv_clip: float = 5.0
    """[D] nft_adv_clip: advantages clipped to +-adv_clip; also the slope of r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)."""
    loss_scale: str = "code"
    """[D] 'code': the policy loss times adv_clip / beta (the reference code; reuses its learning rates) or
    'paper': unscaled."""
    adaptive_weight: bool = True
    """[D] divide each implicit policy's x0-space squared error by its own mean absolute error (floor 1e-5,
    float64), as the code; False: plain mean_d (v+- - v_target)^2."""
    time_sampling: str = "grid"
    """[D] 'grid': int(N * timestep_fraction) distinct rollout-grid times per sample, a keyed permutation each (the
    code: every grid time but one, s = 1 included); 'uniform': as many times drawn from U(0, 1)."""
    timestep_fraction: float = 0.99
    """[D] K_t = int(N * fraction) training times per sample (9 of 10)."""
    noise_per_time: bool = True
    """[D] a fresh eps per (sample, time) (the code) or one eps per sample for all its times."""
    old_decay: int = 1
    """[D] old-policy soft-update schedule decay_type, applied after each iteration's last optimizer step with k
    the global step: 0: eta = 0 (old = current); 1: min(0.001 k, 0.5); 2 (OCR): 0 for k < 75, then
    min(0.0075 (k - 75), 0.999)."""
    rollout_policy: str = "old"
    """[D] which weights roll out: 'old' (the soft-updated old policy, the code) or 'current'."""
    global_std: bool = True
    """[D] divide by the std of all rewards in the batch (the code) instead of each prompt's."""
    adv_eps: float = 1e-4
    """Added to the (population) std of the advantages."""
    kl_beta: float = 1e-4
    """[D] weight of the KL to the base model, mean_d (v_theta - v_ref)^2 (0 skips the reference forward)."""
    num_minibatches: int = 1
    """Optimizer steps per rollout batch (gradient_step_per_epoch: 1; 2 for OCR); the candidates are split."""

    @property
    def training_times(self) -> int:
        return max(1, int(self.rollout_steps * self.timestep_fraction))


@dataclass
class AWMConfig:
    group_size: int = 12
    """G: samples per prompt (the reference uses 24 on SD3.5; 12 here, as Neighbor GRPO)."""
    rollout_solver: str = "dpm++2m"
    """ODE solver of the rollouts (the reference's PickScore config samples with a deterministic SA-Solver; our
    DPM-Solver++ ODE stands in: the loss only needs the clean samples)."""
    rollout_steps: int = 14
    """N: solver steps per rollout (14 in the reference)."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid; None: the model's own. 1 = no shift."""
    time_sampler: str = "discrete"
    """[D] stratified grid times: 'discrete' (bins of linspace(0, int(N * fraction), T + 1), PickScore) or
    'discrete_wo_init' (from index 1: s = 1 never trained; GenEval, OCR)."""
    num_times: int = 6
    """[D] T: training times per sample, one per stratum."""
    timestep_fraction: float = 0.9
    """[D] the strata cover grid indices below int(N * fraction)."""
    times_per: str = "minibatch"
    """[D] 'minibatch': the same T times for every sample of an optimizer step (the code), or 'sample'."""
    weighting: str = "ghuber"
    """[D] the flow-matching error's weighting: ghuber (s ((err + 1e-10)^p - 1e-10^p) / p), uniform (err),
    t (s err), t2 (s^2 err), huber (s (sqrt(err + 1e-10) - 1e-5))."""
    ghuber_p: float = 0.25
    """[D] p of the ghuber weighting (1 gives s * err)."""
    adv_clip: float = 5.0
    """Advantages clipped to +-adv_clip."""
    advantage_max: float = 1.0
    """[D] Ahat = clip(A) / adv_clip * advantage_max, in [-advantage_max, advantage_max] (a constant
    learning-rate factor)."""
    global_std: bool = True
    """[D] divide by the std of all rewards in the batch (the code) instead of each prompt's."""
    adv_eps: float = 1e-4
    """Added to the (population) std of the advantages."""
    kl_beta: float = 1e-4
    """[D] weight of the KL to the base model, mean_d (v_theta - v_ref)^2 (PickScore 1e-4; 0 skips it)."""
    ema_beta: float = 1.0
    """[D] weight of the KL to the EMA policy, mean_d (v_theta - v_ema)^2 (0 skips it)."""
    ema_decay: float = 0.3
    """[D] the EMA policy's decay d after each iteration: theta_ema <- d theta_ema + (1 - d) theta."""
    ema_ramp: str = "linear"
    """[D] 'linear': d = min(ema_decay, 0.001 k), k the global step (the code); 'constant': d = ema_decay."""
    num_minibatches: int = 1
    """Optimizer steps per rollout batch (1: on-policy, as the reference)."""

    @property
    def strata_end(self) -> int:
        return int(self.rollout_steps * self.timestep_fraction)


@dataclass
class DGPOConfig:
    group_size: int = 12
    """G: samples per prompt (the reference's PickScore config uses 24; 12 here, as Neighbor GRPO)."""
    rollout_solver: str = "dpm++2m"
    """ODE solver of the rollouts (the reference: diffusers' DPMSolverMultistepScheduler, DPM-Solver++ order 2)."""
    rollout_steps: int = 10
    """N: solver steps per rollout (10 in every reference config)."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid (the reference's flow_shift 3 on SD3.5); None: the model's own.
    The grid is the reference's flow sigmas shift(linspace(0.999, 0, N + 1)): it starts at 0.999, not 1."""
    beta_dpo: float = 10.0
    """[D] the DPO temperature inside the group score S_g (10 for PickScore, 100 for OCR/GenEval): how fast the
    sigmoid weight leaves 1/2 as the policy moves from the reference; the trust-region knob."""
    kl_beta: float = 1e-3
    """[D] weight of the KL to the base model, mean_d (v_theta - v_ref)^2 (PickScore 1e-3; OCR/GenEval 0.02)."""
    clip_range: float = 5e-2
    """[D] c of the PPO-style gate: a sample's flow-matching loss is detached when A > 0 and rho > 1 + c, or
    A <= 0 and rho < 1 - c, rho = exp(l_old - l) (clip_dsm; 5e-2 for PickScore). 0 turns the gate off and skips the
    old-policy forward."""
    clip_kl: bool = False
    """[D] also detach the KL term of gated samples (the reference's clip_kl, off in its configs)."""
    num_times: int = 4
    """[D] M: training times per iteration (num_train_timesteps), drawn without replacement from grid indices
    0..trunc_steps, the same for every sample."""
    trunc_steps: int = 6
    """[D] the last grid index a training time may take (6; 4 for GenEval): only the noisier part of the grid."""
    shared_noise: bool = True
    """[D] one eps per group and training time, shared by the group's members (use_shared_noise), or one per sample."""
    sigmoid_weight: bool = True
    """[D] weight each group by sg(sigmoid(S_g)) (the method); False: a constant 1/2 (its value at the reference),
    i.e. plain advantage-weighted flow matching."""
    use_ema_ref: bool = False
    """[D] the group score compares with the EMA-old policy instead of the base model (dynamic reference)."""
    switch_ema_ref: int = 200
    """[D] roll out with the EMA-old weights once more than this many optimizer steps were taken (200; 500 GenEval)."""
    ema_decay: float = 0.3
    """[D] the EMA-old policy follows after every optimizer step: theta_old <- d theta_old + (1 - d) theta,
    d = min(ema_decay, 0.001 k), k the optimizer steps taken before this one."""
    global_std: bool = True
    """[D] divide by the std of all rewards in the batch (PickScore, OCR) instead of each prompt's (GenEval)."""
    adv_eps: float = 1e-4
    """Added to the (population) std of the advantages."""
    adv_clip: float = 5.0
    """Advantages clipped to +-adv_clip in the loss."""
    num_minibatches: int = 1
    """[D] optimizer steps per iteration, each on a share of the M training times and every sample (1: the spec's
    one step per epoch; M: one step per training time, the step count of the reference code, whose accelerate
    accumulation inside its time loop steps every num_batches (batch, time) passes)."""


# ---- the sliding window (grpo_states.py, sample_strategy 'progressive') ---------------------------------------


ALGORITHM_SETTINGS = {"neighbor_grpo": NeighborGRPOConfig, "flow_grpo": FlowGRPOConfig, "dance_grpo": DanceGRPOConfig,
                      "mix_grpo": MixGRPOConfig, "diffusion_nft": DiffusionNFTConfig, "awm": AWMConfig, "dgpo": DGPOConfig}
"""Each algorithm's settings section (the keys of `algorithms.ALGORITHMS`, which a test keeps equal)."""
