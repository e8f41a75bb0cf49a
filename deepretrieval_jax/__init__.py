"""deepretrieval_jax: train LLMs with reinforcement learning to write search queries.

Layout (each module owns one thing):
  models/    Flax Qwen2/Qwen2.5 and Llama 3.x decoders, value head, KV cache.
  sharding.py  device mesh and logical-axis rules.
  hf_io.py   Hugging Face checkpoint import/export (one name table).
  tokenizer.py, checkpoint.py, sampler.py
  search/    search backends (no JAX): PubMed, ClinicalTrials.gov, BM25, dense, SQL, local service.
  rewards/   task rewards and the asyncio reward pool (no JAX).
  data/      task datasets, converters, TFDS builders, iterators.
  rl/        PPO/GRPO math, rollout, trainer, state.
"""

__version__ = "0.1.0"
