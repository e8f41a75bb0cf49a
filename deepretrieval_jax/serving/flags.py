"""absl flags shared by the serving entry points (`launch/rewrite.py`, `launch/serve.py`): which
policy to load and its prompt/completion limits, and `load_policy` from those flags."""

from __future__ import annotations

from absl import flags

# Prompt buckets the sampler compiles for, below --max_input_tokens (which is the last bucket).
PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


def define_policy_flags() -> None:
    """Defines --policy (required), --model, --config_json, --tokenizer, --step, --params_key,
    --dtype, --max_input_tokens and --max_new_tokens on the global absl flags."""
    flags.DEFINE_string("policy", None, "HF directory, orbax checkpoint dir or a run's workdir.")
    flags.DEFINE_string("model", None, "Model preset (orbax checkpoints), e.g. qwen2.5-3b.")
    flags.DEFINE_string(
        "config_json", None, "HF config.json (orbax checkpoints), instead of --model."
    )
    flags.DEFINE_string(
        "tokenizer", None, "qwen2.5 or a tokenizer dir (default: the policy dir's)."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string(
        "params_key", None, "State key holding the params (default: actor_params, else params)."
    )
    flags.DEFINE_string("dtype", None, "Compute/storage dtype override, e.g. bfloat16.")
    flags.DEFINE_integer("max_input_tokens", 2048, "Prompt length limit (tokens).")
    flags.DEFINE_integer("max_new_tokens", 512, "Completion length limit (tokens).")
    flags.mark_flag_as_required("policy")


def prompt_buckets(max_input_tokens: int) -> tuple[int, ...]:
    """`PROMPT_BUCKETS` below `max_input_tokens`, then `max_input_tokens` itself."""
    return (*(b for b in PROMPT_BUCKETS if b < max_input_tokens), max_input_tokens)


def load_policy_from_flags(**policy_kwargs):
    """`policy.load_policy` for the flags of `define_policy_flags` (after absl parsed them).

    `policy_kwargs` are further `Policy` options (max_batch, seed, name).
    """
    from deepretrieval_jax.serving import policy

    f = flags.FLAGS
    return policy.load_policy(
        f.policy, model=f.model, config_json=f.config_json, tokenizer=f.tokenizer, step=f.step,
        params_key=f.params_key, dtype=f.dtype, max_new_tokens=f.max_new_tokens,
        prompt_buckets=prompt_buckets(f.max_input_tokens), **policy_kwargs,
    )  # fmt: skip
