"""OpenAI response pieces for `n` choices: text or message, `logprobs`, and streamed chunks.

A completion arrives whole from the batched sampler (one device call decodes every row), so
a streamed response (`stream=true`, server-sent events) sends it as one chunk per token right
after the completion is done: clients that read deltas work unchanged, but the first token
arrives no sooner than without streaming.

Token alignment: the returned text can be shorter than the decoded tokens (a stop string cuts
it). `segments` splits the returned text at token boundaries; a token whose text reaches past
the returned text is left out, and a token that ends inside a multi-byte character is joined
with the next one. The deltas of a stream therefore concatenate to exactly the returned text.

Logprobs are log p(token) under the raw model (temperature 1, no top-p/top-k truncation), one
per returned token. The top alternatives are not computed: completions' `top_logprobs` lists
only the chosen token (as vLLM for `logprobs=0`), chat's is empty (as OpenAI for
`top_logprobs=0`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from deepretrieval_jax.serving.policy import Completion, Policy

_INCOMPLETE = "\ufffd"  # what decoding shows for a token that ends mid-character


@dataclass(frozen=True)
class Segment:
    """A piece of the returned text and the tokens (indices into the completion) behind it."""

    text: str
    tokens: tuple[int, ...]
    offset: int  # character offset of `text` in the returned text


def segments(policy: Policy, completion: Completion, text: str) -> list[Segment]:
    """`text` split at token boundaries (see the module docstring)."""
    ids = completion.token_ids
    out: list[Segment] = []
    pending: list[int] = []
    emitted = 0
    for k in range(len(ids)):
        prefix = policy.decode(ids[: k + 1])
        if len(prefix.rstrip(_INCOMPLETE)) > len(text):
            break  # this token reaches past the returned text (into a stop string)
        pending.append(k)
        if not prefix.endswith(_INCOMPLETE) and len(prefix) > emitted:
            out.append(Segment(text[emitted : len(prefix)], tuple(pending), emitted))
            emitted, pending = len(prefix), []
    if emitted < len(text) or pending:
        out.append(Segment(text[emitted:], tuple(pending), emitted))
    return out


def _token_text(policy: Policy, token_id: int) -> str:
    return policy.decode([token_id])


def _token_bytes(policy: Policy, token_id: int) -> list[int]:
    return list(_token_text(policy, token_id).encode("utf-8", "replace"))


def completion_logprobs(policy: Policy, completion: Completion, segs: Sequence[Segment]) -> dict:
    """The `/v1/completions` logprobs object (tokens, token_logprobs, top_logprobs, offsets)."""
    tokens, logprobs, offsets = [], [], []
    for seg in segs:
        for k in seg.tokens:
            tokens.append(_token_text(policy, completion.token_ids[k]))
            logprobs.append(completion.logprobs[k])
            offsets.append(seg.offset)
    top = [{t: lp} for t, lp in zip(tokens, logprobs, strict=True)]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top,
            "text_offset": offsets}  # fmt: skip


def chat_logprobs(policy: Policy, completion: Completion, segs: Sequence[Segment]) -> dict:
    """The `/v1/chat/completions` logprobs object ({"content": [per-token entries]})."""
    content = []
    for seg in segs:
        for k in seg.tokens:
            token_id = completion.token_ids[k]
            token, lp = _token_text(policy, token_id), completion.logprobs[k]
            content.append({"token": token, "logprob": lp, "bytes": _token_bytes(policy, token_id),
                            "top_logprobs": []})  # fmt: skip
    return {"content": content}


def sse(chunks: Iterator[dict]) -> Iterator[bytes]:
    """Server-sent events: one `data: <json>` event per chunk, then `data: [DONE]`."""
    for chunk in chunks:
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
