"""The jitted functions of one PPO step (and the SFT step), on abstract inputs, for AOT compiles.

Shape legend: B prompts per step, n samples per prompt, R = B * n rollout rows, P prompt bucket
(the largest of `data.prompt_buckets`), L = `sampling.max_new_tokens`, T = P + L.

Every function is the project's own: the sampler's model callbacks (`sampler.causal_lm_fns`,
the calls `sampler.sample` makes for its prefill and each decode step, with the KV cache of
P + L slots under SAMPLER_RULES), the trainer's jitted PPO steps (`rl.update.make_jitted`:
actor log-probs, reference log-probs, critic values, advantages and the update with its
mini-/micro-batch scans and donated state) and the SFT step (`rl.sft.jit_train_step`). Inputs
are `jax.ShapeDtypeStruct`s carrying the shardings the trainer uses, so nothing is allocated:
`aot.compile_all` lowers and compiles them for any mesh, including one over a TPU topology's
compile-only devices.

`model_flops` is the analytic model FLOP count of one call (2 per parameter per forward token,
6 per trained token; attention score FLOPs excluded), the numerator of the MFU bound.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from deepretrieval_jax import models, sharding
from deepretrieval_jax.config import SFTConfig, to_dataclass
from deepretrieval_jax.rl import policy_init, sft
from deepretrieval_jax.rl.batch import RolloutBatch
from deepretrieval_jax.rl.state import PPOConfig, create_train_state, policy_model
from deepretrieval_jax.rl.update import forward_slices, make_jitted
from deepretrieval_jax.sampler import LeafwiseCast, cast_weights, causal_lm_fns

# Call order within a step (reports list functions in it).
FUNCTION_ORDER = (
    "sampler.reshard", "sampler.prefill", "sampler.decode_step", "ppo.logprobs",
    "ppo.ref_logprobs", "ppo.values", "ppo.advantages", "ppo.update", "sft.train_step",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepFunction:
    """One jitted function with abstract arguments, and how often one PPO step calls it."""

    name: str
    lower: Any  # () -> jax.stages.Lowered (inside the right mesh and logical rules)
    calls_per_step: int  # invocations per PPO step (0: not part of the PPO step, e.g. SFT)
    loop_trips: int  # iterations of the scans XLA's cost analysis counts once
    model_flops: float  # analytic model FLOPs of one call (whole mesh)
    note: str = ""
    same_program_as: str = ""  # a function compiling to the same program (figures reused)
    args_in_state: bool = False  # its arguments are part of the resident train state
    # Programs run one after another in place of `lower`: ((lower, runs), ...) (the sampler's
    # leaf-by-leaf weight copy).
    parts: tuple = ()


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves with the matching NamedShardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _lm_matmul_params(model_cfg: models.ModelConfig, params) -> int:
    """Parameters a token's forward pass multiplies by: all but the embedding lookup table,
    which the tied LM head multiplies by again."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    table = model_cfg.vocab_size * model_cfg.embed_dim
    return total if model_cfg.tie_embeddings else total - table


def sampler_functions(
    model_cfg, mesh, B: int, n: int, P: int, L: int, weights_dtype: str | None
) -> list[StepFunction]:
    """The sampler's copy of the actor made from the trainer's (the reshard from TRAIN_RULES to
    SAMPLER_RULES, cast to `weights_dtype` as the trainer's Sampler does; None: as is), the
    prefill of B prompts into a cache of P + L slots (rows repeated n times after it), and one
    decode step of R = B * n rows reading that cache, on that copy."""
    rules = sharding.SAMPLER_RULES
    lm = models.CausalLM(model_cfg)
    fns = causal_lm_fns(model_cfg, rules=rules)
    boxed = sharding.abstract_params(lm)
    train_params = _abstract(
        nn.meta.unbox(boxed), sharding.shardings_for(boxed, mesh, sharding.TRAIN_RULES)
    )
    sampler_shardings = sharding.shardings_for(boxed, mesh, rules)
    params = jax.eval_shape(functools.partial(cast_weights, dtype=weights_dtype), train_params)
    params = _abstract(params, sampler_shardings)
    n_matmul = _lm_matmul_params(model_cfg, params)
    row_sh = sharding.batch_sharding(mesh, rules, 2)
    R = B * n

    def prefill(params, tokens_BxP, mask_BxP):
        positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
        cache = fns.init_cache(B, P + L)
        logits_Bx1xV, cache = fns.apply(params, tokens_BxP, positions_BxP, mask_BxP, cache)
        logits_BxV = logits_Bx1xV[:, -1].astype(jnp.float32)
        if n > 1:
            cache = fns.repeat_cache(cache, n)
            logits_BxV = jnp.repeat(logits_BxV, n, axis=0)
        return logits_BxV, cache

    def decode(params, cache, last_Rx1, positions_Rx1):
        logits_Rx1xV, cache = fns.apply(
            params, last_Rx1, positions_Rx1, jnp.ones_like(last_Rx1), cache
        )
        return logits_Rx1xV[:, -1].astype(jnp.float32), cache

    with sharding.mesh_rules(mesh, rules):
        cache_abs = jax.eval_shape(lambda: fns.init_cache(R, P + L))
    cache_sh = sharding.cache_shardings(cache_abs, mesh, rules)
    cache = _abstract(cache_abs, cache_sh)
    logits_sh = sharding.batch_sharding(mesh, rules, 2)
    prompt = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=row_sh)
    last = jax.ShapeDtypeStruct((R, 1), jnp.int32, sharding=row_sh)
    # The trainer's Sampler._cast: the FSDP shards of the fp32 master weights gathered into
    # the sampler's layout, in its dtype, one program per leaf (compiled once per distinct leaf).
    leafwise = LeafwiseCast(weights_dtype, sampler_shardings)
    leaves, out_shardings, _ = leafwise.leaves_with_shardings(train_params)
    leaf_runs = collections.Counter(
        (x.shape, x.dtype, x.sharding, out) for x, out in zip(leaves, out_shardings, strict=True)
    )
    prefill_jit = jax.jit(prefill, out_shardings=(logits_sh, cache_sh))
    decode_jit = jax.jit(decode, out_shardings=(logits_sh, cache_sh), donate_argnums=1)

    def lower(fn, *args):
        def go():
            with sharding.mesh_rules(mesh, rules):
                return fn.lower(*args)

        return go

    return [
        StepFunction(
            "sampler.reshard", None, 1, 1, 0.0,
            f"trainer -> sampler weights ({weights_dtype or 'params dtype'}), "
            f"{sum(leaf_runs.values())} leaves; ICI time not modelled", args_in_state=True,
            parts=tuple(
                (lower(leafwise.program(out), jax.ShapeDtypeStruct(shape, dt, sharding=sh)), k)
                for (shape, dt, sh, out), k in leaf_runs.items()
            ),
        ),
        StepFunction(
            "sampler.prefill", lower(prefill_jit, params, prompt, prompt), 1, 1,
            2.0 * n_matmul * B * P, f"B={B} prompts x P={P}, cache {P + L} slots",
        ),
        StepFunction(
            "sampler.decode_step", lower(decode_jit, params, cache, last, last), L, 1,
            2.0 * n_matmul * R, f"R={R} rows, 1 token; x L={L} steps (upper bound)",
        ),
    ]  # fmt: skip


def ppo_functions(cfg, model_cfg, mesh, B: int, n: int, P: int, L: int) -> list[StepFunction]:
    """The trainer's jitted PPO steps (`make_jitted`) at R = B * n rows of T = P + L tokens."""
    ppo = to_dataclass(PPOConfig, cfg.ppo, "ppo")
    actor = policy_model(ppo, model_cfg)
    critic = models.ValueModel(model_cfg) if ppo.separate_critic else None
    steps = make_jitted(ppo, actor, critic, mesh, sharding.TRAIN_RULES)
    R, T = B * n, P + L
    if R % ppo.mini_batch_size:
        raise ValueError(
            f"config.ppo.mini_batch_size={ppo.mini_batch_size} must divide the rollout's "
            f"{R} rows (train.prompts_per_step x sampling.n)"
        )
    actor_abs = sharding.abstract_params(actor)
    critic_abs = sharding.abstract_params(critic) if critic is not None else None
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    boxed_state = jax.eval_shape(
        lambda a, c, r: create_train_state(ppo, a, c, a, r), actor_abs, critic_abs, rng
    )
    state = _abstract(nn.meta.unbox(boxed_state), steps.state_shardings)
    bsh = steps.batch_shardings
    i32, f32 = jnp.int32, jnp.float32
    shapes = RolloutBatch(
        tokens_BxT=((R, T), i32), mask_BxT=((R, T), i32), positions_BxT=((R, T), i32),
        response_mask_BxT=((R, T), i32), old_logp_BxT=((R, T), f32), ref_logp_BxT=((R, T), f32),
        old_values_BxT=((R, T), f32), scores_B=((R,), f32), valid_B=((R,), jnp.bool_),
        group_id_B=((R,), i32),
    )  # fmt: skip
    batch = jax.tree.map(
        lambda sd, s: jax.ShapeDtypeStruct(sd[0], sd[1], sharding=s),
        shapes,
        bsh,
        is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple),
    )
    # The update's `advantages` input: the advantages step's outputs, shardings included.
    adv = jax.tree.map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding),
        steps.lower("advantages", state, batch).out_info,
    )

    n_actor = _lm_matmul_params(model_cfg, nn.meta.unbox(actor_abs))
    n_critic = (
        sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(critic_abs)))
        - model_cfg.vocab_size * model_cfg.embed_dim
        if critic_abs is not None
        else 0
    )
    fwd_tokens = R * T
    n_mini = ppo.ppo_epochs * (R // ppo.mini_batch_size)
    n_micro = ppo.mini_batch_size // ppo.micro_batch
    # The forward-only passes loop over slices of micro_batch rows (update.forward_in_slices).
    slices = forward_slices(R, ppo.micro_batch)
    fns = [StepFunction("ppo.logprobs", lambda: steps.lower("logprobs", state, batch), 1, slices,
                        2.0 * n_actor * fwd_tokens,
                        f"R={R} rows x T={T}, {slices} slices of {R // slices} rows")]  # fmt: skip
    if ppo.use_ref:
        # The reference has the actor's architecture and shardings: the program of
        # ppo.logprobs reading state.ref_params instead (compiled once, figures reused).
        fns.append(
            StepFunction(
                "ppo.ref_logprobs", lambda: steps.lower("ref_logprobs", state, batch), 1,
                slices, 2.0 * n_actor * fwd_tokens, "program of ppo.logprobs", "ppo.logprobs",
            )
        )  # fmt: skip
    if ppo.separate_critic:
        fns.append(StepFunction("ppo.values", lambda: steps.lower("values", state, batch), 1,
                                slices, 2.0 * n_critic * fwd_tokens))  # fmt: skip
    fns.append(StepFunction("ppo.advantages", lambda: steps.lower("advantages", state, batch),
                            1, 1, 0.0))  # fmt: skip
    fns.append(
        StepFunction(
            "ppo.update", lambda: steps.lower("update", state, batch, adv), 1, n_mini * n_micro,
            6.0 * (n_actor + n_critic) * fwd_tokens * ppo.ppo_epochs,
            f"{n_mini} mini-batches x {n_micro} micro-batches of {ppo.micro_batch} rows",
        )
    )  # fmt: skip
    return fns


def sft_function(cfg, model_cfg, mesh) -> StepFunction:
    """`rl.sft`'s jitted train step at `sft.batch_size` sequences of `sft.max_len` tokens."""
    sft_cfg = to_dataclass(SFTConfig, cfg.sft, "sft")
    rules = sharding.TRAIN_RULES
    model = models.CausalLM(model_cfg)
    optimizer = sft.make_optimizer(sft_cfg)
    state_sh = sft.state_shardings(model, optimizer, mesh, rules)
    boxed = sharding.abstract_params(model)
    abstract_state = sft.SFTState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=nn.meta.unbox(boxed),
        opt_state=nn.meta.unbox(jax.eval_shape(optimizer.init, boxed)),
    )
    state = _abstract(abstract_state, state_sh)
    prompt_len = max(cfg.data.prompt_buckets)
    B, T = sft_cfg.batch_size, sft_cfg.max_len
    bt = sharding.batch_sharding(mesh, rules, 2)
    batch = sft.SFTBatch(
        tokens_BxT=jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bt),
        mask_BxT=jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bt),
        loss_mask_BxT=jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=bt),
    )
    step = sft.jit_train_step(model, optimizer, prompt_len, state_sh)

    def lower():
        with sharding.mesh_rules(mesh, rules):
            return step.lower(state, batch)

    n_matmul = _lm_matmul_params(model_cfg, abstract_state.params)
    return StepFunction(
        "sft.train_step", lower, 0, 1, 6.0 * n_matmul * B * T, f"{B} sequences x {T} tokens"
    )


def step_functions(
    cfg, mesh, include_sft: bool = True, sampler_weights_dtype: str | None = "compute"
) -> list[StepFunction]:
    """Every function of one PPO step (in call order), then the SFT step. The sampler's weights
    are in the model's compute dtype ("compute", what the trainer does) or another dtype, or
    None: the params dtype (fp32 master weights; before the trainer cast them)."""
    model_cfg = policy_init.model_config(cfg)
    B, n = cfg.train.prompts_per_step, cfg.sampling.n
    P, L = max(cfg.data.prompt_buckets), cfg.sampling.max_new_tokens
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if B % dp:
        raise ValueError(f"train.prompts_per_step ({B}) must be divisible by data*fsdp ({dp})")
    if sampler_weights_dtype == "compute":
        sampler_weights_dtype = model_cfg.dtype
    fns = sampler_functions(model_cfg, mesh, B, n, P, L, sampler_weights_dtype)
    fns += ppo_functions(cfg, model_cfg, mesh, B, n, P, L)
    if include_sft:
        fns.append(sft_function(cfg, model_cfg, mesh))
    return fns


def train_state_bytes_per_chip(cfg, mesh) -> int:
    """Bytes of the PPO TrainState on the most loaded chip (resident while sampling)."""
    ppo = to_dataclass(PPOConfig, cfg.ppo, "ppo")
    model_cfg = policy_init.model_config(cfg)
    actor = policy_model(ppo, model_cfg)
    critic = models.ValueModel(model_cfg) if ppo.separate_critic else None
    actor_abs = sharding.abstract_params(actor)
    critic_abs = sharding.abstract_params(critic) if critic is not None else None
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    boxed = jax.eval_shape(
        lambda a, c, r: create_train_state(ppo, a, c, a, r), actor_abs, critic_abs, rng
    )
    shardings = sharding.shardings_for(boxed, mesh, sharding.TRAIN_RULES)

    def one(x, s):
        return math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize

    return int(sum(jax.tree.leaves(jax.tree.map(one, nn.meta.unbox(boxed), shardings))))
