"""Rewrite inputs into search queries with a trained policy, optionally running them.

    python launch/rewrite.py --policy=workdirs/demo/hf --data_dir=$DEEPRETRIEVAL_DATA_DIR \
        --input="Vitamin D lowers the risk of fractures." [--format=json] [--nosearch]
    python launch/rewrite.py --policy=/tmp/demo --model=qwen2.5-3b --task=pubmed \
        --pico_p="adults with asthma" --pico_i="inhaled steroids" --pico_o="exacerbations"
    cat inputs.jsonl | python launch/rewrite.py --policy=... --task=... --input_file=-

--policy is an HF directory or an orbax checkpoint (or a run's workdir; then --model or
--config_json). The policy is prompted as it was trained (its run's task, prompt pieces and
stop strings: deepretrieval_jax/serving/protocol.py); --task defaults to that task. Inputs:
--input, --pico_*, or --input_file (a line per input: text or JSON; "-" = stdin).
--format=json prints one JSON object per input. See docs/serving.md.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from deepretrieval_jax.serving import flags as policy_flags  # noqa: E402

F = flags.FLAGS
policy_flags.define_policy_flags()
flags.DEFINE_string("task", None, "Task name (default: the task the policy was trained on).")
flags.DEFINE_string("data_dir", None, "Local corpora for BM25/SQL tasks (<data_dir>/<corpus>).")
flags.DEFINE_string("input", None, "One input (text; JSON for PICO/SQL).")
flags.DEFINE_string("input_file", None, "File with one input per line; '-' for stdin.")
for _k, _name in zip("pico", ("population", "intervention", "comparison", "outcome"), strict=True):
    flags.DEFINE_string(f"pico_{_k}", None, f"PICO {_name} (publication/trial search).")
flags.DEFINE_bool("search", True, "Run the query against the task's search backend.")
flags.DEFINE_integer("top_k", 10, "Results to print per input.")
flags.DEFINE_enum("fallback", "none", ["none", "original"], "Search with the input if no query.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("batch_size", 8, "Inputs per sampler call.")
flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from deepretrieval_jax import progress, runtime
    from deepretrieval_jax.serving import policy as policy_lib
    from deepretrieval_jax.serving import protocol, rewrite

    progress.quiet_library_logs(not F["verbosity"].present)

    pico = {k.upper(): v for k in "pico" if (v := getattr(F, f"pico_{k}")) is not None}
    try:
        items = rewrite.gather_inputs(F.input, F.input_file, pico)
    except rewrite.InputError as e:
        raise app.UsageError(str(e)) from None
    with runtime.user_errors():
        spec, stop = protocol.resolve(F.task, protocol.find(F.policy))
        policy = policy_flags.load_policy_from_flags(max_batch=F.batch_size)
    settings = policy_lib.GenSettings(temperature=F.temperature, top_p=F.top_p)
    records = rewrite.run(
        policy, spec, items, settings, F.max_new_tokens, F.data_dir, F.search,
        top_k=F.top_k, fallback=F.fallback, stop=stop,
    )  # fmt: skip
    for rec in records:
        print(json.dumps(rec) if F.format == "json" else rewrite.format_text(rec), flush=True)


if __name__ == "__main__":
    app.run(main)
