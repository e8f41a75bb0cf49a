"""Builds a task dataset (TFDS array_record) from DeepRetrieval's original files.

    python -m deepretrieval_jax.data.build --name=pubmed --format=pico_jsonl \\
        --split=train=/data/pubmed/train.jsonl --split=test=/data/pubmed/test.jsonl \\
        --data_dir=$DEEPRETRIEVAL_DATA_DIR

Formats (see `converters`, `qa_formats`): pico_jsonl, verl_parquet, dpr_jsonl
(`{"question", "answers"}` lines), dpr_qas (DPR's `nq-test.csv`-style question<TAB>answers),
dpr_json (DPR's retriever json, `nq-train.json`), squad_json (SQuAD v1.1 / v2.0; the passage
corpus comes from `python -m deepretrieval_jax.data.corpus`), beir (the path is the BEIR
directory; the split name picks qrels/<split>.tsv), bird / spider (`--db_root` holds
`<db_id>/<db_id>.sqlite`). A path may be `download:<key>` (e.g. `download:squad/dev`, see
`download.RESOURCES`). A dataset already built under the name is replaced only with
`--overwrite`. The dataset lands in `<data_dir>/deep_retrieval_examples/<name>/`,
where `data.task_data.load_examples` and `tfds_builder.load_split` find it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from deepretrieval_jax.data import converters, download, qa_formats
from deepretrieval_jax.data.records import Example
from deepretrieval_jax.data.tfds_builder import build_examples

FORMATS = (
    "pico_jsonl",
    "verl_parquet",
    "dpr_jsonl",
    "dpr_qas",
    "dpr_json",
    "squad_json",
    "beir",
    "bird",
    "spider",
)


def reader(fmt: str, split: str, path: str, db_root: str | None) -> Callable[[], list[Example]]:
    """A zero-argument function returning the examples of one split."""
    if fmt == "pico_jsonl":
        return lambda: converters.read_pico_jsonl(path)
    if fmt == "verl_parquet":
        return lambda: converters.read_verl_parquet(path)
    if fmt == "dpr_jsonl":
        return lambda: converters.read_dpr_qa_jsonl(path, id_prefix=f"{split}-")
    if fmt == "dpr_qas":
        return lambda: qa_formats.read_dpr_qas_csv(path, id_prefix=f"{split}-")
    if fmt == "dpr_json":
        return lambda: qa_formats.read_dpr_retriever_json(path, id_prefix=f"{split}-")
    if fmt == "squad_json":
        return lambda: qa_formats.read_squad_json(path)
    if fmt == "beir":
        return lambda: converters.read_beir(path, split)
    if fmt in ("bird", "spider"):
        if not db_root:
            raise ValueError(f"--format={fmt} needs --db_root (holding <db_id>/<db_id>.sqlite)")
        return lambda: converters.read_sql_json(path, db_root, fmt)
    raise ValueError(f"--format={fmt!r} not in {FORMATS}")


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="dataset name (a TaskSpec.dataset)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--split", action="append", required=True, help="SPLIT=PATH (repeatable)")
    p.add_argument("--data_dir", default=os.environ.get("DEEPRETRIEVAL_DATA_DIR", ""))
    p.add_argument("--db_root", default=None)
    p.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already built under the name"
    )
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("--data_dir is empty and $DEEPRETRIEVAL_DATA_DIR is not set")
    splits = {}
    for item in args.split:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            p.error(f"--split expects SPLIT=PATH, got {item!r}")
        splits[split] = reader(args.format, split, download.source_path(path), args.db_root)
    try:
        out = build_examples(args.name, splits, args.data_dir, overwrite=args.overwrite)
    except FileExistsError as e:
        p.error(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
