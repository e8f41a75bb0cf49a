"""PPO hyper-parameters, the train-state pytree, optimisers, and sharded state initialisation.

`PPOConfig` defaults are DeepRetrieval's PubMed recipe (reference section 5): GAE with
gamma = lambda = 1 and whitened advantages, k1 KL to the reference in the reward with a fixed
coefficient 0.001, clip 0.2, entropy 0.001, value clip 0.5, grad clip 1.0, AdamW (0.9, 0.999,
wd 0.01), constant LR 1e-6 (actor) / 1e-5 (critic), one PPO epoch over mini-batches of 16.

`TrainState` is a plain pytree of arrays (`flax.struct.dataclass`); optimiser transforms and
models are rebuilt from the config and closed over by the jitted steps, never stored.
The critic is a separate `ValueModel` by default (as in DeepRetrieval). With `critic="shared"` the
actor is a `PolicyValueModel` (the LM plus a value head on its trunk, `policy_model(cfg, model)`),
trained on actor loss + value_loss_coef * value loss with the actor's optimiser. Without a separate
critic (shared, GRPO, RLOO) `critic_params`/`critic_opt_state` are None; without any KL term
`ref_params` is None.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from deepretrieval_jax import sharding
from deepretrieval_jax.models import CausalLM, lora
from deepretrieval_jax.models.transformer import ValueHead
from deepretrieval_jax.rl import algo
from deepretrieval_jax.rl.objectives import POLICY_LOSSES

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")
CRITICS = ("separate", "shared")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """All PPO/GRPO/RLOO hyper-parameters. Batch sizes count rows (samples), not prompts."""

    # Advantages.
    advantage_estimator: str = "gae"  # "gae" (needs the critic) | "grpo" | "rloo"
    gamma: float = 1.0  # GAE discount per token
    lam: float = 1.0  # GAE lambda
    whiten_advantages: bool = True  # GAE: whiten over the valid response tokens of the batch
    grpo_normalize_std: bool = True  # GRPO: divide by the group std (False = Dr. GRPO)
    grpo_eps: float = 1e-6  # GRPO: added to the group std
    critic: str = "separate"  # GAE: "separate" ValueModel | "shared" value head on actor trunk
    value_loss_coef: float = 0.5  # shared critic: loss = actor loss + coef * value loss
    # KL to the frozen reference policy.
    kl_in_reward: bool = True  # subtract kl_coef * KL per token from the reward
    kl_estimator: str = "k1"  # in-reward estimator: k1 | abs | k2/mse | k3/low_var_kl
    kl_coef: float = 0.001  # initial (fixed or adaptive) in-reward coefficient
    kl_adaptive: bool = False  # Ziegler et al. adaptive controller on kl_coef
    kl_target: float = 6.0  # adaptive: target mean per-token KL
    kl_horizon: float = 10000.0  # adaptive: horizon in samples
    kl_loss_coef: float = 0.0  # > 0: ADD kl_loss_coef * KL(actor || ref) to the actor loss
    kl_loss_estimator: str = "low_var_kl"  # estimator of the KL loss
    # Losses.
    clip_low: float = 0.2  # ratio lower clip 1 - clip_low
    clip_high: float = 0.2  # ratio upper clip 1 + clip_high
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages, or None
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-{mean,sum,sum-norm}
    loss_norm_len: int = 0  # seq-mean-token-sum-norm: constant length L; 0 = the batch's T
    policy_loss: str = "ppo"  # "ppo" (token-level ratio) | "gspo" (sequence-level ratio)
    # DAPO soft overlong penalty added to the score: 0 up to overlong_max_len - buffer, then
    # linear down to -overlong_penalty_factor at overlong_max_len (response tokens).
    overlong_buffer_len: int = 0  # 0 = off
    overlong_max_len: int = 0  # the response length limit (sampling.max_new_tokens)
    overlong_penalty_factor: float = 1.0  # penalty at overlong_max_len (in reward units)
    # DAPO overlong filtering: rows cut at sampling.max_new_tokens leave every loss term and
    # statistic (like invalid rows) instead of being scored; response/truncated_fraction logs it.
    overlong_filter: bool = False
    # Sampler-trainer mismatch: truncated importance sampling weight min(pi_trainer/pi_sampler,
    # tis_cap) on each token's policy-gradient term (the trainer applies it); 0 = off.
    tis_cap: float = 0.0
    entropy_coef: float = 0.001  # entropy bonus (subtracted from the actor loss)
    value_clip: float | None = 0.5  # value clip range around the old values, or None
    max_grad_norm: float = 1.0  # global-norm clip, actor and critic separately
    # Optimisers (AdamW). Schedule steps count optimiser updates (one per mini-batch).
    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    lr_schedule: str = "constant"  # "constant" | "cosine" (after warmup)
    warmup_steps: int = 0  # linear warmup from 0, in optimiser updates
    total_steps: int = 0  # cosine: optimiser updates until the LR reaches min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    # Update loop.
    ppo_epochs: int = 1  # passes over the rollout batch per PPO step
    mini_batch_size: int = 16  # rows per optimiser update; divides the rollout batch
    # Rows per forward/backward (gradient accumulation) and per slice of the forward-only
    # passes (old / reference log-probs, values); 0 = mini_batch_size.
    micro_batch_size: int = 0
    shuffle: bool = True  # permute rows into mini-batches each epoch (state PRNG)
    max_consecutive_skips: int = 3  # the run manager stops after this many skipped steps
    # True: old log-probs = one actor forward pass before the update (exact); False: the
    # sampler's own log-probs (saves that pass; equal up to numerics when sampler and trainer
    # share dtype and layout, e.g. fp32 on CPU, and exact for one update per rollout).
    recompute_logprobs: bool = True

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"PPOConfig.{field}={getattr(self, field)!r}: expected {expected}")

        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            bad("advantage_estimator", f"one of {ADVANTAGE_ESTIMATORS}")
        for f in ("kl_estimator", "kl_loss_estimator"):
            if getattr(self, f) not in algo.KL_ESTIMATORS:
                bad(f, f"one of {algo.KL_ESTIMATORS}")
        if self.loss_agg not in algo.LOSS_AGGREGATIONS:
            bad("loss_agg", f"one of {algo.LOSS_AGGREGATIONS}")
        if self.policy_loss not in POLICY_LOSSES:
            bad("policy_loss", f"one of {POLICY_LOSSES}")
        if self.loss_norm_len < 0:
            bad("loss_norm_len", ">= 0 (0 = the batch's token width)")
        if self.overlong_buffer_len < 0 or self.overlong_penalty_factor < 0:
            bad("overlong_buffer_len", "overlong_buffer_len and overlong_penalty_factor >= 0")
        if self.overlong_buffer_len and self.overlong_max_len <= self.overlong_buffer_len:
            bad("overlong_max_len", f"> overlong_buffer_len={self.overlong_buffer_len}")
        if self.tis_cap != 0 and self.tis_cap < 1.0:
            bad("tis_cap", "0 (off) or >= 1")
        if self.critic not in CRITICS:
            bad("critic", f"one of {CRITICS}")
        if self.value_loss_coef < 0:
            bad("value_loss_coef", ">= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"one of {LR_SCHEDULES}")
        for f in ("gamma", "lam"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                bad(f, "a value in [0, 1]")
        for f in ("kl_coef", "kl_loss_coef", "entropy_coef", "weight_decay", "min_lr_ratio"):
            if getattr(self, f) < 0:
                bad(f, ">= 0")
        for f in ("clip_low", "clip_high", "max_grad_norm", "actor_lr", "critic_lr"):
            if getattr(self, f) <= 0:
                bad(f, "> 0")
        if self.clip_low >= 1.0:
            bad("clip_low", "< 1 (the ratio's lower bound is 1 - clip_low)")
        if self.dual_clip is not None and self.dual_clip <= 1.0 + self.clip_high:
            bad("dual_clip", f"None or > 1 + clip_high = {1.0 + self.clip_high}")
        if self.value_clip is not None and self.value_clip <= 0:
            bad("value_clip", "None or > 0")
        if self.kl_adaptive and not self.kl_in_reward:
            bad("kl_adaptive", "False unless kl_in_reward (the controller drives kl_coef)")
        if self.kl_target <= 0 or self.kl_horizon <= 0:
            bad("kl_target", "kl_target and kl_horizon > 0")
        for f in ("ppo_epochs", "mini_batch_size", "max_consecutive_skips"):
            if getattr(self, f) < 1:
                bad(f, ">= 1")
        if self.micro_batch_size < 0 or (
            self.micro_batch_size and self.mini_batch_size % self.micro_batch_size
        ):
            bad("micro_batch_size", f"0 or a divisor of mini_batch_size={self.mini_batch_size}")
        if self.warmup_steps < 0:
            bad("warmup_steps", ">= 0")
        if self.lr_schedule == "cosine" and self.total_steps <= self.warmup_steps:
            bad("total_steps", f"> warmup_steps={self.warmup_steps} for a cosine schedule")

    @property
    def use_critic(self) -> bool:
        """GAE needs values (separate or shared critic); GRPO and RLOO do not."""
        return self.advantage_estimator == "gae"

    @property
    def separate_critic(self) -> bool:
        """A separate ValueModel with its own params and optimiser lives in the state."""
        return self.use_critic and self.critic == "separate"

    @property
    def shared_critic(self) -> bool:
        """The value head sits on the actor's trunk (actor is a PolicyValueModel)."""
        return self.use_critic and self.critic == "shared"

    @property
    def use_ref(self) -> bool:
        """Whether a frozen reference policy (and its log-probs) is needed."""
        return (self.kl_in_reward and (self.kl_coef > 0 or self.kl_adaptive)) or (
            self.kl_loss_coef > 0
        )

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.mini_batch_size

    def replace(self, **overrides) -> PPOConfig:
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, d) -> PPOConfig:
        """From a dict / ConfigDict; unknown keys raise (typos must not be silently ignored)."""
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"PPOConfig: unknown fields {unknown}")
        return cls(**d)


@flax.struct.dataclass
class TrainState:
    """Everything a PPO step changes, as one pytree (checkpointed as is).

    step:              int32 []  PPO steps taken (skipped ones included)
    actor_params:      policy params (unboxed Linen tree)
    actor_opt_state:   optax state of `actor_optimizer(cfg)`
    critic_params:     ValueModel params, or None (shared critic, GRPO, RLOO)
    critic_opt_state:  optax state of `critic_optimizer(cfg)`, or None
    ref_params:        frozen reference policy params, or None (no KL term)
    kl_coef:           float32 []  current in-reward KL coefficient
    rng:               uint32 [2]  PRNG key for mini-batch shuffling
    skipped_steps:     int32 []  steps skipped for non-finite loss/gradients/inputs, in total
    consecutive_skips: int32 []  skipped steps since the last good one
    """

    step: jax.Array
    actor_params: Any
    actor_opt_state: Any
    critic_params: Any
    critic_opt_state: Any
    ref_params: Any
    kl_coef: jax.Array
    rng: jax.Array
    skipped_steps: jax.Array
    consecutive_skips: jax.Array


def policy_params(state: TrainState):
    """The actor's full params: with LoRA, the frozen base (`ref_params`) plus the adapters."""
    if lora.is_adapter_tree(state.actor_params):
        return lora.combine(state.ref_params, state.actor_params)
    return state.actor_params


# ----------------------------------------------------------------------------- optimisers
def make_lr_schedule(
    peak_lr, schedule="constant", warmup_steps=0, total_steps=0, min_lr_ratio=0.0
) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then constant or cosine to min_lr_ratio*peak."""
    if schedule == "constant":
        after = optax.constant_schedule(peak_lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(
            peak_lr, max(total_steps - warmup_steps, 1), alpha=min_lr_ratio
        )
    else:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    lr,
    *,
    schedule="constant",
    warmup_steps=0,
    total_steps=0,
    min_lr_ratio=0.0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.01,
    max_grad_norm=1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the scheduled LR (see `current_lr`)."""
    lr_fn = make_lr_schedule(lr, schedule, warmup_steps, total_steps, min_lr_ratio)
    adamw = optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def _optimizer(cfg: PPOConfig, lr: float) -> optax.GradientTransformation:
    return make_optimizer(
        lr,
        schedule=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.total_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        b1=cfg.adam_b1,
        b2=cfg.adam_b2,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
    )


def actor_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    return _optimizer(cfg, cfg.actor_lr)


def critic_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    return _optimizer(cfg, cfg.critic_lr)


def updates_applied(opt_state) -> jax.Array:
    """Optimiser updates applied so far (the schedule's step), from a `make_optimizer` state."""
    return opt_state[1][0].count


def current_lr(cfg: PPOConfig, opt_state, peak_lr: float) -> jax.Array:
    """The learning rate the next update of this optimiser state will use."""
    lr_fn = make_lr_schedule(
        peak_lr, cfg.lr_schedule, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio
    )
    return jnp.asarray(lr_fn(updates_applied(opt_state)), jnp.float32)


# ------------------------------------------------------------------- models of the PPO step
class PolicyValueModel(CausalLM):
    """The causal LM plus a scalar value head on its final hidden states (shared critic).

    Called like `CausalLM` (-> logits, cache), so samplers and reference log-probs use it as is;
    its params are a `CausalLM` tree plus `value_head/{kernel, bias}`.
    """

    def setup(self):
        super().setup()
        self.value_head = ValueHead(self.config)

    def __call__(self, tokens_BxT, positions_BxT, mask_BxT, cache=None):
        logits_BxTxV, _, cache = self.logits_and_values(tokens_BxT, positions_BxT, mask_BxT, cache)
        return logits_BxTxV, cache

    def logits_and_values(self, tokens_BxT, positions_BxT, mask_BxT, cache=None):
        """One trunk pass -> (logits_BxTxV float32, values_BxT float32, cache)."""
        hidden_BxTxD, cache = self.transformer(tokens_BxT, positions_BxT, mask_BxT, cache)
        return self.lm_logits(hidden_BxTxD), self.value_head(hidden_BxTxD), cache


def policy_model(cfg: PPOConfig, model_config) -> nn.Module:
    """The actor module for `cfg`: PolicyValueModel with a shared critic, else CausalLM."""
    return PolicyValueModel(model_config) if cfg.shared_critic else CausalLM(model_config)


def check_models(cfg: PPOConfig, actor_model, critic_model) -> None:
    """Raise a clear error when the models do not fit the critic mode."""
    if cfg.separate_critic and critic_model is None:
        raise ValueError("PPOConfig(advantage_estimator='gae', critic='separate') needs a critic")
    if cfg.shared_critic and not hasattr(actor_model, "logits_and_values"):
        raise ValueError(
            "PPOConfig(critic='shared') needs a PolicyValueModel actor (see policy_model), got "
            f"{type(actor_model).__name__}"
        )


# --------------------------------------------------------------------------- train state
def create_train_state(cfg: PPOConfig, actor_params, critic_params, ref_params, rng) -> TrainState:
    """Assemble a fresh state from params (pure; boxed params give boxed optimiser states).

    LoRA (actor params with adapters, `models/lora.py`): `actor_params` becomes the trainable
    part only (adapters, plus a shared critic's value head), so the optimiser state holds only
    those; `ref_params` becomes the frozen base, which is also the reference policy (one copy).
    """
    if lora.has_adapters(actor_params) and not lora.is_adapter_tree(actor_params):
        actor_params, ref_params = lora.split(actor_params)
    if cfg.separate_critic and critic_params is None:
        raise ValueError(f"advantage_estimator={cfg.advantage_estimator!r} needs critic params")
    if not cfg.separate_critic:
        critic_params = None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        actor_params=actor_params,
        actor_opt_state=actor_optimizer(cfg).init(actor_params),
        critic_params=critic_params,
        critic_opt_state=None
        if critic_params is None
        else critic_optimizer(cfg).init(critic_params),
        ref_params=ref_params if cfg.use_ref or lora.has_adapters(actor_params) else None,
        kl_coef=jnp.asarray(cfg.kl_coef, jnp.float32),
        rng=jnp.asarray(rng, jnp.uint32),
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_skips=jnp.zeros((), jnp.int32),
    )


def _abstract_boxed_state(cfg, actor_model, critic_model):
    actor = sharding.abstract_params(actor_model)
    critic = sharding.abstract_params(critic_model) if cfg.separate_critic else None
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(lambda a, c, r: create_train_state(cfg, a, c, a, r), actor, critic, rng)


def train_state_shardings(
    cfg: PPOConfig, actor_model: nn.Module, critic_model: nn.Module | None, mesh, rules=None
) -> TrainState:
    """A TrainState of NamedShardings: params and optimiser moments per the logical `rules`
    (default TRAIN_RULES), scalars replicated."""
    rules = sharding.TRAIN_RULES if rules is None else rules
    check_models(cfg, actor_model, critic_model)
    return sharding.shardings_for(
        _abstract_boxed_state(cfg, actor_model, critic_model), mesh, rules
    )


@functools.lru_cache(maxsize=16)
def _jitted_init(cfg, actor_model, critic_model, mesh, rules, compiler_options=()):
    """One jitted initialiser per (config, models, mesh, rules): re-initialising is free."""
    shardings = train_state_shardings(cfg, actor_model, critic_model, mesh, rules)
    dummy = jnp.zeros((1, 1), jnp.int32)

    def init(rng, actor_params, critic_params, ref_params):
        k_actor, k_critic, k_state = jax.random.split(rng, 3)
        lora_missing = actor_model.config.lora_rank and not lora.has_adapters(actor_params)
        if (
            actor_params is None
            or (cfg.shared_critic and "value_head" not in actor_params)
            or lora_missing
        ):
            fresh = nn.meta.unbox(actor_model.init(k_actor, dummy, dummy, dummy)["params"])
            # Given LM weights (e.g. HF import) get a fresh value head and fresh LoRA adapters;
            # XLA drops the rest.
            actor_params = fresh if actor_params is None else lora.combine(fresh, actor_params)
        if critic_params is None and cfg.separate_critic:
            critic_params = nn.meta.unbox(
                critic_model.init(k_critic, dummy, dummy, dummy)["params"]
            )
        if ref_params is None and cfg.use_ref and not actor_model.config.lora_rank:
            # A real copy: donating a state whose actor and ref share buffers would fail.
            ref_params = jax.tree.map(jnp.copy, actor_params)
        return create_train_state(cfg, actor_params, critic_params, ref_params, k_state)

    return jax.jit(init, out_shardings=shardings, compiler_options=dict(compiler_options) or None)


def init_train_state(
    cfg: PPOConfig,
    actor_model: nn.Module,
    critic_model: nn.Module | None,
    rng: jax.Array,
    mesh,
    rules=None,
    *,
    actor_params=None,
    critic_params=None,
    ref_params=None,
    compiler_options=None,
) -> TrainState:
    """A TrainState created directly in its shardings (one jitted init, no host copy).

    Params not given are initialised from `rng` (`model.init`); `ref_params` defaults to a copy
    of the initial actor params. Given params (e.g. from a checkpoint or HF import) may live
    anywhere; they are resharded. Models are called as `model(tokens, positions, mask)`.
    """
    rules = sharding.TRAIN_RULES if rules is None else rules
    check_models(cfg, actor_model, critic_model)
    critic_model = critic_model if cfg.separate_critic else None
    options = tuple(sorted((compiler_options or {}).items()))
    init = _jitted_init(cfg, actor_model, critic_model, mesh, rules, options)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    with sharding.mesh_rules(mesh, rules):
        return init(rng, actor_params, critic_params, ref_params)
