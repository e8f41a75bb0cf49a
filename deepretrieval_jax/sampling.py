"""Per-step sampling pieces for the jitted sampler: logit processors and exact stop strings.

Shape legend: B batch rows, V vocabulary, K candidates kept by top-k, M the longest token in
bytes, N stop strings, S the longest stop string in bytes, R = S - 1 bytes of remembered tail.

Logit processors follow `transformers`' order: temperature, then top-k, then top-p (nucleus),
then min-p; a removed token gets logit -inf. Each acts on the distribution its predecessors
left, so top-p's mass is measured after top-k, and min-p's threshold is relative to the
largest probability after temperature.

Stop strings are matched on bytes, not tokens. `TokenBytes` is a table of every token's UTF-8
bytes; the sampler keeps the last R bytes of each row's completion on device and, after every
new token, checks whether any stop string ends inside that token's bytes. The check is exact
with respect to the concatenated bytes of the generated tokens, however the string was split
into tokens (`</answer>` as one token, as `</`+`answer`+`>`, or inside a token such as
`>\\n`). Limits: (1) only bytes generated after the prompt count, so a stop string that starts
in the prompt does not match; (2) special tokens (`<|im_end|>`, ...) contribute no bytes, as in
`decode(skip_special_tokens=True)`; (3) the text compared is the byte concatenation that
byte-level BPE decodes to, the normal case for Qwen2/Qwen2.5 and Llama 3; a tokenizer whose
decoder rewrites text (SentencePiece's leading-space marker) is refused by
`token_bytes_from_tokenizer`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf
_NO_BYTE = -1  # fills the byte tail before any byte is generated; never equals a byte


# ----------------------------------------------------------------------------- logit processors
def apply_temperature(logits_BxV: jax.Array, temperature: float) -> jax.Array:
    """logits / temperature (temperature > 0; 1.0 is the identity)."""
    return logits_BxV if temperature == 1.0 else logits_BxV / temperature


def _sorted_desc(logits_BxV: jax.Array, top_k: int) -> jax.Array:
    """The top_k largest logits (all of them when top_k is 0), in descending order."""
    k = logits_BxV.shape[-1] if top_k <= 0 else min(top_k, logits_BxV.shape[-1])
    return jax.lax.top_k(logits_BxV, k)[0]


def apply_top_k_top_p(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Keep the top_k largest logits, then the smallest prefix with probability mass >= top_p.

    Top-p keeps a token when the mass of the tokens strictly above it is < top_p, so the token
    that crosses top_p is kept (as in transformers and vLLM). The threshold is a logit value, so
    tokens tied with the last kept one are kept too.
    """
    if top_k <= 0 and top_p >= 1.0:
        return logits_BxV
    sorted_BxK = _sorted_desc(logits_BxV, top_k)
    threshold_Bx1 = sorted_BxK[:, -1:]
    if top_p < 1.0:
        probs_BxK = jax.nn.softmax(sorted_BxK, axis=-1)
        mass_above_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
        kept_Bx1 = jnp.sum(mass_above_BxK < top_p, axis=-1, keepdims=True)  # >= 1
        threshold_Bx1 = jnp.take_along_axis(sorted_BxK, kept_Bx1 - 1, axis=-1)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, NEG_INF)


def apply_min_p(logits_BxV: jax.Array, min_p: float) -> jax.Array:
    """Keep tokens whose probability is >= min_p times the largest probability."""
    if min_p <= 0.0:
        return logits_BxV
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); no softmax needed.
    cutoff_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True) + np.log(min_p)
    return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, NEG_INF)


def process_logits(
    logits_BxV: jax.Array, temperature: float, top_k: int, top_p: float, min_p: float
) -> jax.Array:
    """The sampling distribution's logits: temperature, top-k, top-p, min-p, in that order."""
    logits_BxV = apply_temperature(logits_BxV.astype(jnp.float32), temperature)
    logits_BxV = apply_top_k_top_p(logits_BxV, top_k, top_p)
    return apply_min_p(logits_BxV, min_p)


# --------------------------------------------------------------------------- stop strings
@flax.struct.dataclass
class TokenBytes:
    """UTF-8 bytes of every token id, for exact stop-string matching on device.

    bytes_VxM:  int32, the token's bytes left-aligned, padded with -1
    lengths_V:  int32, number of bytes (0 for special tokens and unused ids)
    """

    bytes_VxM: jax.Array
    lengths_V: jax.Array

    @classmethod
    def from_byte_strings(cls, pieces: Sequence[bytes]) -> TokenBytes:
        """From a list indexed by token id (b"" for tokens that decode to nothing)."""
        width = max(1, max((len(p) for p in pieces), default=1))
        table = np.full((len(pieces), width), _NO_BYTE, np.int32)
        for i, piece in enumerate(pieces):
            table[i, : len(piece)] = np.frombuffer(piece, np.uint8)
        lengths = np.array([len(p) for p in pieces], np.int32)
        return cls(bytes_VxM=jnp.asarray(table), lengths_V=jnp.asarray(lengths))


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the alphabet byte-level BPE token strings use."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def token_bytes_from_tokenizer(tokenizer, vocab_size: int | None = None) -> TokenBytes:
    """The byte table of a byte-level BPE tokenizer (Qwen2.5, Llama 3).

    `tokenizer` is a `transformers` tokenizer or anything holding one as `.hf` (our Tokenizer).

    Regular tokens map through the byte-level alphabet; special added tokens map to no bytes;
    other added tokens (e.g. Qwen's `<tool_call>`) to their UTF-8 text. Ids past the tokenizer
    up to `vocab_size` (the model's padded embedding rows) map to no bytes.
    """
    tokenizer = getattr(tokenizer, "hf", tokenizer)
    decoder = _byte_decoder()
    size = max(vocab_size or 0, len(tokenizer))
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in added:
            pieces.append(b"" if added[i].special else added[i].content.encode("utf-8"))
        elif token is None:
            pieces.append(b"")
        else:
            try:
                pieces.append(bytes(decoder[ch] for ch in token))
            except KeyError:
                raise ValueError(
                    f"token_bytes_from_tokenizer: token {i} ({token!r}) is not in the byte-level "
                    "BPE alphabet; only byte-level BPE tokenizers (Qwen2, Llama 3) are supported"
                ) from None
    pieces += [b""] * (size - len(pieces))
    return TokenBytes.from_byte_strings(pieces)


def stop_tables(stop: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Stop strings as right-aligned bytes [N, S] (-2 = wildcard on the left) and a 'real' mask."""
    encoded = [s.encode("utf-8") for s in stop]
    width = max(len(e) for e in encoded)
    table = np.full((len(encoded), width), -2, np.int32)
    for n, e in enumerate(encoded):
        table[n, width - len(e) :] = np.frombuffer(e, np.uint8)
    return table, table >= 0


def init_byte_tail(batch: int, stop: Sequence[str]) -> jax.Array:
    """The empty tail [B, R]: R = longest stop string in bytes - 1 (at least 1)."""
    width = max(len(s.encode("utf-8")) for s in stop)
    return jnp.full((batch, max(1, width - 1)), _NO_BYTE, jnp.int32)


def match_stop_bytes(
    tail_BxR: jax.Array, tokens_B: jax.Array, token_bytes: TokenBytes, stop: Sequence[str]
) -> tuple[jax.Array, jax.Array]:
    """Append each row's new token to its byte tail; report rows where a stop string now ends.

    A stop string matches when it ends inside the new token's bytes (so it is reported exactly
    once, at the token that completes it). Returns (hit_B bool, new tail_BxR).
    """
    stop_NxS, real_NxS = stop_tables(stop)
    S = stop_NxS.shape[1]
    R = tail_BxR.shape[1]
    bytes_BxM = token_bytes.bytes_VxM[tokens_B]
    len_B = token_bytes.lengths_V[tokens_B]
    M = bytes_BxM.shape[1]
    window_BxW = jnp.concatenate([tail_BxR, bytes_BxM], axis=1)  # W = R + M
    # The occurrence ending at window index R + e (e-th byte of the token) spans
    # window[R + e - S + 1 .. R + e]; with R >= S - 1 the start is never negative.
    idx_MxS = (R - S + 1) + np.arange(M)[:, None] + np.arange(S)[None, :]
    windows_BxMxS = window_BxW[:, idx_MxS]
    equal_BxMxNxS = windows_BxMxS[:, :, None, :] == stop_NxS[None, None]
    match_BxMxN = jnp.all(equal_BxMxNxS | ~real_NxS[None, None], axis=-1)
    inside_token_BxM = jnp.arange(M)[None, :] < len_B[:, None]
    hit_B = jnp.any(match_BxMxN & inside_token_BxM[:, :, None], axis=(1, 2))
    # The last R bytes of (tail + token) start at window index len.
    new_tail_BxR = jnp.take_along_axis(window_BxW, len_B[:, None] + jnp.arange(R)[None, :], axis=1)
    return hit_B, new_tail_BxR
