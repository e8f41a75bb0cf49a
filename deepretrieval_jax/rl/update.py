"""Jitted, sharded PPO / GRPO / RLOO steps over a rollout batch.

The batch, its token alignment and the advantages live in `rl/batch.py`; the per-micro-batch
losses in `rl/losses.py`. Their public names are re-exported here.

Non-finite guard: if any input a loss reads (scores, old/ref log-probs, old values, advantages,
returns) is non-finite on a valid response token, the whole step is skipped before anything
changes. Otherwise each mini-batch whose loss or gradient norm is non-finite is not applied, and
neither is any later mini-batch of the step (earlier ones stay applied: keeping a copy of the
pre-step state would cost a full extra copy of params and optimiser moments). A skipped step
increments `skipped_steps` and `consecutive_skips`; a good step resets the latter.

Public entry points: `ppo_update` (pure; tests call it directly or via `jax.jit`),
`make_jitted(cfg, actor_model, critic_model, mesh)` -> `PPOSteps` with every step jitted with
explicit shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from deepretrieval_jax import sharding
from deepretrieval_jax.models import lora
from deepretrieval_jax.rl import algo, losses
from deepretrieval_jax.rl.batch import (
    PolicyFn,
    RolloutBatch,
    ValueFn,
    aligned_logp_entropy,
    compute_advantages,
    compute_logprobs,
    compute_values,
    inputs_finite,
    logprobs_and_entropy,
    loss_mask,
    model_fns,
    policy_value_fn,
    rollout_batch_shardings,
    shift_right,
)
from deepretrieval_jax.rl.state import (
    PPOConfig,
    TrainState,
    actor_optimizer,
    check_models,
    critic_optimizer,
    current_lr,
    train_state_shardings,
)

__all__ = [
    "PPOSteps",
    "PolicyFn",
    "RolloutBatch",
    "ValueFn",
    "compute_advantages",
    "compute_logprobs",
    "compute_values",
    "logprobs_and_entropy",
    "loss_mask",
    "make_jitted",
    "model_fns",
    "policy_value_fn",
    "ppo_update",
    "rollout_batch_shardings",
]


def _constrain_rows(x, mesh, rules, lead=0):
    """`x` with axis `lead` sharded as the batch rows (act_batch); unchanged without a mesh."""
    if mesh is None:
        return x
    names = (None,) * lead + ("act_batch",) + (None,) * (x.ndim - lead - 1)
    return jax.lax.with_sharding_constraint(
        x, sharding.sharding_for_names(names, x.shape, mesh, rules)
    )


def split_rows(tree, size: int, mesh, rules):
    """Leaves [B, ...] -> [B // size, size, ...]: slice k holds rows k, k + B // size, ..., so
    each slice stays spread over the batch shards (no resharding per slice)."""

    def split(x):
        parts = x.shape[0] // size
        return _constrain_rows(
            jnp.swapaxes(x.reshape((size, parts) + x.shape[1:]), 0, 1), mesh, rules, 1
        )

    return jax.tree.map(split, tree)


def merge_rows(x):
    """The inverse of `split_rows` for one array: [B // size, size, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def forward_slices(rows: int, size: int) -> int:
    """How many slices `forward_in_slices` cuts `rows` rows into (1: one pass, no loop)."""
    return rows // size if 0 < size < rows and rows % size == 0 else 1


def forward_in_slices(fn, batch, size: int, mesh, rules):
    """`fn(batch)` -> [B, T], computed `size` rows at a time in a `lax.map` (one slice's logits
    live at once, not the whole batch's: B x T x V floats is the largest array of a rollout)."""
    if forward_slices(batch.tokens_BxT.shape[0], size) == 1:
        return fn(batch)
    return merge_rows(jax.lax.map(fn, split_rows(batch, size, mesh, rules)))


def _tree_select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def ppo_update(
    state: TrainState,
    batch: RolloutBatch,
    *,
    cfg: PPOConfig,
    policy_fn: PolicyFn,
    value_fn: ValueFn | None = None,
    policy_value_fn: Callable | None = None,
    mesh=None,
    rules=None,
    advantages=None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One PPO step: advantages, then `ppo_epochs` x mini-batches of actor (and critic) updates,
    each accumulating gradients over micro-batches inside a `lax.scan`.

    Separate critic: `value_fn` on `state.critic_params`. Shared critic: `policy_value_fn`
    ((params, ...) -> (logits, values)) on `state.actor_params`, one loss and one optimiser.
    `advantages`: `compute_advantages(batch, cfg, state.kl_coef)`'s output when already computed
    (the trainer times that phase on its own); None computes it here.

    Returns the new state and scalar float32 metrics (means over the mini-batch updates).
    """
    B = batch.tokens_BxT.shape[0]
    M, mu = cfg.mini_batch_size, cfg.micro_batch
    if B % M:
        raise ValueError(f"rollout batch of {B} rows is not a multiple of mini_batch_size={M}")
    if cfg.separate_critic and (value_fn is None or state.critic_params is None):
        raise ValueError("a separate critic needs value_fn and state.critic_params")
    if cfg.shared_critic and policy_value_fn is None:
        raise ValueError("critic='shared' needs policy_value_fn (see update.policy_value_fn)")
    n_mb = B // M
    rules = sharding.TRAIN_RULES if rules is None else rules

    def constrain(x):
        return _constrain_rows(x, mesh, rules)

    if advantages is None:
        advantages = compute_advantages(batch, cfg, state.kl_coef)
    adv_BxT, returns_BxT, _, adv_metrics = advantages
    inputs_ok = inputs_finite(batch, cfg, adv_BxT, returns_BxT)
    mask_BxT = loss_mask(batch)
    data = losses.MiniBatch(
        tokens_BxT=batch.tokens_BxT,
        mask_BxT=batch.mask_BxT,
        positions_BxT=batch.positions_BxT,
        loss_mask_BxT=mask_BxT,
        old_logp_BxT=jnp.where(mask_BxT, batch.old_logp_BxT, 0.0),
        ref_logp_BxT=jnp.where(mask_BxT, batch.ref_logp_BxT, 0.0),
        old_values_BxT=jnp.where(mask_BxT, batch.old_values_BxT, 0.0),
        adv_BxT=jnp.where(mask_BxT, adv_BxT, 0.0),
        returns_BxT=jnp.where(mask_BxT, returns_BxT, 0.0),
    )

    rng, perm_rng = jax.random.split(state.rng)
    if cfg.shuffle:
        keys = jax.random.split(perm_rng, cfg.ppo_epochs)
        order_ExB = jax.vmap(lambda k: jax.random.permutation(k, B))(keys)
    else:
        order_ExB = jnp.tile(jnp.arange(B), (cfg.ppo_epochs, 1))
    order_NxM = order_ExB.reshape(cfg.ppo_epochs * n_mb, M)

    actor_tx = actor_optimizer(cfg)
    critic_tx = critic_optimizer(cfg) if cfg.separate_critic else None
    if cfg.shared_critic:
        actor_loss = functools.partial(losses.shared_loss, cfg=cfg, policy_value_fn=policy_value_fn)
    else:
        actor_loss = functools.partial(losses.actor_loss, cfg=cfg, policy_fn=policy_fn)
    critic_loss = functools.partial(losses.critic_loss, cfg=cfg, value_fn=value_fn)

    def minibatch_step(carry, idx_M):
        actor_p, actor_o, critic_p, critic_o, ok, n_skipped = carry
        mb = jax.tree.map(lambda x: constrain(jnp.take(x, idx_M, axis=0)), data)
        micro = split_rows(mb, mu, mesh, rules)  # micro-batch k: rows k, k + M // mu, ...
        num_tokens = jnp.sum(mb.loss_mask_BxT).astype(jnp.float32)
        num_rows = jnp.sum(jnp.any(mb.loss_mask_BxT, axis=-1)).astype(jnp.float32)
        a_grads, a_metrics = losses.accumulate_grads(
            actor_loss, actor_p, micro, num_tokens, num_rows
        )
        a_norm = optax.tree.norm(a_grads)
        metrics = dict(
            a_metrics, grad_norm_actor=a_norm, lr_actor=current_lr(cfg, actor_o, cfg.actor_lr)
        )
        finite = ok & jnp.isfinite(a_norm) & jnp.isfinite(a_metrics["policy_loss"])
        if cfg.shared_critic:
            finite = finite & jnp.isfinite(a_metrics["value_loss"])
        if cfg.separate_critic:
            c_grads, c_metrics = losses.accumulate_grads(
                critic_loss, critic_p, micro, num_tokens, num_rows
            )
            c_norm = optax.tree.norm(c_grads)
            metrics.update(
                c_metrics,
                grad_norm_critic=c_norm,
                lr_critic=current_lr(cfg, critic_o, cfg.critic_lr),
            )
            finite = finite & jnp.isfinite(c_norm) & jnp.isfinite(c_metrics["value_loss"])
        # A mini-batch without valid response tokens has zero gradients: applying AdamW would
        # still move params (momentum, weight decay), so it is left out (not a skip).
        apply = finite & (num_tokens > 0)
        updates, new_actor_o = actor_tx.update(a_grads, actor_o, actor_p)
        actor_p, actor_o = _tree_select(
            apply, (optax.apply_updates(actor_p, updates), new_actor_o), (actor_p, actor_o)
        )
        if cfg.separate_critic:
            updates, new_critic_o = critic_tx.update(c_grads, critic_o, critic_p)
            critic_p, critic_o = _tree_select(
                apply, (optax.apply_updates(critic_p, updates), new_critic_o), (critic_p, critic_o)
            )
        n_skipped = n_skipped + (~finite).astype(jnp.int32)
        metrics["empty_minibatch"] = (num_tokens == 0).astype(jnp.float32)
        return (actor_p, actor_o, critic_p, critic_o, finite, n_skipped), metrics

    carry = (
        state.actor_params,
        state.actor_opt_state,
        state.critic_params,
        state.critic_opt_state,
        inputs_ok,
        jnp.zeros((), jnp.int32),
    )
    (actor_p, actor_o, critic_p, critic_o, ok, n_skipped), mb_metrics = jax.lax.scan(
        minibatch_step, carry, order_NxM
    )
    skipped = ~ok
    kl_coef = state.kl_coef
    if cfg.kl_adaptive:
        n_valid = jnp.sum(jnp.asarray(batch.valid_B).astype(jnp.float32))
        new_coef = algo.kl_controller_update(
            kl_coef, adv_metrics["kl_ref"], n_valid, cfg.kl_target, cfg.kl_horizon
        )
        kl_coef = jnp.where(skipped, kl_coef, new_coef)
    new_state = state.replace(
        step=state.step + 1,
        actor_params=actor_p,
        actor_opt_state=actor_o,
        critic_params=critic_p,
        critic_opt_state=critic_o,
        kl_coef=kl_coef,
        rng=rng,
        skipped_steps=state.skipped_steps + skipped.astype(jnp.int32),
        consecutive_skips=jnp.where(skipped, state.consecutive_skips + 1, 0),
    )
    metrics = {k: jnp.mean(v) for k, v in mb_metrics.items()}
    metrics["entropy"] = metrics.pop("entropy_tok")
    metrics.update(adv_metrics)
    metrics.update(
        skipped=skipped.astype(jnp.float32),
        inputs_finite=inputs_ok.astype(jnp.float32),
        skipped_minibatches=n_skipped.astype(jnp.float32),
        consecutive_skips=new_state.consecutive_skips.astype(jnp.float32),
        next_kl_coef=kl_coef,
    )
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class PPOSteps:
    """The jitted steps for one (config, models, mesh). Call them anywhere; they trace inside
    the mesh and logical rules.

    update(state, batch, advantages=None) -> (state, metrics)   state donated; `advantages`:
                                                     the output of `advantages` (else computed)
    prepare(state, batch) -> batch                   fills old_logp (actor, recomputed),
                                                     ref_logp and old_values in one call
    logprobs(state, batch) -> logp_BxT               actor (recompute old_logp)
    ref_logprobs(state, batch) -> ref_logp_BxT       frozen reference
    values(state, batch) -> values_BxT               critic (old_values)
    advantages(state, batch) -> (adv, returns, token_rewards, metrics)
    """

    state_shardings: TrainState
    batch_shardings: RolloutBatch
    mesh: Any
    rules: Any
    _update: Callable
    _update_given_adv: Callable
    _prepare: Callable
    _logprobs: Callable
    _ref_logprobs: Callable
    _values: Callable | None
    _advantages: Callable

    def _call(self, fn, *args):
        with sharding.mesh_rules(self.mesh, self.rules):
            return fn(*args)

    def update(self, state, batch, advantages=None):
        if advantages is None:
            return self._call(self._update, state, batch)
        return self._call(self._update_given_adv, state, batch, advantages)

    def prepare(self, state, batch):
        return self._call(self._prepare, state, batch)

    def logprobs(self, state, batch):
        return self._call(self._logprobs, state, batch)

    def ref_logprobs(self, state, batch):
        return self._call(self._ref_logprobs, state, batch)

    def values(self, state, batch):
        if self._values is None:
            raise ValueError("this PPO config has no critic (advantage_estimator != 'gae')")
        return self._call(self._values, state, batch)

    def advantages(self, state, batch):
        return self._call(self._advantages, state, batch)

    def lower(self, name: str, *args):
        """Lower step `name` on abstract args (ShapeDtypeStructs with shardings) without running
        it, for ahead-of-time compilation (`deepretrieval_jax.aot`). "update" is the update
        given advantages (the trainer's call); the others are the methods above."""
        fn = self._update_given_adv if name == "update" else getattr(self, f"_{name}", None)
        if fn is None:
            raise ValueError(f"PPOSteps.lower: no jitted step {name!r} for this config")
        with sharding.mesh_rules(self.mesh, self.rules):
            return fn.lower(*args)


def make_jitted(
    cfg: PPOConfig, actor_model, critic_model, mesh, rules=None, compiler_options=None
) -> PPOSteps:
    """Jit every step once with explicit in/out shardings for `mesh`; `update` donates state.

    `compiler_options` go to XLA (tests use {"xla_backend_optimization_level": 0} to halve CPU
    compile time)."""
    rules = sharding.TRAIN_RULES if rules is None else rules
    check_models(cfg, actor_model, critic_model)
    policy_fn, value_fn = model_fns(actor_model, critic_model if cfg.separate_critic else None)
    pv_fn = policy_value_fn(actor_model) if cfg.shared_critic else None
    state_sh = train_state_shardings(cfg, actor_model, critic_model, mesh, rules)
    batch_sh = rollout_batch_shardings(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    bt = batch_sh.tokens_BxT
    use_lora = bool(actor_model.config.lora_rank)

    def full(state):  # LoRA: the frozen base (ref_params) plus the trained adapters
        return (
            lora.combine(state.ref_params, state.actor_params) if use_lora else state.actor_params
        )

    def update(state, batch, advantages=None):
        pf, pvf = policy_fn, pv_fn
        if use_lora:  # gradients reach the adapters only; the base is a traced constant
            base = state.ref_params
            pf = lambda p, *a: policy_fn(lora.combine(base, p), *a)  # noqa: E731
            if pv_fn is not None:
                pvf = lambda p, *a: pv_fn(lora.combine(base, p), *a)  # noqa: E731
        return ppo_update(
            state, batch, cfg=cfg, policy_fn=pf, value_fn=value_fn, policy_value_fn=pvf,
            mesh=mesh, rules=rules, advantages=advantages,
        )  # fmt: skip

    def jit(fn, out):
        return jax.jit(
            fn,
            in_shardings=(state_sh, batch_sh),
            out_shardings=out,
            compiler_options=compiler_options,
        )

    def sliced(fn):  # the forward-only passes, micro_batch rows at a time (peak memory)
        return lambda state, batch: forward_in_slices(
            functools.partial(fn, state), batch, cfg.micro_batch, mesh, rules
        )

    def ref_logp(state, batch):
        params = state.ref_params if state.ref_params is not None else state.actor_params
        return compute_logprobs(policy_fn, params, batch)  # LoRA: base without adapters

    def critic_params(state):
        return full(state) if cfg.shared_critic else state.critic_params

    def prepare(state, batch):
        """One forward pass per model: old log-probs, reference log-probs, old values."""
        if cfg.shared_critic:
            logits, values = pv_fn(
                full(state), batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT
            )
            return _with_ref(
                state,
                batch.replace(
                    old_logp_BxT=aligned_logp_entropy(logits, batch.tokens_BxT, False)[0],
                    old_values_BxT=shift_right(values.astype(jnp.float32)),
                ),
            )
        batch = batch.replace(old_logp_BxT=compute_logprobs(policy_fn, full(state), batch))
        if state.critic_params is not None:
            batch = batch.replace(
                old_values_BxT=compute_values(value_fn, state.critic_params, batch)
            )
        return _with_ref(state, batch)

    def _with_ref(state, batch):
        if cfg.use_ref and state.ref_params is not None:
            batch = batch.replace(ref_logp_BxT=compute_logprobs(policy_fn, state.ref_params, batch))
        return batch

    adv_sh = (bt, bt, bt, replicated)  # compute_advantages: adv, returns, token rewards, metrics
    return PPOSteps(
        state_shardings=state_sh,
        batch_shardings=batch_sh,
        mesh=mesh,
        rules=rules,
        _update=jax.jit(
            update,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
            compiler_options=compiler_options,
        ),
        _update_given_adv=jax.jit(
            lambda s, b, adv: update(s, b, adv),
            in_shardings=(state_sh, batch_sh, adv_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
            compiler_options=compiler_options,
        ),
        _prepare=jit(prepare, batch_sh),
        _logprobs=jit(sliced(lambda s, b: compute_logprobs(policy_fn, full(s), b)), bt),
        _ref_logprobs=jit(sliced(ref_logp), bt),
        _values=(
            jit(sliced(lambda s, b: compute_values(value_fn, critic_params(s), b)), bt)
            if cfg.use_critic
            else None
        ),
        _advantages=jit(lambda s, b: compute_advantages(b, cfg, s.kl_coef), adv_sh),
    )
