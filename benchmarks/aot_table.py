"""Ahead-of-time compile figures of one PPO step per (model, TPU topology), as JSON lines.

    python benchmarks/aot_table.py --out=/tmp/aot.jsonl --topologies=v5e-8,v5p-8,v5p-32 \
        --presets=qwen2.5-0.5b,qwen2.5-3b,llama3.2-3b,qwen2.5-7b
    python benchmarks/aot_table.py --out=/tmp/aot.jsonl --markdown   # the docs table
    python benchmarks/aot_table.py --out=/tmp/aot.jsonl --topologies=v5p-8 --presets=qwen2.5-3b \
        --only=sampler.reshard   # compile one function into an earlier record of that row

Each line: the config (configs/pubmed.py with the preset; pubmed_llama.py for Llama), its mesh,
and per function the compiled per-chip bytes and roofline seconds (deepretrieval_jax.aot).
Needs libtpu; each full-depth compile takes minutes on a small CPU host.
"""

import ast
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never claim an accelerator

from absl import app, flags  # noqa: E402

from configs import pubmed, pubmed_llama  # noqa: E402
from deepretrieval_jax import aot, aot_steps  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/aot_table.jsonl", "JSON lines output (appended).")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5e-8", "v5p-8", "v5p-32"], "TPU slices.")
PRESETS = ["qwen2.5-0.5b", "qwen2.5-3b", "llama3.2-3b", "qwen2.5-7b"]  # the table's row order
_PRESETS = flags.DEFINE_list("presets", PRESETS, "Model presets.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table of --out instead.")
_ONLY = flags.DEFINE_list(
    "only",
    [],
    "Compile only these functions (e.g. sampler.reshard) and merge them into the "
    "latest --out record of the same model, slice and overrides.",
)
_SET = flags.DEFINE_list(
    "set", [], "Config overrides key=value (e.g. ppo.micro_batch_size=8,mesh.tensor=2)."
)


def config(preset: str, overrides=()):
    cfg = (pubmed_llama if preset.startswith("llama") else pubmed).get_config()
    cfg.model.preset = preset
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        cfg.update_from_flattened_dict({key: value})
    return cfg


def row_key(line: dict) -> tuple:
    """A table row: model, slice and config overrides (a later compile of it replaces it)."""
    return line["preset"], line["topology"], tuple(line.get("overrides", []))


def markdown(path: str) -> str:
    """The docs table of the JSON lines in `path`: one row per model, slice and overrides (the
    latest compile of each), ordered by model size, then chips."""
    out = [
        "| model | topology (chips) | mesh (data x fsdp x tensor) | overrides | per-chip footprint"
        " / HBM | fits | est. step | MFU bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    latest = {}
    for line in (json.loads(x) for x in open(path, encoding="utf-8") if x.strip()):
        latest[row_key(line)] = line
    rank = {name: i for i, name in enumerate(PRESETS)}
    for key in sorted(
        latest, key=lambda k: (rank.get(k[0], len(rank)), k[0], latest[k]["chips"], k[1:])
    ):
        line = latest[key]
        chip_bytes, step, mfu = line["max_chip_bytes"], line["step_seconds"], line["mfu_bound"]
        hbm = line["hbm_bytes"]
        mesh = "x".join(str(v) for v in line["mesh"].values())
        refused = [r["name"] for r in line["rows"] if not r.get("compiled", True)]
        fits = "yes" if line.get("fits", chip_bytes <= hbm) else "**no**"
        if refused:
            fits += f" (XLA refused {', '.join(refused)})"
        out.append(
            f"| {line['preset']} | {line['topology']} ({line['chips']}) | {mesh} | "
            f"{' '.join(line.get('overrides', [])) or '-'} | "
            f"{chip_bytes / aot.GiB:.1f} / {hbm / aot.GiB:.0f} GiB | {fits} | "
            f"{'-' if step is None else f'{step:.1f} s'} | "
            f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} |"
        )
    return "\n".join(out)


def merged(path: str, report: aot.Report, key: tuple) -> aot.Report:
    """`report`'s rows merged into the latest record of `key` in `path` (theirs replaced)."""
    old = None
    if os.path.exists(path):
        for line in (json.loads(x) for x in open(path, encoding="utf-8") if x.strip()):
            if row_key(line) == key:
                old = line
    if old is None:
        raise ValueError(f"--only: no earlier record of {key} in {path} to merge into")
    rows = {r["name"]: aot.Row(**r) for r in old["rows"]}
    rows.update({r.name: r for r in report.rows})
    order = {name: i for i, name in enumerate(aot_steps.FUNCTION_ORDER)}
    ordered = sorted(rows.values(), key=lambda r: order.get(r.name, len(order)))
    return dataclasses.replace(report, rows=ordered)


def main(argv):
    del argv
    if _MARKDOWN.value:
        print(markdown(_OUT.value))
        return
    for topology in _TOPOLOGIES.value:
        for preset in _PRESETS.value:
            cfg = config(preset, _SET.value)
            report = aot.compile_all(cfg, topology, include_sft=False, only=_ONLY.value)
            if _ONLY.value:
                report = merged(_OUT.value, report, (preset, topology, tuple(_SET.value)))
            row = dict(
                preset=preset, topology=topology, chips=report.num_chips, mesh=report.mesh,
                overrides=_SET.value, chip=report.chip.name, hbm_bytes=report.chip.hbm_bytes,
                step_seconds=report.step_seconds, mfu_bound=report.mfu_bound,
                max_chip_bytes=report.max_chip_bytes, fits=report.fits,
                rows=[dataclasses.asdict(r) for r in report.rows], merged=_ONLY.value,
            )  # fmt: skip
            with open(_OUT.value, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(aot.format_report(report), flush=True)


if __name__ == "__main__":
    app.run(main)
