"""Builds a passage corpus (BEIR layout, `corpus.jsonl`) that a local BM25 / dense task reads.

    python -m deepretrieval_jax.data.corpus --format=dpr_tsv --out=/data/wikipedia_dpr \\
        /data/psgs_w100.tsv.gz
    python -m deepretrieval_jax.data.corpus --format=squad_json --out=/data/squad_paragraphs \\
        download:squad/train download:squad/dev

Formats: dpr_tsv (DPR's `psgs_w100.tsv[.gz]`, one input; the evidence tasks' default corpus
`wikipedia_dpr`), squad_json (the paragraphs of one or more SQuAD json files; train with
`--config.data.corpus=squad_paragraphs`). Inputs may be `download:<key>` (`download.RESOURCES`).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence

from deepretrieval_jax.data import converters, download, qa_formats

FORMATS = ("dpr_tsv", "squad_json")


def build_corpus(fmt: str, inputs: Sequence[str], out_dir: str) -> int:
    """Writes `out_dir/corpus.jsonl` from `inputs`; returns the number of passages."""
    if fmt == "dpr_tsv":
        if len(inputs) != 1:
            raise ValueError(f"--format=dpr_tsv takes one input file, got {len(inputs)}")
        return converters.dpr_passages_to_beir(inputs[0], out_dir)
    if fmt == "squad_json":
        passages = itertools.chain.from_iterable(qa_formats.squad_passages(p) for p in inputs)
        return qa_formats.write_beir_corpus(passages, out_dir)
    raise ValueError(f"--format={fmt!r} not in {FORMATS}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="corpus directory (gets corpus.jsonl)")
    p.add_argument("inputs", nargs="+", help="input files or download:<key>")
    args = p.parse_args(argv)
    n = build_corpus(args.format, [download.source_path(i) for i in args.inputs], args.out)
    print(f"{n} passages -> {args.out}/corpus.jsonl")
    return n


if __name__ == "__main__":
    main()
