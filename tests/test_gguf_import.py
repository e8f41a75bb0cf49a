"""GGUF import: tiny GGUF files written here with `gguf.GGUFWriter` (as llama.cpp's converter
lays them out) are imported, then checked against transformers' own load of the same file.

References: transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, its own
dequantisation and q/k un-permutation) for logits; the `tokenizers` tokenizer the file was made
from, with SmolLM's pre-tokenizer (Digits + ByteLevel), for token ids.
"""

from __future__ import annotations

import json

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from tiny_models import TINY_HF_DIMS, torch_logits

from deepretrieval_jax import hf_io
from deepretrieval_jax.gguf_import import GGUFImportError, import_gguf, packaged_gguf
from deepretrieval_jax.models import CausalLM
from deepretrieval_jax.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "In 2019 and 2020 the trial enrolled 12345 patients; 1200 of them were 20 to 40 years old.",
    "Vitamin D deficiency is associated with fractures in 2021, 2022 and 2023.",
    "The capital of France is Paris. The mitochondria is the powerhouse of the cell.",
] * 20
TEXTS = [
    "In 2019, 12345 patients took 20 mg.",
    "The powerhouse of the cell is Paris!",
    "a1 b22 c333",
]


@pytest.fixture(scope="module")
def raw_tokenizer():
    """A byte-level BPE trained WITHOUT digit splitting, so it has multi-digit merges ("20",
    "Ġ2"): a tokenizer that forgets SmolLM's digit split then encodes numbers differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert any(t.isdigit() and len(t) > 1 for t in tok.get_vocab()), "no multi-digit merges"
    return tok


def _reference_tokenizer(raw, pre_type):
    """The tokenizer llama.cpp applies for `pre_type`: same vocab and merges, its pre-tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers

    ref = Tokenizer.from_str(raw.to_str())
    assert pre_type == "smollm"
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), ref.pre_tokenizer]
    )
    return ref


def _tiny_model(family, tie, vocab_size, seed=0):
    """A tiny transformers model with plain RoPE (GGUF has no llama3 scaling metadata here)."""
    torch.manual_seed(seed)
    dims = {**TINY_HF_DIMS, "vocab_size": vocab_size, "max_position_embeddings": 128}
    cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    config = cls(**dims, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name.endswith("bias") else 0.1
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + scale * torch.randn_like(p))
    return model.eval()


def _llama_cpp_permute(w, heads):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rotate-half -> interleaved rows)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(path, model, raw_tok, *, qtype="F32", pre="smollm", arch=None, skip=(), extra=None):
    """Writes `model` + tokenizer as a GGUF file laid out as llama.cpp's converter does."""
    cfg = model.config
    arch = arch or cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = sorted(raw_tok.get_vocab().items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])  # 3: CONTROL
    merges = json.loads(raw_tok.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers
    )
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        module, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        if name in skip:
            continue
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and module.endswith("q_proj") and suffix == "weight":
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and module.endswith("k_proj") and suffix == "weight":
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        if data.ndim == 1 or qtype == "F32":  # llama.cpp keeps norms and biases in F32
            writer.add_tensor(name, data)
        elif qtype == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _flax_logits(out_dir, tokens):
    config, params = hf_io.load_params(out_dir)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)
    mask = np.ones_like(tokens)
    logits, _ = jax.jit(CausalLM(config).apply)({"params": params}, tokens, positions, mask)
    return config, np.asarray(logits), positions, mask


CASES = [  # (family, tied embeddings, storage type, pre-tokenizer)
    ("llama", False, "F32", "smollm"),
    ("llama", True, "Q8_0", "smollm"),
    ("qwen2", True, "F16", "qwen2"),
    ("qwen2", False, "Q8_0", "qwen2"),
]


@pytest.mark.parametrize("family,tie,qtype,pre", CASES)
def test_import_matches_transformers_gguf_load(tmp_path, raw_tokenizer, family, tie, qtype, pre):
    vocab = raw_tokenizer.get_vocab_size()
    file = write_gguf(
        tmp_path / "m.gguf", _tiny_model(family, tie, vocab), raw_tokenizer, qtype=qtype, pre=pre
    )
    out, config = import_gguf(file, tmp_path / "hf")
    assert (config.family, config.tie_embeddings, config.vocab_size) == (family, tie, vocab)

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    tokens = np.random.default_rng(0).integers(0, vocab, size=(2, 12)).astype(np.int32)
    _, flax, positions, mask = _flax_logits(out, tokens)
    expected = torch_logits(reference, tokens, positions, mask)
    assert np.abs(expected).max() > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(flax, expected, atol=1e-4, rtol=0)

    exported, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    np.testing.assert_allclose(
        torch_logits(exported.eval(), tokens, positions, mask), expected, atol=1e-5
    )
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    ]
    assert hf_config["tie_word_embeddings"] is tie
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == [2, 0]  # the file's eos (<|im_end|>), then <|endoftext|>


def test_tokenizer_keeps_pre_tokenizer_and_chat_template(tmp_path, raw_tokenizer):
    vocab = raw_tokenizer.get_vocab_size()
    for pre in ("smollm", "qwen2"):
        file = write_gguf(
            tmp_path / f"{pre}.gguf", _tiny_model("llama", True, vocab), raw_tokenizer, pre=pre
        )
        out, _ = import_gguf(file, tmp_path / pre)
        tok, auto = Tokenizer.from_dir(out), transformers.AutoTokenizer.from_pretrained(str(out))
        gguf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=file.name)
        for text in TEXTS:
            assert tok.encode(text) == auto.encode(text, add_special_tokens=False)
            if pre == "smollm":  # llama.cpp's smollm split: every digit alone
                assert tok.encode(text) == _reference_tokenizer(raw_tokenizer, pre).encode(text).ids
            if pre == "qwen2" or not any(c.isdigit() for c in text):  # what transformers keeps
                assert tok.encode(text) == gguf_tok.encode(text, add_special_tokens=False)
        digits = [tok.decode([i]) for i in tok.encode("In 2019, 12345")]
        assert digits[-5:] == list("12345") and "2" in digits and "0" in digits
        chat = tok.render_chat([{"role": "user", "content": "hi 42"}])
        assert chat == "<|im_start|>user\nhi 42<|im_end|>\n<|im_start|>assistant\n"
        assert tok.encode(chat)[0] == 1 and 2 in tok.encode(chat)
        assert tok.eos_ids[0] == 2 and set(tok.eos_ids) == {0, 2}


def test_smollm_digit_split_differs_from_plain_byte_level(raw_tokenizer):
    """Guards the tokenizer test above: without the digit split the ids would differ."""
    reference = _reference_tokenizer(raw_tokenizer, "smollm")
    assert any(reference.encode(t).ids != raw_tokenizer.encode(t).ids for t in TEXTS)


def test_errors_name_the_file_and_what_was_expected(tmp_path, raw_tokenizer):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFImportError, match=r"weights\.bin: not a GGUF file"):
        import_gguf(not_gguf, tmp_path / "a")
    with pytest.raises(GGUFImportError, match=r"nothere\.gguf: file does not exist"):
        import_gguf(tmp_path / "nothere.gguf", tmp_path / "a")

    vocab = raw_tokenizer.get_vocab_size()
    model = _tiny_model("llama", True, vocab)
    other = write_gguf(tmp_path / "gpt2.gguf", model, raw_tokenizer, arch="gpt2")
    with pytest.raises(
        GGUFImportError,
        match=r"gpt2\.gguf: general\.architecture is 'gpt2'; expected one of \('llama', 'qwen2'\)",
    ):
        import_gguf(other, tmp_path / "b")
    missing = write_gguf(tmp_path / "cut.gguf", model, raw_tokenizer, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(
        GGUFImportError, match=r"cut\.gguf: tensor 'blk\.1\.ffn_up\.weight' .*missing"
    ):
        import_gguf(missing, tmp_path / "c")
    assert not (tmp_path / "c" / "config.json").exists()
    stray = {"blk.0.extra.weight": np.ones(4, np.float32)}
    surplus = write_gguf(tmp_path / "more.gguf", model, raw_tokenizer, extra=stray)
    with pytest.raises(GGUFImportError, match=r"more\.gguf: 1 tensors do not fit .*blk\.0\.extra"):
        import_gguf(surplus, tmp_path / "d")
    freqs = {"rope_freqs.weight": np.ones(8, np.float32)}  # Llama 3.1+ RoPE scaling
    scaled = write_gguf(tmp_path / "l31.gguf", model, raw_tokenizer, extra=freqs)
    with pytest.raises(GGUFImportError, match=r"l31\.gguf: RoPE frequency scaling"):
        import_gguf(scaled, tmp_path / "e")


def test_packaged_gguf_finds_the_file_without_importing(tmp_path, monkeypatch):
    package = tmp_path / "fake_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('needs a CLI we do not install')\n")
    (package / "Model.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert packaged_gguf("fake_gguf_pkg") == package / "Model.Q4_1.gguf"
    with pytest.raises(GGUFImportError, match="'no_such_pkg_xyz' is not installed"):
        packaged_gguf("no_such_pkg_xyz")
