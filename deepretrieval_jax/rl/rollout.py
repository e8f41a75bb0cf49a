"""One rollout: prompts -> sampler -> decoded completions -> reward requests -> RolloutBatch.

Shape legend: B prompts per step (global), n samples per prompt, R = B * n rows, P prompt
bucket, L = max_new_tokens, T = P + L.

Multi-host layout: every process holds the same global prompt batch (the data sampler is
deterministic), the sampler runs on the global batch, and each process decodes and scores only
the rows on its own devices (`local_rows`), so reward work is split across hosts. Rows of a
global batch array live on devices in mesh order, so process p's rows are one contiguous block
and `jax.make_array_from_process_local_data` puts its scores back in the same places.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deepretrieval_jax.rewards.pool import RewardRequest
from deepretrieval_jax.rl.update import RolloutBatch
from deepretrieval_jax.sampler import FinishReason, SampleOutput


@flax.struct.dataclass
class Prompts:
    """A global batch of left-padded prompts (host numpy)."""

    tokens_BxP: np.ndarray  # int32, pad on the left
    mask_BxP: np.ndarray  # int32, 1 on real tokens


def encode_prompts(codec, texts: Sequence[str], length: int) -> Prompts:
    """Left-pads encoded prompts to `length`; an over-long prompt is an error naming it."""
    tokens = np.full((len(texts), length), codec.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        ids = codec.encode(text)
        if len(ids) > length:
            raise ValueError(f"prompt {i} has {len(ids)} tokens > prompt length {length}")
        tokens[i, length - len(ids) :] = ids
        mask[i, length - len(ids) :] = 1
    return Prompts(tokens, mask)


def local_row_range(arr: jax.Array) -> tuple[int, int]:
    """[start, stop) of the rows of a batch-sharded global array this process holds."""
    starts = sorted({s.index[0].start or 0 for s in arr.addressable_shards})
    stops = sorted({s.index[0].stop or arr.shape[0] for s in arr.addressable_shards})
    start, stop = starts[0], stops[-1]
    if sum(b - a for a, b in zip(starts, stops, strict=True)) != stop - start:
        raise ValueError("this process's rows of the batch are not contiguous")
    return start, stop


def local_rows(arr: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, as host numpy, in row order."""
    seen, parts = set(), []
    for s in sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0):
        a = s.index[0].start or 0
        if a not in seen:
            seen.add(a)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts, axis=0)


def decode_completions(
    codec, tokens_RxL: np.ndarray, lengths_R: np.ndarray, reasons_R
) -> list[str]:
    """Completion texts; a final EOS token is not part of the text."""
    texts = []
    for toks, n, reason in zip(tokens_RxL, lengths_R, reasons_R, strict=True):
        n = int(n) - (1 if int(reason) == FinishReason.EOS and n > 0 else 0)
        texts.append(codec.decode(toks[:n]))
    return texts


def finish_completions(spec, texts: Sequence[str], reasons_R, stop: Sequence[str]) -> list[str]:
    """`data.tasks.finish_completion` per row (rows that ended on a stop string are closed)."""
    from deepretrieval_jax.data.tasks import finish_completion

    stop = tuple(stop)
    return [
        finish_completion(spec, t, int(r) == FinishReason.STOP_STRING, stop)
        for t, r in zip(texts, reasons_R, strict=True)
    ]


def reward_requests(spec, examples, completions, row_start: int, n: int, search_opts) -> list:
    """One RewardRequest per local row (row r belongs to prompt r // n)."""
    reqs = []
    for j, completion in enumerate(completions):
        ex = examples[(row_start + j) // n]
        reqs.append(
            RewardRequest(
                task=spec.reward_task,
                completion=completion,
                label=ex.label,
                search_opts={**dict(search_opts), **dict(ex.search_opts)},
                prompt_suffix=spec.assistant_prefix,
            )
        )
    return reqs


def assemble_batch(prompt_tokens_BxP, prompt_mask_BxP, out: SampleOutput, n: int) -> RolloutBatch:
    """The RolloutBatch of a sample (jit-able); scores/valid/ref/values are filled in later.

    Row r = prompt r // n; tokens = [prompt | completion], token-aligned old log-probs from the
    sampler's raw (temperature-1) log-probs; response mask = the generated tokens.
    """
    p_tok = jnp.repeat(prompt_tokens_BxP, n, axis=0)
    p_mask = jnp.repeat(prompt_mask_BxP, n, axis=0).astype(jnp.int32)
    R, P = p_tok.shape
    # Real completion tokens first (a stable per-row compaction; the identity for one turn):
    # a multi-turn buffer has gaps (mask 0), and token t's log-prob is read from position
    # t - 1, which must therefore be the previous real token.
    order = jnp.argsort(~out.mask_BnxL.astype(jnp.bool_), axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order, axis=1)  # noqa: E731
    c_mask = take(out.mask_BnxL.astype(jnp.int32))
    # Multi-turn: the environment's tokens are real (attended, positioned) but not actions, so
    # the response mask (policy, value, KL and entropy terms) holds the generated ones only.
    generated = c_mask if out.generated_BnxL is None else take(out.generated_BnxL.astype(jnp.int32))
    c_tok = take(out.tokens_BnxL)  # gap tokens (mask 0) end up at the right, like padding
    tokens = jnp.concatenate([p_tok, c_tok], axis=1)
    mask = jnp.concatenate([p_mask, c_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    response = jnp.concatenate([jnp.zeros_like(p_mask), generated], axis=1)
    old_logp = jnp.concatenate([jnp.zeros((R, P), jnp.float32), take(out.logprobs_BnxL)], axis=1)
    zeros = jnp.zeros(tokens.shape, jnp.float32)
    return RolloutBatch(
        tokens_BxT=tokens,
        mask_BxT=mask,
        positions_BxT=positions,
        response_mask_BxT=response,
        old_logp_BxT=old_logp,
        ref_logp_BxT=zeros,
        old_values_BxT=zeros,
        scores_B=jnp.zeros((R,), jnp.float32),
        valid_B=jnp.ones((R,), jnp.bool_),
        group_id_B=(jnp.arange(R) // n).astype(jnp.int32),
    )


def result_arrays(results) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32, valid bool) of reward results; invalid rows score 0."""
    scores = np.array([r.reward if r.valid else 0.0 for r in results], np.float32)
    valid = np.array([bool(r.valid) for r in results], np.bool_)
    return scores, valid


def allgather_json(obj):
    """Every process's JSON-able `obj`, in process order (a list of one without multi-host)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    everything = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)]).decode("utf-8"))
        for row, n in zip(everything, sizes.ravel(), strict=True)
    ]


def filter_truncated(valid: np.ndarray, reasons) -> np.ndarray:
    """DAPO's overlong filtering: rows cut at max_new_tokens become invalid (out of the loss)."""
    return np.asarray(valid, np.bool_) & (np.asarray(reasons) != FinishReason.MAX_TOKENS)


def summarize_results(results, lengths, reasons, prefix: str, task: str) -> dict:
    """Host-local summary (JSON-able) for `merge_summaries`."""
    buckets = collections.Counter(r.bucket or "none" for r in results)
    metric_sums = collections.defaultdict(float)
    metric_counts = collections.Counter()
    for r in results:
        for k, v in (r.metrics or {}).items():
            if isinstance(v, (int, float)) and np.isfinite(v):
                metric_sums[k] += float(v)
                metric_counts[k] += 1
    valid = [r for r in results if r.valid]
    return {
        "prefix": prefix,
        "task": task,
        "n": len(results),
        "valid": len(valid),
        "reward_sum": float(sum(r.reward for r in valid)),
        "format_ok": sum(bool(r.format_ok) for r in valid),
        "answer_ok": sum(bool(r.answer_ok) for r in valid),
        "buckets": dict(buckets),
        "metric_sums": dict(metric_sums),
        "metric_counts": dict(metric_counts),
        "length_sum": int(np.sum(lengths)),
        "length_max": int(np.max(lengths)) if len(lengths) else 0,
        "eos": int(np.sum(np.asarray(reasons) == FinishReason.EOS)),
        "max_tokens": int(np.sum(np.asarray(reasons) == FinishReason.MAX_TOKENS)),
    }


def merge_summaries(parts: Sequence[dict]) -> dict[str, float]:
    """Scalar metrics over all processes' summaries (reward mean, bucket ratios, lengths...)."""
    prefix, task = parts[0]["prefix"], parts[0]["task"]
    n = sum(p["n"] for p in parts)
    valid = sum(p["valid"] for p in parts)
    out = {
        f"{prefix}reward/mean": sum(p["reward_sum"] for p in parts) / max(valid, 1),
        f"{prefix}reward/invalid_fraction": (n - valid) / max(n, 1),
        f"{prefix}reward/format_ok": sum(p["format_ok"] for p in parts) / max(valid, 1),
        f"{prefix}reward/answer_ok": sum(p["answer_ok"] for p in parts) / max(valid, 1),
        f"{prefix}response/length_mean": sum(p["length_sum"] for p in parts) / max(n, 1),
        f"{prefix}response/length_max": max(p["length_max"] for p in parts),
        f"{prefix}response/eos_fraction": sum(p["eos"] for p in parts) / max(n, 1),
        f"{prefix}response/truncated_fraction": sum(p["max_tokens"] for p in parts) / max(n, 1),
    }
    out[f"{prefix}reward/task/{task}/mean"] = out[f"{prefix}reward/mean"]
    buckets = collections.Counter()
    sums, counts = collections.Counter(), collections.Counter()
    for p in parts:
        buckets.update(p["buckets"])
        sums.update(p["metric_sums"])
        counts.update(p["metric_counts"])
    for name, count in buckets.items():
        out[f"{prefix}reward/bucket/{task}/{name}"] = count / max(n, 1)
    for name, total in sums.items():
        out[f"{prefix}retrieval/{name}"] = total / max(counts[name], 1)
    return out
