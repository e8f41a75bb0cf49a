"""Serve a trained policy over HTTP: /v1/rewrite and an OpenAI-compatible subset.

    python launch/serve.py --policy=/tmp/demo/hf --tasks=scifact,pubmed --data_dir=/data \
        [--port=8000] [--max_batch=8] [--max_wait_ms=10] [--max_queue=256]
    curl -s localhost:8000/v1/rewrite -d '{"task": "scifact", "input": "Vitamin D ..."}'

--policy is an HF directory or an orbax checkpoint (then --model or --config_json). Binds to
127.0.0.1 unless --host says otherwise. API and limits: docs/serving.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("policy", None, "HF directory, orbax checkpoint dir or a run's workdir.")
flags.DEFINE_string("model", None, "Model preset (orbax checkpoints), e.g. qwen2.5-3b.")
flags.DEFINE_string("config_json", None, "HF config.json (orbax checkpoints), instead of --model.")
flags.DEFINE_string("tokenizer", None, "qwen2.5 or a tokenizer dir (default: the policy dir's).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("params_key", "actor_params", "Train-state key holding the policy params.")
flags.DEFINE_string("dtype", None, "Compute/storage dtype override, e.g. bfloat16.")
flags.DEFINE_string("name", None, "Model name in the API (default: the policy dir's name).")
flags.DEFINE_list("tasks", [], "Tasks served by /v1/rewrite, e.g. scifact,pubmed.")
flags.DEFINE_string("data_dir", None, "Local corpora for BM25/SQL tasks (<data_dir>/<corpus>).")
flags.DEFINE_bool("search", True, "Run rewritten queries against the tasks' backends.")
flags.DEFINE_string("host", "127.0.0.1", "Bind address (0.0.0.0 exposes the service).")
flags.DEFINE_integer("port", 8000, "Port (0 = any free port).")
flags.DEFINE_integer("max_batch", 8, "Requests per sampler call.")
flags.DEFINE_float("max_wait_ms", 10.0, "How long a request waits for a fuller batch.")
flags.DEFINE_integer("max_queue", 256, "Waiting requests before 503.")
flags.DEFINE_float("timeout_s", 120.0, "Per-request timeout (504).")
flags.DEFINE_integer("max_input_tokens", 2048, "Prompt length limit (tokens).")
flags.DEFINE_integer("max_new_tokens", 512, "Completion length cap (tokens).")
flags.DEFINE_integer("seed", 0, "Sampling seed of the server's random stream.")
flags.DEFINE_list("warmup", [], "Prompt lengths to compile before serving (greedy, rewrite).")
flags.mark_flags_as_required(["policy"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from aiohttp import web

    from deepretrieval_jax import runtime
    from deepretrieval_jax.serving import policy as policy_lib
    from deepretrieval_jax.serving import rewrite, server
    from deepretrieval_jax.serving.scheduler import SchedulerConfig

    runtime.log_devices()
    buckets = tuple(b for b in (64, 128, 256, 512, 1024, 2048, 4096) if b < F.max_input_tokens)
    policy = policy_lib.load_policy(
        F.policy, model=F.model, config_json=F.config_json, tokenizer=F.tokenizer, step=F.step,
        params_key=F.params_key, dtype=F.dtype, max_new_tokens=F.max_new_tokens,
        max_batch=F.max_batch, prompt_buckets=(*buckets, F.max_input_tokens), seed=F.seed,
        **({"name": F.name} if F.name else {}),
    )  # fmt: skip
    greedy = policy_lib.GenSettings()
    rewrite_settings = policy_lib.GenSettings(stop=rewrite.STOP_AFTER_ANSWER)
    policy.warmup([greedy, rewrite_settings], [int(n) for n in F.warmup])
    sched = SchedulerConfig(F.max_batch, F.max_wait_ms, F.max_queue, F.timeout_s)
    config = server.ServerConfig(max_input_tokens=F.max_input_tokens, scheduler=sched)
    service = server.build_service(policy, F.tasks, config, F.data_dir, F.search)
    logging.info("Serving %s (tasks %s) on http://%s:%d", policy.name, F.tasks, F.host, F.port)
    web.run_app(server.make_app(service), host=F.host, port=F.port, print=None)


if __name__ == "__main__":
    app.run(main)
