"""Shared test setup: 8 fake CPU devices, set before JAX initialises.

Every test runs on CPU. Meshes in tests are built over these 8 host devices.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never reach a hub; transformers/huggingface_hub must not try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2_hf_dir(tmp_path_factory):
    """A tiny random Qwen2 checkpoint saved by transformers (tests/tiny_models.py)."""
    from tiny_models import save_tiny_hf_model

    path = tmp_path_factory.mktemp("tiny_qwen2_hf")
    save_tiny_hf_model(path, family="qwen2", tie=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama_hf_dir(tmp_path_factory):
    """A tiny random Llama-3 checkpoint (llama3 RoPE scaling, tied) saved by transformers."""
    from tiny_models import save_tiny_hf_model

    path = tmp_path_factory.mktemp("tiny_llama_hf")
    save_tiny_hf_model(path, family="llama", tie=True)
    return path
