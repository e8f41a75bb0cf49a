"""BM25 on BEIR SciFact: index build time, queries/s, nDCG@10 (prints figures, never pass/fail).

    python benchmarks/bm25_scifact.py [--data ../shared/data/scifact] [--repeats 3]

For k1/b = 0.9/0.4 (BEIR's Lucene "flat" setting, published nDCG@10 = 0.679) and 1.2/0.75
(DeepRetrieval's SciFact setting): build the index from corpus.jsonl (title + "\\n" + text),
save it, load it memory-mapped, then run the 300 test claims as queries:
- batch bag-of-words retrieval (`BM25Index.search_many`, bm25s under the hood), top 10;
- one query at a time through `BM25Index.search` (the path the async backend runs), top 10
  and top 1000;
- Boolean queries built from the claims (`(w1 OR w2 OR w3) AND (w4 OR w5 OR w6)`), top 10.
nDCG@10 uses the reward library's `ndcg_at_k` (linear gains, sorted ideal).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time

from deepretrieval_jax.rewards.retrieval_metrics import ndcg_at_k
from deepretrieval_jax.search.bm25 import BM25Config, BM25Index, read_beir_corpus

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scifact")


def load_split(data: str, split: str = "test"):
    with open(os.path.join(data, "queries.jsonl"), encoding="utf-8") as f:
        texts = {q["_id"]: q["text"] for q in map(json.loads, f)}
    qrels: dict[str, dict[str, float]] = {}
    with open(os.path.join(data, "qrels", f"{split}.tsv"), encoding="utf-8") as f:
        for row in list(csv.reader(f, delimiter="\t"))[1:]:
            qrels.setdefault(row[0], {})[row[1]] = float(row[2])
    qids = sorted(qrels, key=int)
    return [texts[q] for q in qids], [qrels[q] for q in qids]


def boolean_query(index: BM25Index, claim: str) -> str:
    words = [w for w in claim.split() if w.isalpha() and w.lower() not in index.analyzer.stopwords]
    words = words + words[:6] if len(words) < 6 else words
    return f"({' OR '.join(words[:3])}) AND ({' OR '.join(words[3:6])})"


def best_of(repeats: int, fn):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def mean_ndcg(results, qrels, k=10) -> float:
    return sum(ndcg_at_k(r, g, k) for r, g in zip(results, qrels, strict=True)) / len(qrels)


def run(data: str, k1: float, b: float, repeats: int) -> dict:
    queries, qrels = load_split(data)
    config = BM25Config(k1=k1, b=b)
    start = time.perf_counter()
    docs = list(read_beir_corpus(data))
    built = BM25Index.build(docs, config)
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        built.save(tmp)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        index = BM25Index.load(tmp, mmap=True)
        load_s = time.perf_counter() - start
        n = len(queries)
        batch_s, batch = best_of(repeats, lambda: index.search_many(queries, top_k=10))
        batch2_s, _ = best_of(repeats, lambda: index.search_many(queries, 10, n_threads=2))
        single_s, single = best_of(repeats, lambda: [index.search(q, top_k=10) for q in queries])
        single1k_s, _ = best_of(repeats, lambda: [index.search(q, top_k=1000) for q in queries])
        boolean = [boolean_query(index, q) for q in queries]
        bool_s, bool_res = best_of(repeats, lambda: [index.search(q, top_k=10) for q in boolean])
        return {
            "k1": k1,
            "b": b,
            "docs": len(docs),
            "queries": n,
            "build_s": build_s,
            "save_s": save_s,
            "mmap_load_s": load_s,
            "batch_qps": n / batch_s,
            "batch_qps_2threads": n / batch2_s,
            "single_qps_top10": n / single_s,
            "single_qps_top1000": n / single1k_s,
            "boolean_qps_top10": n / bool_s,
            "ndcg10_batch": mean_ndcg(batch, qrels),
            "ndcg10_single": mean_ndcg(single, qrels),
            "ndcg10_boolean": mean_ndcg(bool_res, qrels),
            "identical_batch_vs_single": batch == single,
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "corpus.jsonl")):
        raise SystemExit(f"{args.data}: no corpus.jsonl (BEIR SciFact expected)")
    rows = [run(args.data, k1, b, args.repeats) for k1, b in [(0.9, 0.4), (1.2, 0.75)]]
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    print()
    print(
        "| k1 | b | nDCG@10 | build | batch q/s (1 / 2 threads) | search() q/s top10 / top1000 | Boolean q/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['k1']} | {r['b']} | {r['ndcg10_batch']:.4f} | {r['build_s']:.2f} s | "
            f"{r['batch_qps']:,.0f} / {r['batch_qps_2threads']:,.0f} | "
            f"{r['single_qps_top10']:,.0f} / {r['single_qps_top1000']:,.0f} | "
            f"{r['boolean_qps_top10']:,.0f} |"
        )


if __name__ == "__main__":
    main()
