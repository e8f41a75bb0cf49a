"""Model configuration: one frozen dataclass for Qwen2/Qwen2.5 and Llama 3.x decoders.

Presets carry the real dimensions of the published checkpoints (from their `config.json`).
`from_hf_config` / `to_hf_config` convert to and from a Hugging Face config dict; both the
transformers 4.x spelling (`rope_theta`, `rope_scaling`) and the 5.x spelling
(`rope_parameters`) are accepted on input, and the output carries both so either version loads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("qwen2", "llama")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (`rope_type: llama3` in HF configs)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0:
            raise ValueError(f"RopeScaling: factors must be positive, got {self}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"RopeScaling: high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters (HF names in comments)."""

    family: str = "qwen2"  # "qwen2" | "llama"
    vocab_size: int = 151936  # vocab_size
    embed_dim: int = 896  # hidden_size
    mlp_dim: int = 4864  # intermediate_size (SwiGLU hidden width)
    num_layers: int = 24  # num_hidden_layers
    num_heads: int = 14  # num_attention_heads (query heads)
    num_kv_heads: int = 2  # num_key_value_heads (grouped-query attention)
    head_dim: int = 64  # head_dim (hidden_size // num_heads unless set)
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None  # llama3 scaling or None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2 has q/k/v biases, Llama has none
    tie_embeddings: bool = True  # tie_word_embeddings
    max_position_embeddings: int = 32768
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters (fp32 master weights)
    remat: bool = False  # rematerialise each decoder layer in the backward pass
    lora_rank: int = 0  # LoRA adapters of this rank on lora_targets (models/lora.py); 0 = none
    lora_alpha: float = 16.0  # LoRA scale alpha / rank
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # projections

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be positive and even, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"ModelConfig.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}"
                )
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if self.lora_rank < 0 or (self.lora_rank and (bad or not self.lora_targets)):
            raise ValueError(
                f"ModelConfig: lora_rank must be >= 0 and lora_targets a non-empty subset of "
                f"{LORA_TARGETS}, got rank {self.lora_rank}, targets {self.lora_targets}"
            )
        if self.lora_rank and self.lora_alpha <= 0:
            raise ValueError(f"ModelConfig.lora_alpha must be positive, got {self.lora_alpha}")
        if isinstance(self.rope_scaling, dict):  # allow plain dicts from ConfigDicts
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **overrides) -> ModelConfig:
        return dataclasses.replace(self, **overrides)

    # ----------------------------------------------------------------- presets
    @classmethod
    def qwen2_5_0_5b(cls, **overrides) -> ModelConfig:
        return cls(**overrides)

    @classmethod
    def qwen2_5_1_5b(cls, **overrides) -> ModelConfig:
        dims = dict(embed_dim=1536, mlp_dim=8960, num_layers=28, num_heads=12, head_dim=128)
        return cls(**{**dims, **overrides})

    @classmethod
    def qwen2_5_3b(cls, **overrides) -> ModelConfig:
        dims = dict(embed_dim=2048, mlp_dim=11008, num_layers=36, num_heads=16, head_dim=128)
        return cls(**{**dims, **overrides})

    @classmethod
    def qwen2_5_7b(cls, **overrides) -> ModelConfig:
        dims = dict(
            vocab_size=152064,
            embed_dim=3584,
            mlp_dim=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            tie_embeddings=False,
        )
        return cls(**{**dims, **overrides})

    @classmethod
    def llama3_2_1b(cls, **overrides) -> ModelConfig:
        dims = dict(
            family="llama",
            vocab_size=128256,
            embed_dim=2048,
            mlp_dim=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(),
            rms_norm_eps=1e-5,
            qkv_bias=False,
            tie_embeddings=True,
            max_position_embeddings=131072,
        )
        return cls(**{**dims, **overrides})

    @classmethod
    def llama3_2_3b(cls, **overrides) -> ModelConfig:
        dims = dict(embed_dim=3072, num_layers=28, num_heads=24, head_dim=128)
        return cls.llama3_2_1b(**{**dims, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A 2-layer Qwen2-shaped model for tests (GQA 4:2, q/k/v bias, tied head)."""
        dims = dict(
            vocab_size=256,
            embed_dim=64,
            mlp_dim=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            max_position_embeddings=512,
        )
        return cls(**{**dims, **overrides})

    @classmethod
    def tiny_qwen(cls, **overrides) -> ModelConfig:
        """`tiny` over Qwen2.5's full 151,936-id vocabulary: a smoke run of a real config (Qwen2.5
        tokenizer) without a checkpoint."""
        return cls.tiny(**{"vocab_size": 151936, **overrides})

    @classmethod
    def tiny_llama(cls, **overrides) -> ModelConfig:
        """A 2-layer Llama-3-shaped model for tests (no bias, llama3 RoPE scaling, tied head)."""
        dims = dict(
            family="llama",
            qkv_bias=False,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
            rms_norm_eps=1e-5,
        )
        return cls.tiny(**{**dims, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A preset by name: "qwen2.5-3b", "qwen2_5_3b", "llama3.2-1b", "tiny", ..."""
        key = name.lower().replace("-", "_").replace(".", "_")
        if key not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; expected one of {PRESETS}")
        return getattr(cls, key)(**overrides)

    # ------------------------------------------------------------- HF configs
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (Qwen2ForCausalLM / LlamaForCausalLM)."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in FAMILIES:
            raise ValueError(
                f"config.json: model_type {model_type!r} (architectures {archs}) is not supported; "
                f"expected one of {FAMILIES} ({sorted(_ARCHITECTURES.values())})"
            )
        try:
            rope = dict(hf.get("rope_parameters") or {})
            legacy = hf.get("rope_scaling") or {}
            rope = {**legacy, **rope}
            theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type == "llama3":
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            elif rope_type == "default":
                scaling = None
            else:
                raise ValueError(f"config.json: rope_type {rope_type!r} is not supported")
            if hf.get("use_sliding_window"):
                raise ValueError("config.json: use_sliding_window=true is not supported")
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            fields = dict(
                family=model_type,
                vocab_size=int(hf["vocab_size"]),
                embed_dim=hidden,
                mlp_dim=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rope_theta=float(theta),
                rope_scaling=scaling,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qkv_bias=model_type == "qwen2",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            )
        except KeyError as e:
            raise ValueError(f"config.json: missing required key {e.args[0]!r}") from None
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r}, expected 'silu'")
        if model_type == "llama" and (hf.get("mlp_bias") or hf.get("attention_bias")):
            raise ValueError("config.json: Llama mlp_bias/attention_bias=true is not supported")
        return cls(**{**fields, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' Qwen2Config / LlamaConfig accept."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling), **rope}
            rope["rope_type"] = "llama3"
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.mlp_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dict(rope)
        if self.family == "llama":
            if self.qkv_bias:
                raise ValueError(
                    "to_hf_config: HF Llama has no q/k/v-only bias; set qkv_bias=False"
                )
            hf.update(attention_bias=False, mlp_bias=False)
        else:
            if not self.qkv_bias:
                raise ValueError(
                    "to_hf_config: HF Qwen2 always has q/k/v biases; set qkv_bias=True"
                )
            hf.update(use_sliding_window=False)
        return hf


PRESETS = (
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_3b",
    "qwen2_5_7b",
    "llama3_2_1b",
    "llama3_2_3b",
    "tiny",
    "tiny_qwen",
    "tiny_llama",
)
