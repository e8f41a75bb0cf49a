"""The multi-turn agent in the eval CLI (`deepretrieval_jax.eval`): rollouts through the same
`AgentSampler` as training, searches straight on the task's backend, per-turn statistics.

- `BackendSearch`: the rollout's searches (eval has no reward pool). One `asyncio.run` per
  round trip with the backend opened and closed around it (local BM25 / dense: the agent needs
  a local corpus for its information blocks), at most `concurrency` queries in flight, no
  retries; a `QueryRejected` is shown to the policy as an error message ("rejected"), a
  `BackendError` likewise ("error"). Every result list is kept per query (`results`) for the
  overlap statistic.
- `agent_policy(cfg, ...)`: the three things `eval.evaluate` needs for a config with an
  `agent` section (`eval.run`).
- `AgentGenerate`: an `eval.GenerateFn` (prompts -> transcripts) that keeps each row's turns
  and the run's decode-slot counts; `statistics(transcripts)` turns them into the report's
  per-row `turns` records and `aggregates["agent"]`:
    answered_fraction     rows whose transcript ends in a well-formed answer
    searches_per_answer   searches written per answered row (blank queries included)
    searches_mean         the same over every row
    turns_used            distribution {generation turns: rows}; turns_mean its mean
    result_overlap_mean   `rewards.agent.result_overlap` of a row's searches' shown results,
                          mean over rows with two or more searches that ran (rows_with_overlap)
    idle_fraction         decode-step row slots spent on rows not decoding (batch padding rows
                          included), over every batch
    inserted_tokens_mean  environment tokens inserted per row
"""

from __future__ import annotations

import asyncio
import collections
import statistics as stats_lib
from collections.abc import Mapping, Sequence

import numpy as np

from deepretrieval_jax.agent import protocol
from deepretrieval_jax.rewards.agent import result_overlap
from deepretrieval_jax.search.base import BackendError, QueryRejected


class BackendSearch:
    """queries -> `AgentSampler` outcomes, on a search backend (see the module docstring)."""

    def __init__(self, backend, opts: Mapping, documents: Mapping, concurrency: int = 8):
        self.backend, self.opts, self.documents = backend, dict(opts), documents
        self.concurrency = concurrency
        self.results: dict[str, list[str]] = {}  # query -> ranked ids (searches that ran)

    async def _all(self, queries):
        sem = asyncio.Semaphore(self.concurrency)

        async def one(query):
            async with sem:
                try:
                    ids = [str(i) for i in await self.backend.search(query, **self.opts)]
                except QueryRejected as e:
                    return "rejected", str(e)
                except BackendError as e:
                    return "error", str(e)
            self.results[query] = ids
            return "ok", [(i, *self.documents.get(i, ("", ""))) for i in ids]

        await self.backend.open()
        try:
            return list(await asyncio.gather(*(one(q) for q in queries)))
        finally:
            await self.backend.close()

    def __call__(self, queries: Sequence[str]) -> list[tuple[str, object]]:
        return asyncio.run(self._all(list(queries)))


class AgentGenerate:
    """Transcripts of left-padded prompt batches from an `AgentSampler`; batch i samples with
    `fold_in(key(seed), i)` (as `eval.policy_generate_fn`). Rows accumulate over calls."""

    def __init__(self, sampler, params, codec, search: BackendSearch, *, batch_size: int,
                 seed: int = 0):  # fmt: skip
        import jax

        self.sampler, self.params, self.codec, self.search = sampler, params, codec, search
        self.batch_size, self.key = batch_size, jax.random.key(seed)
        self.turns: list[int] = []
        self.idle_slots = self.slots = self.inserted = self.round_trips = 0.0

    def __call__(self, prompts: list[str]) -> list[str]:
        import jax

        from deepretrieval_jax import progress
        from deepretrieval_jax.agent.decode import decode_transcripts
        from deepretrieval_jax.eval import left_pad

        out: list[str] = []
        bar = progress.bar(len(prompts), "eval: agent rollouts", unit="prompt")
        for i in range(0, len(prompts), self.batch_size):
            tokens, mask = left_pad(self.codec, prompts[i : i + self.batch_size])
            key = jax.random.fold_in(self.key, i // self.batch_size)
            res, st = self.sampler(self.params, tokens, mask, key)
            reasons = np.asarray(res.finish_reason_Bn)
            out += decode_transcripts(self.codec, res, reasons)
            self.turns += [int(t) for t in st.turns_R[: len(tokens)]]
            total = len(st.turns_R)  # the sampler's rows, batch padding included
            self.idle_slots += st.idle_fraction * st.decode_steps * total
            self.slots += st.decode_steps * total
            self.inserted += st.inserted_tokens
            self.round_trips += st.round_trips
            bar.update(len(tokens))
        bar.close()
        return out

    def statistics(self, transcripts: Sequence[str]) -> tuple[list[dict], dict]:
        """(per-row dicts, aggregates) for every row generated so far, in order."""
        suffix = self.sampler.prompt_suffix
        shown = self.sampler.agent.docs_per_search
        rows = []
        for text, turns in zip(transcripts, self.turns, strict=True):
            parsed = protocol.parse_transcript(text, suffix)
            ran = [self.search.results[q] for q in parsed.queries if q in self.search.results]
            rows.append({
                "turns": turns, "searches": len(parsed.queries), "queries": list(parsed.queries),
                "answered": parsed.ok,
                "result_overlap": result_overlap(ran, shown) if len(ran) > 1 else None,
            })  # fmt: skip
        agg = turn_aggregates(rows)
        n = max(len(rows), 1)
        agg["idle_fraction"] = self.idle_slots / max(self.slots, 1)
        agg["inserted_tokens_mean"] = self.inserted / n
        agg["round_trips"] = int(self.round_trips)
        return rows, agg


def turn_aggregates(rows: Sequence[Mapping]) -> dict:
    """The transcript-level statistics of `rows` (dicts with turns, searches, answered,
    result_overlap); means are None where no row qualifies."""

    def mean(xs):
        xs = list(xs)
        return stats_lib.fmean(xs) if xs else None

    answered = [r for r in rows if r["answered"]]
    overlaps = [r["result_overlap"] for r in rows if r["result_overlap"] is not None]
    dist = collections.Counter(int(r["turns"]) for r in rows)
    return {
        "rows": len(rows),
        "answered_fraction": len(answered) / len(rows) if rows else 0.0,
        "searches_per_answer": mean(r["searches"] for r in answered),
        "searches_mean": mean(r["searches"] for r in rows),
        "turns_mean": mean(r["turns"] for r in rows),
        "turns_used": {str(t): dist[t] for t in sorted(dist)},
        "result_overlap_mean": mean(overlaps),
        "rows_with_overlap": len(overlaps),
    }


def summary_line(agg: Mapping) -> str:
    """One printed line of `aggregates["agent"]`."""

    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    turns = ", ".join(f"{t}: {c}" for t, c in agg["turns_used"].items())
    return (
        f"agent: answered {f(agg['answered_fraction'])}, searches per answer "
        f"{f(agg['searches_per_answer'], '.2f')}, turns used {{{turns}}} (mean "
        f"{f(agg['turns_mean'], '.2f')}), result overlap {f(agg['result_overlap_mean'])} "
        f"({agg['rows_with_overlap']} rows), idle decode slots {f(agg.get('idle_fraction'))}"
    )


def agent_policy(cfg, decode, agent, spec, backend, search_opts, data_dir):
    """(generate_fn, tokenizer, agent_stats) of the multi-turn agent (config.agent) for
    `eval.run`: the policy of `eval.policy_params`, rollouts through `AgentSampler`, searches
    on `backend` with the task's and the config's search options."""
    from deepretrieval_jax import sampler as sampler_lib
    from deepretrieval_jax.agent import harness
    from deepretrieval_jax.agent.decode import AgentSampler
    from deepretrieval_jax.eval import policy_params
    from deepretrieval_jax.sampling import token_bytes_from_tokenizer

    model_cfg, tokenizer, params, mesh = policy_params(cfg)
    greedy = decode.temperature == 0
    config = sampler_lib.SamplingConfig(
        method="greedy" if greedy else "sample",
        temperature=1.0 if greedy else decode.temperature,
        top_k=decode.top_k, top_p=decode.top_p, max_new_tokens=decode.max_new_tokens,
        eos_ids=tokenizer.eos_ids, pad_id=int(tokenizer.pad_id), stop=tuple(cfg.sampling.stop),
        tool_stop=(protocol.SEARCH_CLOSE,),
    )  # fmt: skip
    documents = harness.load_documents(spec, data_dir)
    search = BackendSearch(backend, {**spec.search_opts(), **search_opts}, documents,
                           cfg.eval.concurrency)  # fmt: skip
    sampler = AgentSampler(
        sampler_lib.causal_lm_fns(model_cfg), config, agent, codec=tokenizer, search_fn=search,
        prompt_suffix=spec.assistant_prefix, mesh=mesh,
        token_bytes=token_bytes_from_tokenizer(tokenizer, model_cfg.vocab_size),
        prompt_buckets=tuple(cfg.data.prompt_buckets),
    )  # fmt: skip
    generate = AgentGenerate(
        sampler, params, tokenizer, search, batch_size=cfg.eval.batch_size, seed=decode.seed
    )
    return generate, tokenizer, generate.statistics
