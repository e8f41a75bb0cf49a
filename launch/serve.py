"""Serve a trained policy over HTTP: /v1/rewrite and an OpenAI-compatible subset.

    python launch/serve.py --policy=workdirs/demo/hf --data_dir=$DEEPRETRIEVAL_DATA_DIR \
        [--tasks=scifact_no_reason,pubmed] [--port=8000] [--max_batch=8] [--max_wait_ms=10]
    curl -s localhost:8000/v1/rewrite -d '{"task": "scifact_no_reason", "input": "..."}'

--policy is an HF directory or an orbax checkpoint (then --model or --config_json). The task the
policy was trained on is prompted as in training (serving/protocol.py); --tasks defaults to it.
Binds to 127.0.0.1 unless --host says otherwise. API and limits: docs/serving.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from deepretrieval_jax.serving import flags as policy_flags  # noqa: E402

F = flags.FLAGS
policy_flags.define_policy_flags()
flags.DEFINE_string("name", None, "Model name in the API (default: the policy dir's name).")
flags.DEFINE_list("tasks", [], "Tasks served by /v1/rewrite (default: the policy's own).")
flags.DEFINE_string("data_dir", None, "Local corpora for BM25/SQL tasks (<data_dir>/<corpus>).")
flags.DEFINE_bool("search", True, "Run rewritten queries against the tasks' backends.")
flags.DEFINE_string("host", "127.0.0.1", "Bind address (0.0.0.0 exposes the service).")
flags.DEFINE_integer("port", 8000, "Port (0 = any free port).")
flags.DEFINE_integer("max_batch", 8, "Requests per sampler call.")
flags.DEFINE_float("max_wait_ms", 10.0, "How long a request waits for a fuller batch.")
flags.DEFINE_integer("max_queue", 256, "Waiting requests before 503.")
flags.DEFINE_float("timeout_s", 120.0, "Per-request timeout (504).")
flags.DEFINE_integer("seed", 0, "Sampling seed of the server's random stream.")
flags.DEFINE_list("warmup", [], "Prompt lengths to compile before serving (greedy, rewrite).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from aiohttp import web

    from deepretrieval_jax import progress, runtime
    from deepretrieval_jax.serving import policy as policy_lib
    from deepretrieval_jax.serving import protocol, rewrite, server
    from deepretrieval_jax.serving.scheduler import SchedulerConfig

    progress.quiet_library_logs(not F["verbosity"].present)
    runtime.log_devices()
    sched = SchedulerConfig(F.max_batch, F.max_wait_ms, F.max_queue, F.timeout_s)
    config = server.ServerConfig(max_input_tokens=F.max_input_tokens, scheduler=sched)
    with runtime.user_errors():
        policy = policy_flags.load_policy_from_flags(
            max_batch=F.max_batch, seed=F.seed, **({"name": F.name} if F.name else {})
        )
        found = protocol.find(F.policy)
        service = server.build_service(policy, F.tasks, config, F.data_dir, F.search, found)
    settings = [policy_lib.GenSettings()]  # greedy, then each task's rewrite settings
    settings += [
        policy_lib.GenSettings(stop=rewrite.stop_strings(s)) for s in service.stops.values()
    ]
    policy.warmup(list(dict.fromkeys(settings)), [int(n) for n in F.warmup])
    tasks = sorted(service.tasks)
    logging.info("Serving %s (tasks %s) on http://%s:%d", policy.name, tasks, F.host, F.port)
    web.run_app(server.make_app(service), host=F.host, port=F.port, print=None)


if __name__ == "__main__":
    app.run(main)
