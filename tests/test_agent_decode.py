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


# ------------------------------------------------------------------ AgentSampler end to end
# A toy vocabulary for the tiny random model: ids 3..98 are the bytes \n and 32..126, 99..139
# close a search, 140..149 close an answer, 150..255 decode to nothing; 1 and 2 are EOS. A
# random model then closes a search every ~6 tokens: rows wait at different steps.
CHARS = [10, *range(32, 127)]
PIECES = [b""] * 3 + [bytes([c]) for c in CHARS] + [b"</search>"] * 41 + [b"</answer>"] * 10
PIECES += [b""] * (256 - len(PIECES))


class ToyCodec:
    pad_id, eos_ids = 0, (1, 2)

    def encode(self, text):
        return [3 + CHARS.index(b) if b in CHARS else 3 for b in text.encode()]

    def decode(self, ids):
        return b"".join(PIECES[int(i)] for i in ids).decode("utf-8", "replace")


def _agent_setup(n_prompts=4):
    from deepretrieval_jax.sampling import TokenBytes

    config = ModelConfig.tiny(dtype="float32", remat=False)
    params = tiny_models.random_params(CausalLM(config), config, seed=3)
    rng = np.random.default_rng(1)
    tokens, mask = np.zeros((n_prompts, 7), np.int32), np.zeros((n_prompts, 7), np.int32)
    for r in range(n_prompts):
        k = 3 + r % 5
        tokens[r, 7 - k :], mask[r, 7 - k :] = rng.integers(3, 99, k), 1
    return config, params, tokens, mask, TokenBytes.from_byte_strings(PIECES)


def _real(out, r):
    """Row r's real tokens (compacted) and their generated flags / log-probs."""
    m = np.asarray(out.mask_BnxL)[r].astype(bool)
    pick = lambda x: np.asarray(x)[r][m]  # noqa: E731
    return (pick(out.tokens_BnxL), pick(out.generated_BnxL), pick(out.logprobs_BnxL),
            pick(out.sampling_logprobs_BnxL))  # fmt: skip


def test_agent_sampler_with_one_turn_equals_the_plain_sampler():
    """max_turns=1: the same tokens and log-probs as `Sampler` whose `stop` holds the tool stop
    and whose per-turn limit is the agent's. Differences, by design: a row that closes
    `</search>` ends with FinishReason.TOOL_CALL (plain: STOP_STRING), and its last token sits
    one inserted block (I columns) further right in the buffer (the agent's insertion moves
    the pending token even for a row it ends), so rows are compared on their real tokens."""
    from deepretrieval_jax.agent.decode import AgentSampler
    from deepretrieval_jax.agent.protocol import AgentConfig

    config, params, tokens, mask, tb = _agent_setup()
    fns = S.causal_lm_fns(config)
    base = S.SamplingConfig(method="sample", temperature=0.9, max_new_tokens=40, n=2,
                            eos_ids=(1, 2), pad_id=0, stop=("</answer>",))  # fmt: skip
    agent = AgentConfig(max_turns=1, info_max_tokens=8, max_turn_tokens=12)

    def no_search(queries):
        raise AssertionError(f"max_turns=1 must not search, got {queries}")

    sampler = AgentSampler(
        fns, dataclasses.replace(base, tool_stop=("</search>",)), agent, codec=ToyCodec(),
        search_fn=no_search, token_bytes=tb,
    )  # fmt: skip
    plain = S.Sampler(
        fns, dataclasses.replace(base, stop=("</answer>", "</search>"), max_turn_tokens=12),
        token_bytes=tb,
    )  # fmt: skip
    key = jax.random.key(5)
    out, stats = sampler(params, tokens, mask, key)
    ref = plain(params, tokens, mask, key)
    reasons, ref_reasons = np.asarray(out.finish_reason_Bn), np.asarray(ref.finish_reason_Bn)
    F = S.FinishReason
    assert F.TOOL_CALL in reasons and F.MAX_TOKENS in reasons  # both kinds of ending occur
    expected = np.where(ref_reasons == F.STOP_STRING, F.TOOL_CALL, ref_reasons)
    ended_on_answer = [  # a row may also stop on </answer>: STOP_STRING in both
        r for r in range(len(reasons)) if PIECES[int(_real(ref, r)[0][-1])] == b"</answer>"
    ]
    expected[ended_on_answer] = F.STOP_STRING
    np.testing.assert_array_equal(reasons, expected)
    np.testing.assert_array_equal(np.asarray(out.lengths_Bn), np.asarray(ref.lengths_Bn))
    for r in range(len(reasons)):
        tok, gen, lp, slp = _real(out, r)
        rtok, rgen, rlp, rslp = _real(ref, r)
        np.testing.assert_array_equal(tok, rtok)
        assert gen.all() and rgen.all()  # nothing inserted: every real token is generated
        np.testing.assert_allclose(lp, rlp, atol=1e-5, rtol=0)
        np.testing.assert_allclose(slp, rslp, atol=1e-5, rtol=0)
    assert stats.searches_R.sum() == 0 and (stats.turns_R == 1).all()
    assert stats.inserted_tokens == 0


def test_exit_waiting_fraction_below_one_lets_rows_decode_across_an_insertion():
    """exit_waiting_fraction=0.25: the loop leaves as soon as 2 of 8 rows wait, the harness
    searches for them while the other rows' pending tokens move through the insertion, and
    every generated token's log-prob still equals a full forward pass (1e-5)."""
    from deepretrieval_jax.agent.decode import AgentSampler
    from deepretrieval_jax.agent.protocol import AgentConfig

    config, params, tokens, mask, tb = _agent_setup()
    cfg = S.SamplingConfig(method="sample", temperature=1.0, max_new_tokens=136, n=2,
                           eos_ids=(1, 2), pad_id=0, stop=("</answer>",),
                           tool_stop=("</search>",))  # fmt: skip
    calls = []

    def search(queries):
        calls.append(len(queries))
        return [("ok", [("d1", "T", "some text")])] * len(queries)

    def run(fraction):
        agent = AgentConfig(max_turns=3, info_max_tokens=40, max_turn_tokens=16,
                            exit_waiting_fraction=fraction, doc_chars=12)  # fmt: skip
        sampler = AgentSampler(S.causal_lm_fns(config), cfg, agent, codec=ToyCodec(),
                               search_fn=search, token_bytes=tb)  # fmt: skip
        decoding = []  # rows still decoding (not done) when an insertion is made
        resume = sampler._resume

        def spy(params, state, *args):
            decoding.append(int(jnp.sum(~state.done_Bn)))
            return resume(params, state, *args)

        sampler._resume = spy
        calls.clear()
        out, stats = sampler(params, tokens, mask, jax.random.key(2))
        return out, stats, decoding, list(calls)

    out, stats, decoding, calls_early = run(0.25)
    _, stats_all, decoding_all, calls_all = run(1.0)
    assert max(decoding) > 0  # some insertion happened while other rows were decoding
    assert max(decoding_all) == 0  # fraction 1: only when every row waits or has finished
    assert stats.round_trips > stats_all.round_trips and len(calls_early) > len(calls_all)
    assert stats.searches_R.sum() > 0 and stats.inserted_tokens > 0
    batch = rollout.assemble_batch(tokens, mask, out, n=2)
    logits, _ = jax.jit(CausalLM(config).apply)(
        {"params": params}, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT
    )
    full_logp, _ = aligned_logp_entropy(logits, batch.tokens_BxT, with_entropy=False)
    gen = np.asarray(batch.response_mask_BxT, bool)
    inserted = np.asarray(batch.mask_BxT, bool) & ~gen
    assert inserted[:, 7:].sum() == stats.inserted_tokens  # the blocks are real, not actions
    # Some row generated after an insertion (generated tokens follow inserted ones).
    after = [np.any(gen[r, 7:][np.argmax(inserted[r, 7:]) :]) for r in range(len(gen))
             if inserted[r, 7:].any()]  # fmt: skip
    assert any(after)
    np.testing.assert_allclose(
        np.asarray(batch.old_logp_BxT)[gen], np.asarray(full_logp)[gen], atol=1e-5, rtol=0
    )
