"""The multi-turn decode loop on a tiny CausalLM with scripted turns: an insertion onto the KV
cache is exact (log-probs of later generated tokens = a full forward pass over the concatenated
sequence), inserted tokens are masked out of every loss term, and only the block is prefilled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from deepretrieval_jax import sampler as S
from deepretrieval_jax.agent.decode import inject
from deepretrieval_jax.models import CausalLM, ModelConfig, ValueModel
from deepretrieval_jax.rl import losses, rollout
from deepretrieval_jax.rl.batch import aligned_logp_entropy, loss_mask
from deepretrieval_jax.rl.state import PPOConfig

I, L = 5, 24  # noqa: E741 (inserted block width, token buffer)


def _scripted():
    """Prompts -> 4 decode steps -> row 0 waits and gets 3 tokens, row 1 keeps decoding (its
    pending token moves), row 2 has finished -> decode to the buffer's end."""
    config = ModelConfig.tiny(dtype="float32", remat=False)
    params = tiny_models.random_params(CausalLM(config), config, seed=0)
    base = S.causal_lm_fns(config)
    widths = []  # token widths of every model call (traced)

    def apply(*args):
        widths.append(args[1].shape[1])
        return base.apply(*args)

    fns = dataclasses.replace(base, apply=apply)
    cfg = S.SamplingConfig(max_new_tokens=L, n=1, eos_ids=(10**6,), pad_id=0)
    kw = dict(model_fns=fns, config=cfg)
    tokens, mask = np.zeros((3, 6), np.int32), np.zeros((3, 6), np.int32)
    rng = np.random.default_rng(0)
    for r, n in enumerate((6, 4, 5)):
        tokens[r, 6 - n :], mask[r, 6 - n :] = rng.integers(1, 256, n), 1
    state = jax.jit(S.prefill, static_argnames=("model_fns", "config"))(
        params, tokens, mask, jax.random.key(1), **kw
    )
    decode = jax.jit(S.decode, static_argnames=("model_fns", "config"))
    state = decode(params, state, limit=4, **kw)
    state = state.replace(
        waiting_Bn=jnp.array([True, False, False]), done_Bn=jnp.array([True, False, True])
    )
    info = np.zeros((3, I), np.int32)
    info_mask = np.zeros((3, I), np.int32)
    info[0, I - 3 :], info_mask[0, I - 3 :] = [11, 12, 13], 1
    state = jax.jit(inject, static_argnames=("model_fns", "config"))(
        params, state, info, info_mask, jnp.zeros(3, bool), **kw
    )
    state = decode(params, state, **kw)
    out = S.output(state)
    batch = rollout.assemble_batch(tokens, mask, out, n=1)
    return config, params, out, batch, widths


@pytest.fixture(scope="module")
def scripted():
    return _scripted()


def test_logprobs_after_an_insertion_equal_a_full_forward_pass(scripted):
    config, params, out, batch, _ = scripted
    logits, _ = jax.jit(CausalLM(config).apply)(
        {"params": params}, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT
    )
    full_logp, _ = aligned_logp_entropy(logits, batch.tokens_BxT, with_entropy=False)
    gen = np.asarray(batch.response_mask_BxT, bool)
    np.testing.assert_allclose(
        np.asarray(batch.old_logp_BxT)[gen], np.asarray(full_logp)[gen], atol=1e-5, rtol=0
    )
    # Row 0: 4 tokens, then the 3 inserted ones (real, not generated), then more generation.
    row0 = np.asarray(out.tokens_BnxL)[0][np.asarray(out.mask_BnxL)[0]]
    assert list(row0[4:7]) == [11, 12, 13]
    assert not np.asarray(out.generated_BnxL)[0][np.asarray(out.mask_BnxL)[0]][4:7].any()
    lengths = np.asarray(out.lengths_Bn)
    assert lengths[0] == lengths[1] == L - I and lengths[2] == 4  # row 2 stopped decoding
    assert np.asarray(out.mask_BnxL).sum(1).tolist() == [L - I + 3, L - I, 4]


def test_only_the_inserted_block_is_prefilled(scripted):
    *_, widths = scripted
    assert widths[0] == 6 and set(widths[1:]) == {1, I + 1}  # prompt, decode steps, the block


def test_inserted_tokens_get_no_gradient_in_any_loss_term(scripted):
    config, params, _, batch, _ = scripted
    cfg = PPOConfig(entropy_coef=0.1, kl_loss_coef=0.1, value_clip=1e6)  # no clipped branch
    m = loss_mask(batch)
    rng = np.random.default_rng(0)
    adv = jnp.where(m, jnp.asarray(rng.normal(size=m.shape), jnp.float32), 0.0)
    mb = losses.MiniBatch(
        tokens_BxT=batch.tokens_BxT, mask_BxT=batch.mask_BxT, positions_BxT=batch.positions_BxT,
        loss_mask_BxT=m, old_logp_BxT=jnp.where(m, batch.old_logp_BxT, 0.0),
        ref_logp_BxT=jnp.where(m, batch.old_logp_BxT - 0.1, 0.0),
        old_values_BxT=jnp.zeros(m.shape), adv_BxT=adv, returns_BxT=adv,
    )  # fmt: skip
    n_tok, n_rows = jnp.sum(m).astype(jnp.float32), jnp.float32(3)
    logits, _ = CausalLM(config).apply(
        {"params": params}, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT
    )
    g_logits = jax.grad(lambda x: losses._actor_terms(x, mb, cfg, n_tok, n_rows)[0])(logits)
    vparams = tiny_models.random_params(ValueModel(config), config, seed=1)
    values, _ = ValueModel(config).apply(
        {"params": vparams}, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT
    )
    g_values = jax.grad(lambda v: losses._critic_terms(v, mb, cfg, n_tok, n_rows)[0])(values)
    # Position t - 1's logits / value act for token t: their gradient is the token's.
    per_token = np.pad(np.abs(np.asarray(g_logits)).sum(-1)[:, :-1], ((0, 0), (1, 0)))
    per_value = np.pad(np.abs(np.asarray(g_values))[:, :-1], ((0, 0), (1, 0)))
    gen = np.asarray(m)
    inserted = np.asarray(batch.mask_BxT, bool) & ~np.asarray(batch.response_mask_BxT, bool)
    assert inserted.sum() > 6 + 4 + 5 and gen.sum() > 0  # the prompts and the 3 inserted tokens
    assert np.all(per_token[~gen] == 0) and np.all(per_value[~gen] == 0)
    assert np.all(per_token[gen] > 0) and np.all(per_value[gen] > 0)
