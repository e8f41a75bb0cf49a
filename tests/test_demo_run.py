"""The main job end to end at tiny size: configs/demo.py with a tiny random policy (an HF dir the
test writes) and a tiny BEIR SciFact folder; every stage of `demo.run` runs for real (zero-shot
eval + claim baseline, HyDE, GRPO, trained eval, HF export checked by transformers, plots) and a
re-run resumes from the stages' outputs without redoing them."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_policy

from deepretrieval_jax import demo
from deepretrieval_jax import sweep as hyper

DOCS = {
    f"d{i}": (title, text)
    for i, (title, text) in enumerate(
        [
            ("Aspirin", "Aspirin lowers fever in adults."),
            ("Vitamin D", "Vitamin D supplements and bone density."),
            ("Statins", "Statins reduce cholesterol and heart attacks."),
            ("Sleep", "Short sleep raises blood pressure."),
            ("Exercise", "Exercise improves insulin sensitivity."),
            ("Smoking", "Smoking causes lung cancer."),
            ("Coffee", "Coffee intake and liver enzymes."),
            ("Salt", "Salt intake raises blood pressure in adults."),
        ]
    )
}


def _write_scifact(root):
    d = root / "scifact"
    (d / "qrels").mkdir(parents=True)
    with open(d / "corpus.jsonl", "w") as f:
        for i, (t, x) in DOCS.items():
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    ids = list(DOCS)
    claims = {f"q{i}": f"{DOCS[ids[i % 8]][1].lower()}" for i in range(12)}
    with open(d / "queries.jsonl", "w") as f:
        for q, text in claims.items():
            f.write(json.dumps({"_id": q, "text": text}) + "\n")
    rows = {q: ids[int(q[1:]) % 8] for q in claims}
    head = "query-id\tcorpus-id\tscore\n"
    train, test = list(claims)[:8], list(claims)[8:]
    (d / "qrels" / "train.tsv").write_text(head + "".join(f"{q}\t{rows[q]}\t1\n" for q in train))
    (d / "qrels" / "test.tsv").write_text(head + "".join(f"{q}\t{rows[q]}\t1\n" for q in test))
    return root


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_main_job_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    data = _write_scifact(tmp_path / "data")
    model = save_tiny_policy(tmp_path / "model")
    overrides = [
        f"--config.model.hf_path={model}",
        f"--config.data.data_dir={data}",
        "--config.data.max_prompt_len=352",  # the tiny tokenizer: one id per character
        "--config.data.prompt_buckets=(352,)",
        "--config.data.num_val_examples=4",
        "--config.sampling.max_new_tokens=6",
        "--config.train.num_steps=4",  # learning_stats needs 4 rewards
        "--config.train.checkpoint_every=0",
        "--config.ppo.mini_batch_size=32",
        "--config.ppo.micro_batch_size=8",
        "--config.demo.eval_batch_size=8",
        "--config.demo.hf_check_claims=2",
        "--config.demo.hyde.max_new_tokens=6",
    ]
    cfg = hyper._parse_flags("configs/demo.py", overrides)
    workdir = tmp_path / "run"
    summary = demo.run(cfg, workdir)

    names = [row["method"] for row in summary["table"]]
    assert names == [
        "claim as query (BM25 on the claim)",
        "zero-shot policy",
        "prompt-only HyDE (pseudo-abstract as query)",
        "trained policy",
    ]
    for row in summary["table"]:
        assert row["n"] == 4 and 0.0 <= row["ndcg@10"] <= 1.0
    claim = summary["table"][0]
    assert claim["ndcg@10"] > 0.5  # each test claim is its document's own sentence
    comparisons = summary["comparisons"]
    assert set(comparisons) == {
        "trained_minus_zero_shot",
        "trained_minus_zero_shot_on_zero_shot_well_formed",
        "trained_minus_claim_as_query",
        "trained_minus_hyde",
    }
    assert comparisons["trained_minus_claim_as_query"]["n"] == 4
    assert comparisons["trained_minus_claim_as_query"]["difference"] is not None
    # A random policy writes no well-formed answer: that comparison has nothing to pair and
    # says so (it crashed the summary before).
    well_formed = comparisons["trained_minus_zero_shot_on_zero_shot_well_formed"]
    assert well_formed["n"] >= 2 or well_formed["difference"] is None
    assert summary["hf_check"]["claims"] == 2  # transformers generated from the export
    assert summary["hf_check"]["greedy_equal"] == 2
    assert summary["learning"] is not None
    for name in ("summary.json", "summary.md", "learning.png", "per_claim.png", "hf/config.json"):
        assert (workdir / name).is_file(), name
    assert "| trained policy |" in (workdir / "summary.md").read_text()

    # A re-run resumes: the trainer finds its last step, the evaluations their reports.
    from deepretrieval_jax.rl import trainer

    calls = []
    monkeypatch.setattr(trainer, "train", lambda cfg, rl_dir: calls.append(rl_dir))
    again = demo.run(hyper._parse_flags("configs/demo.py", overrides), workdir)
    assert again["table"] == summary["table"]
    assert len(calls) == 1  # train() is called (it returns at once on a finished run)
