"""Tests for deepretrieval_jax.sampler and deepretrieval_jax.sampling.

Three kinds of model drive the sampler: a toy callback model whose logits are a fixed table
row of the last token (so greedy chains, EOS and stop strings are known in advance), the
project's CausalLM on tiny random weights (cache consistency, log-probs, sharding), and
transformers' generate on the same weights (greedy parity).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepretrieval_jax import sampling
from deepretrieval_jax.sampler import (
    FinishReason,
    ModelFns,
    Sampler,
    SamplingConfig,
    bucket_length,
    sample,
)
from deepretrieval_jax.sampling import TokenBytes

# ------------------------------------------------------------------------------ toy model
# Token bytes of the toy vocabulary. Greedy decoding walks v -> v + 1 (mod V).
TOY_PIECES = [
    b"q", b"</", b"answer", b">", b"z", b"</answer>\n", b"ok", b"</ans",
    b"wer", b">x", b"", b"t", b"t", b"t", b"t", b"t",
]  # fmt: skip
TOY_V = len(TOY_PIECES)
TOY_EOS = 10  # decodes to nothing, like a special token
TOY_PAD = 0


def toy_table(seed=0, sharp=8.0):
    """Logit table [V, V]: row v favours v + 1 by `sharp` nats over random noise."""
    noise = np.random.default_rng(seed).normal(size=(TOY_V, TOY_V)).astype(np.float32)
    return (
        noise
        + sharp * np.eye(TOY_V, k=1, dtype=np.float32)
        + sharp * np.eye(TOY_V, k=1 - TOY_V, dtype=np.float32)
    )


def toy_fns(with_repeat=True):
    """A 'model' whose logits at each position are table[token]; its cache stores the tokens."""

    def apply(params, tokens_BxT, positions_BxT, mask_BxT, cache):
        written = jax.lax.dynamic_update_slice(cache["tokens"], tokens_BxT, (0, cache["index"]))
        cache = {"tokens": written, "index": cache["index"] + tokens_BxT.shape[1]}
        return params["table"][tokens_BxT], cache

    def init_cache(batch, max_len):
        return {"tokens": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}

    def repeat(cache, n):
        return {"tokens": jnp.repeat(cache["tokens"], n, axis=0), "index": cache["index"]}

    return ModelFns(apply, init_cache, repeat if with_repeat else None)


TOY_FNS = toy_fns()
TOY_BYTES = TokenBytes.from_byte_strings(TOY_PIECES)
TOY_GREEDY = SamplingConfig(
    method="greedy", max_new_tokens=6, eos_ids=(TOY_EOS,), stop=("</answer>",), pad_id=TOY_PAD
)


def left_pad(prompts, pad_id=TOY_PAD):
    T = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    return tokens, mask


def run_toy(prompts, config=TOY_GREEDY, fns=TOY_FNS, rng=None, **kwargs):
    tokens, mask = left_pad(prompts)
    table = {"table": jnp.asarray(toy_table())}
    fn = jax.jit(sample, static_argnames=("model_fns", "config"))
    rng = jax.random.key(0) if rng is None else rng
    out = fn(
        table, tokens, mask, rng, model_fns=fns, config=config, token_bytes=TOY_BYTES, **kwargs
    )
    return jax.tree.map(np.asarray, out)


def test_greedy_stops_on_eos_stop_strings_and_limit():
    # Last prompt token -> greedy continuation (v+1, v+2, ...) and where it must end.
    prompts = [[3, 0], [4], [5, 6], [8], [11], [6, 1, 2], [2]]
    expected = [
        ([1, 2, 3], FinishReason.STOP_STRING),  # "</" "answer" ">"
        ([5], FinishReason.STOP_STRING),  # "</answer>\n" in one token
        ([7, 8, 9], FinishReason.STOP_STRING),  # "</ans" "wer" ">x": ends inside a token
        ([9, 10], FinishReason.EOS),  # ">x" then EOS (kept)
        ([12, 13, 14, 15, 0, 1], FinishReason.MAX_TOKENS),
        ([3, 4, 5], FinishReason.STOP_STRING),  # "</answer" in the prompt does not count
        ([3, 4, 5], FinishReason.STOP_STRING),
    ]
    out = run_toy(prompts)
    for row, (tokens, reason) in enumerate(expected):
        n = len(tokens)
        assert out.tokens_BnxL[row, :n].tolist() == tokens, row
        assert out.finish_reason_Bn[row] == reason, row
        assert out.lengths_Bn[row] == n
        assert out.mask_BnxL[row].tolist() == [True] * n + [False] * (6 - n)
        assert np.all(out.tokens_BnxL[row, n:] == TOY_PAD)
        assert np.all(out.logprobs_BnxL[row, n:] == 0)
    # Raw log-probs are log_softmax(table[previous token])[token].
    logp = jax.nn.log_softmax(toy_table(), axis=-1)
    assert out.logprobs_BnxL[0, 0] == pytest.approx(float(logp[0, 1]), abs=1e-6)
    assert out.logprobs_BnxL[0, 2] == pytest.approx(float(logp[2, 3]), abs=1e-6)
    assert np.all(out.sampling_logprobs_BnxL == 0)  # greedy: a point mass


def test_decode_feeds_each_token_back_at_the_right_slot():
    # The loop must call the model with the token it just sampled: the chain v -> v+1 breaks
    # otherwise. A per-call limit below the buffer length also stops the loop.
    config = dataclasses.replace(TOY_GREEDY, stop=(), eos_ids=(99,))
    out = run_toy([[11]], config, max_new_tokens=4)
    assert out.tokens_BnxL[0].tolist() == [12, 13, 14, 15, TOY_PAD, TOY_PAD]
    assert out.lengths_Bn.tolist() == [4]
    assert out.finish_reason_Bn.tolist() == [FinishReason.MAX_TOKENS]


def test_n_samples_share_prefill_and_differ():
    config = SamplingConfig(
        method="sample", temperature=3.0, max_new_tokens=8, n=4, eos_ids=(TOY_EOS,), pad_id=0
    )
    out = run_toy([[1], [2, 3]], config)
    assert out.tokens_BnxL.shape == (8, 8)
    assert len({tuple(r) for r in out.tokens_BnxL[:4].tolist()}) > 1  # the n samples differ
    # Without repeat_cache the sampler prefills n copies; same key, same rows.
    again = run_toy([[1], [2, 3]], config, fns=toy_fns(with_repeat=False))
    np.testing.assert_array_equal(out.tokens_BnxL, again.tokens_BnxL)
    # Sampling log-probs are those of the temperature-3 distribution.
    logp3 = jax.nn.log_softmax(toy_table() / 3.0, axis=-1)
    assert out.sampling_logprobs_BnxL[0, 0] == pytest.approx(
        float(logp3[1, out.tokens_BnxL[0, 0]]), abs=1e-5
    )


def test_random_sequences_stop_exactly_where_the_bytes_first_contain_the_string():
    """On-device incremental byte matching == Python substring search, for random tokens."""
    stops = ("</answer>", "wer>", "qq")
    rng = np.random.default_rng(1)
    seqs_BxL = rng.choice([0, 1, 2, 3, 6, 7, 8, 9, 10], size=(400, 12))
    tail = sampling.init_byte_tail(400, stops)
    hits = []
    step = jax.jit(sampling.match_stop_bytes, static_argnames="stop")
    for i in range(seqs_BxL.shape[1]):
        hit, tail = step(tail, jnp.asarray(seqs_BxL[:, i]), TOY_BYTES, stop=stops)
        hits.append(np.asarray(hit))
    hits_BxL = np.stack(hits, axis=1)
    for b, seq in enumerate(seqs_BxL):
        text = b""
        for i, tok in enumerate(seq):
            start, text = len(text), text + TOY_PIECES[tok]
            ends_here = any(
                text[:end].endswith(s.encode())
                for s in stops
                for end in range(start + 1, len(text) + 1)
            )
            assert hits_BxL[b, i] == ends_here, (b, i, text)
    assert hits_BxL.any(axis=1).mean() > 0.2  # the sample exercises matches


def test_config_is_hashable_and_validated():
    a = SamplingConfig(eos_ids=[1, 2], stop=["</answer>"])
    assert hash(a) == hash(SamplingConfig(eos_ids=(1, 2), stop=("</answer>",)))
    for bad in (dict(method="beam"), dict(temperature=0.0), dict(top_p=0.0), dict(min_p=1.0)):
        with pytest.raises(ValueError, match="SamplingConfig"):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="token_bytes"):
        Sampler(TOY_FNS, TOY_GREEDY)
    sampler = Sampler(TOY_FNS, TOY_GREEDY, token_bytes=TOY_BYTES)
    params = {"table": jnp.asarray(toy_table())}
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler(params, *left_pad([[1]]), max_new_tokens=TOY_GREEDY.max_new_tokens + 1)
    with pytest.raises(ValueError, match="left-padded"):
        sampler(params, np.array([[1, 2, 0]]), np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="at least one"):
        sampler(params, np.array([[0, 0]]), np.array([[0, 0]]))
    assert sampler.trace_count == 0


def test_trace_count_is_bounded_by_prompt_buckets():
    sampler = Sampler(TOY_FNS, TOY_GREEDY, token_bytes=TOY_BYTES, prompt_buckets=(8, 16))
    params = {"table": jnp.asarray(toy_table())}
    for prompts in ([[1, 2, 3]], [[4, 5, 6, 7, 8]], [[1] * 8], [[2], [3, 4]]):
        out = sampler(params, *left_pad(prompts))
    assert sampler.trace_count == 2  # batch 1 and batch 2, both in bucket 8
    sampler(params, *left_pad([[1, 2, 3]]), max_new_tokens=3)  # per-call limit: no retrace
    assert sampler.trace_count == 2
    out = sampler(params, *left_pad([[5] * 12]))
    assert sampler.trace_count == 3  # bucket 16
    assert out.tokens_BnxL[0, :1].tolist() == [6]
    assert bucket_length(40, (8, 16)) == 48


# --------------------------------------------------------------------- logit processors
PROBS = np.array([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02])
DRAWS = 20_000


def truncated(probs, keep):
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


def reference(config: SamplingConfig, probs=PROBS, top_p_extra=0, min_p_absolute=False):
    """NumPy reference: temperature, top-k, top-p (crossing token kept), min-p.

    top_p_extra=-1 drops the token that crosses top_p, +1 keeps one more; min_p_absolute
    compares p with min_p instead of min_p * p_max: the off-by-one and scale bugs to detect.
    """
    p = probs ** (1.0 / config.temperature)
    p = p / p.sum()
    order = np.argsort(-p)
    if config.top_k:
        p = truncated(p, np.isin(np.arange(len(p)), order[: config.top_k]))
    if config.top_p < 1:
        sorted_p = p[order]
        kept = int(np.sum(np.cumsum(sorted_p) - sorted_p < config.top_p)) + top_p_extra
        p = truncated(p, np.isin(np.arange(len(p)), order[:kept]))
    if config.min_p:
        p = truncated(p, p >= config.min_p * (1.0 if min_p_absolute else p.max()))
    return p


def empirical(config: SamplingConfig, seed=0):
    from deepretrieval_jax.decode_loop import choose as _choose

    logits_BxV = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (DRAWS, 1))
    tokens, raw_lp, samp_lp = jax.jit(_choose, static_argnames="config")(
        logits_BxV, jax.random.key(seed), config
    )
    counts = np.bincount(np.asarray(tokens), minlength=len(PROBS))
    return counts / DRAWS, np.asarray(tokens), np.asarray(raw_lp), np.asarray(samp_lp)


def tv(p, q):
    return 0.5 * np.abs(p - q).sum()


# Each case: the config, and buggy variants (config fields, reference options) that the sampler
# must be distinguishable from. With 20k draws the empirical TV to the truth is ~0.005; every
# buggy variant is >= 0.05 away.
CASES = {
    "temperature": (dict(temperature=0.5), [(dict(temperature=2.0), {}), (dict(), {})]),
    "top_k": (dict(top_k=3), [(dict(top_k=2), {}), (dict(top_k=4), {})]),
    "top_p": (
        dict(top_p=0.6),
        [(dict(top_p=0.6), dict(top_p_extra=-1)), (dict(top_p=0.6), dict(top_p_extra=1))],
    ),
    "min_p": (dict(min_p=0.2), [(dict(min_p=0.2), dict(min_p_absolute=True)), (dict(), {})]),
    "all": (
        dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.1),
        [
            (dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.1), dict(top_p_extra=-1)),
            (dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.1), dict(top_p_extra=1)),
            (dict(top_k=6, top_p=0.8, min_p=0.1), {}),  # temperature ignored
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_distribution_matches_truncated_reference(case):
    fields, wrong_variants = CASES[case]
    config = SamplingConfig(method="sample", **fields)
    want = reference(config)
    got, tokens, raw_lp, samp_lp = empirical(config)
    assert tv(got, want) < 0.02, (got, want)
    assert np.all(got[want == 0] == 0), "sampled a token outside the truncated support"
    for wrong_fields, wrong_options in wrong_variants:
        other = reference(SamplingConfig(method="sample", **wrong_fields), **wrong_options)
        assert tv(got, other) > 0.05, f"{case}: cannot tell {wrong_fields, wrong_options} apart"
    np.testing.assert_allclose(raw_lp, np.log(PROBS[tokens]), atol=1e-5)
    np.testing.assert_allclose(samp_lp, np.log(want[tokens]), atol=1e-5)


def test_greedy_is_argmax_with_zero_sampling_logprob():
    got, tokens, raw_lp, samp_lp = empirical(SamplingConfig(method="greedy"))
    assert np.all(tokens == 0) and np.all(samp_lp == 0)
    np.testing.assert_allclose(raw_lp, np.log(0.30), atol=1e-6)


# --------------------------------------------------------------- token bytes from a tokenizer
@pytest.fixture(scope="module")
def qwen_tokenizer():
    from deepretrieval_jax.tokenizer import Tokenizer

    return Tokenizer.qwen25()  # built once per machine into its default cache


def test_token_bytes_from_qwen_tokenizer_concatenate_to_the_text(qwen_tokenizer):
    table = sampling.token_bytes_from_tokenizer(qwen_tokenizer, vocab_size=151936)
    assert table.bytes_VxM.shape[0] == 151936
    bytes_VxM, len_V = np.asarray(table.bytes_VxM), np.asarray(table.lengths_V)
    text = 'Think: ünïcode 漢字 ok</think>\n<answer>{"query": "a AND b"}</answer>\n  tail'
    ids = qwen_tokenizer.encode(text)
    joined = b"".join(bytes(bytes_VxM[i, : len_V[i]].astype(np.uint8)) for i in ids)
    assert joined == text.encode("utf-8")
    assert len_V[151645] == 0 and len_V[151643] == 0  # <|im_end|>, <|endoftext|>
    assert len_V[151936 - 1] == 0  # padded embedding rows

    # The stop string ends inside the token ">\n" here; byte matching still finds it.
    ids = qwen_tokenizer.encode("x</answer>\nmore")
    tail = sampling.init_byte_tail(1, ("</answer>",))
    hits = []
    for i in ids:
        hit, tail = sampling.match_stop_bytes(tail, jnp.asarray([i]), table, ("</answer>",))
        hits.append(bool(hit[0]))
    pieces = qwen_tokenizer.hf.convert_ids_to_tokens(ids)
    assert hits.index(True) == pieces.index(">Ċ"), pieces  # Ċ: byte-level BPE's newline


# ------------------------------------------------------------------- the project's CausalLM
GEN_LEN = 10
PAD_LENGTHS = (0, 3, 5)  # left padding per row: prompts of 8, 5 and 3 tokens
PROMPT_LEN = 8


def hf_and_jax(hf_dir):
    """The same tiny random weights as a transformers model and as our (config, params)."""
    import transformers

    from deepretrieval_jax import hf_io

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    config, params = hf_io.load_params(hf_dir)
    return torch_model, config, params


def prompt_batch(vocab_size, seed=0):
    from tests.tiny_models import left_padded_batch

    tokens, _, mask = left_padded_batch(PAD_LENGTHS, PROMPT_LEN, vocab_size, seed=seed)
    return tokens, mask


@pytest.fixture(scope="module")
def tiny_lm(tiny_qwen2_hf_dir):
    """Qwen2-shaped; the sampler treats every family alike (Llama is covered by the parity test)."""
    return hf_and_jax(tiny_qwen2_hf_dir)


SHARED_GREEDY = SamplingConfig(method="greedy", max_new_tokens=GEN_LEN, eos_ids=(), pad_id=0, n=2)


@pytest.fixture(scope="module")
def single_device_greedy(tiny_lm):
    """Greedy output on one device for prompt_batch(seed=4), n=2: the reference for variants."""
    from deepretrieval_jax.sampler import causal_lm_fns

    _, config, params = tiny_lm
    tokens, mask = prompt_batch(config.vocab_size, seed=4)
    out = Sampler(causal_lm_fns(config), SHARED_GREEDY, prompt_buckets=(8,))(params, tokens, mask)
    return tokens, mask, jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_equals_transformers_generate(family, request):
    import torch

    from deepretrieval_jax.sampler import causal_lm_fns

    torch_model, config, params = hf_and_jax(request.getfixturevalue(f"tiny_{family}_hf_dir"))
    tokens, mask = prompt_batch(config.vocab_size)
    with torch.no_grad():
        want = torch_model.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=GEN_LEN,
            min_new_tokens=GEN_LEN,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, PROMPT_LEN:].numpy()
    greedy = SamplingConfig(method="greedy", max_new_tokens=GEN_LEN, eos_ids=(), pad_id=0)
    sampler = Sampler(causal_lm_fns(config), greedy, prompt_buckets=(16,))
    out = sampler(params, tokens, mask)
    assert len(set(want[:, 0].tolist())) > 1, "degenerate weights: every row says the same"
    np.testing.assert_array_equal(np.asarray(out.tokens_BnxL), want)
    assert np.all(np.asarray(out.finish_reason_Bn) == FinishReason.MAX_TOKENS)


def full_forward_logprobs(config, params, tokens, mask, out, n):
    """log_softmax of one cache-free forward pass over prompt + completion, at the completion."""
    from deepretrieval_jax.models import CausalLM

    prompt = np.repeat(tokens, n, axis=0)
    prompt_mask = np.repeat(mask, n, axis=0)
    seq = np.concatenate([prompt, np.asarray(out.tokens_BnxL)], axis=1)
    seq_mask = np.concatenate([prompt_mask, np.ones_like(out.tokens_BnxL)], axis=1)
    positions = np.maximum(np.cumsum(seq_mask, axis=1) - 1, 0)
    logits, _ = jax.jit(CausalLM(config).apply)({"params": params}, seq, positions, seq_mask)
    logp = jax.nn.log_softmax(logits[:, PROMPT_LEN - 1 : -1], axis=-1)
    return np.take_along_axis(np.asarray(logp), np.asarray(out.tokens_BnxL)[..., None], -1)[..., 0]


def test_sampled_logprobs_equal_a_full_forward_pass(tiny_lm):
    from deepretrieval_jax.sampler import causal_lm_fns

    _, config, params = tiny_lm
    tokens, mask = prompt_batch(config.vocab_size, seed=1)
    cfg = SamplingConfig(
        temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=GEN_LEN, n=3, eos_ids=(7,), pad_id=0
    )
    out = Sampler(causal_lm_fns(config), cfg, prompt_buckets=(8,))(
        params, tokens, mask, jax.random.key(3)
    )
    want = full_forward_logprobs(config, params, tokens, mask, out, n=3)
    got_mask = np.asarray(out.mask_BnxL)
    np.testing.assert_allclose(np.asarray(out.logprobs_BnxL)[got_mask], want[got_mask], atol=1e-4)
    # The sampling distribution is sharper than the raw one; its log-probs are recorded too.
    samp = np.asarray(out.sampling_logprobs_BnxL)[got_mask]
    assert np.all(samp <= 0) and np.mean(samp) > np.mean(want[got_mask])


def test_cached_decode_logits_equal_full_forward_logits(tiny_lm):
    """The adapter's prefill (last position) + decode steps reproduce a full forward pass."""
    from deepretrieval_jax.models import CausalLM
    from deepretrieval_jax.sampler import causal_lm_fns

    _, config, params = tiny_lm
    tokens, mask = prompt_batch(config.vocab_size, seed=2)
    extra = np.random.default_rng(0).integers(1, config.vocab_size, size=(3, 4)).astype(np.int32)
    seq, seq_mask = (
        np.concatenate([tokens, extra], 1),
        np.concatenate([mask, np.ones_like(extra)], 1),
    )
    positions = np.maximum(np.cumsum(seq_mask, axis=1) - 1, 0)
    full, _ = jax.jit(CausalLM(config).apply)({"params": params}, seq, positions, seq_mask)

    fns = causal_lm_fns(config)
    apply = jax.jit(fns.apply)
    cache = fns.init_cache(3, seq.shape[1])
    got = []
    logits, cache = apply(params, tokens, positions[:, :PROMPT_LEN], mask, cache)
    got.append(logits[:, -1])
    for t in range(PROMPT_LEN, seq.shape[1] - 1):
        logits, cache = apply(
            params, seq[:, t : t + 1], positions[:, t : t + 1], seq_mask[:, t : t + 1], cache
        )
        got.append(logits[:, -1])
    np.testing.assert_allclose(
        np.stack(got, axis=1), np.asarray(full[:, PROMPT_LEN - 1 : -1]), atol=1e-4, rtol=1e-4
    )


def test_sharded_greedy_equals_single_device(tiny_lm, single_device_greedy):
    """2x2x2 mesh, sampler rules (tensor-parallel heads/mlp/vocab, batch over data x fsdp),
    params handed over in the trainer's FSDP shardings."""
    from deepretrieval_jax import sharding
    from deepretrieval_jax.models import CausalLM
    from deepretrieval_jax.sampler import causal_lm_fns

    _, config, params = tiny_lm
    tokens, mask, single = single_device_greedy
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = sharding.SAMPLER_RULES
    trainer_params = jax.device_put(
        params, sharding.param_shardings(CausalLM(config), mesh, sharding.TRAIN_RULES)
    )
    sampler = Sampler(
        causal_lm_fns(config, rules=rules),
        SHARED_GREEDY,
        mesh=mesh,
        param_shardings=sharding.param_shardings(CausalLM(config), mesh, rules),
        batch_axes=("data", "fsdp"),
        prompt_buckets=(8,),
    )
    out = sampler(trainer_params, tokens, mask)
    assert out.tokens_BnxL.shape == (6, GEN_LEN)
    assert len(out.tokens_BnxL.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out.tokens_BnxL), single.tokens_BnxL)
    np.testing.assert_allclose(np.asarray(out.logprobs_BnxL), single.logprobs_BnxL, atol=1e-4)


def test_bf16_cache_is_close_to_fp32(tiny_lm, single_device_greedy):
    from deepretrieval_jax.sampler import causal_lm_fns

    _, config, params = tiny_lm
    tokens, mask, fp32 = single_device_greedy
    fns = causal_lm_fns(config, cache_dtype="bfloat16")
    assert fns.init_cache(1, 4).k.dtype == jnp.bfloat16
    bf16 = Sampler(fns, SHARED_GREEDY, prompt_buckets=(8,))(params, tokens, mask)
    # Same first token everywhere; log-probs within bf16 rounding of the cached keys/values.
    np.testing.assert_array_equal(np.asarray(bf16.tokens_BnxL)[:, 0], fp32.tokens_BnxL[:, 0])
    np.testing.assert_allclose(
        np.asarray(bf16.logprobs_BnxL)[:, 0], fp32.logprobs_BnxL[:, 0], atol=0.05
    )


def test_weights_cast_to_the_compute_dtype_sample_identically(tiny_lm):
    """bf16 compute: the sampler's bf16 copy of fp32 weights (trainer default) gives the same
    tokens and log-probs bit for bit, sharded as in training, and holds bf16 arrays."""
    from deepretrieval_jax import sharding
    from deepretrieval_jax.models import CausalLM
    from deepretrieval_jax.sampler import LeafwiseCast, cast_weights, causal_lm_fns

    _, config, params = tiny_lm
    config = dataclasses.replace(config, dtype="bfloat16")
    tokens, mask = prompt_batch(config.vocab_size, seed=4)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = sharding.SAMPLER_RULES
    trainer_params = jax.device_put(
        params, sharding.param_shardings(CausalLM(config), mesh, sharding.TRAIN_RULES)
    )
    outs = []
    for weights_dtype in (None, "bfloat16"):
        sampler = Sampler(
            causal_lm_fns(config, rules=rules), SHARED_GREEDY, mesh=mesh,
            param_shardings=sharding.param_shardings(CausalLM(config), mesh, rules),
            batch_axes=("data", "fsdp"), prompt_buckets=(8,), weights_dtype=weights_dtype,
        )  # fmt: skip
        outs.append(jax.tree.map(np.asarray, sampler(trainer_params, tokens, mask)))
    np.testing.assert_array_equal(outs[1].tokens_BnxL, outs[0].tokens_BnxL)
    np.testing.assert_array_equal(outs[1].logprobs_BnxL, outs[0].logprobs_BnxL)
    cast = cast_weights(trainer_params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainer_params)} == {jnp.dtype(jnp.float32)}
    # What the sampler hands its program: the same values, leaf by leaf, in its shardings.
    sampler_shardings = sharding.param_shardings(CausalLM(config), mesh, rules)
    copy = LeafwiseCast("bfloat16", sampler_shardings)(trainer_params)
    assert jax.tree.structure(copy) == jax.tree.structure(trainer_params)
    for got, want, sh in zip(jax.tree.leaves(copy), jax.tree.leaves(cast),
                             jax.tree.leaves(sampler_shardings), strict=True):  # fmt: skip
        assert got.dtype == jnp.bfloat16 and got.sharding.is_equivalent_to(sh, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ints = {"ids": jnp.arange(4), "w": jnp.ones(4)}
    assert LeafwiseCast("bfloat16")(ints)["ids"].dtype == ints["ids"].dtype
