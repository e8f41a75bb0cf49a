"""SQuAD and DPR question / passage converters and the corpus CLI, on files the tests write."""

import json

import pytest

from deepretrieval_jax.data import build, corpus, download, qa_formats, tfds_builder
from deepretrieval_jax.data.converters import iter_beir_corpus
from deepretrieval_jax.data.records import DataFormatError

SQUAD_V2 = {
    "version": "v2.0",
    "data": [
        {
            "title": "Eiffel_Tower",
            "paragraphs": [
                {
                    "context": "The Eiffel Tower was designed by Gustave Eiffel's company.",
                    "qas": [
                        {"id": "q1", "question": "Whose company designed the tower?",
                         "answers": [{"text": "Gustave Eiffel's company", "answer_start": 33},
                                     {"text": "Gustave Eiffel's company", "answer_start": 33},
                                     {"text": "Gustave Eiffel", "answer_start": 33}]},
                        {"id": "q2", "question": "Who painted the tower?", "answers": [],
                         "plausible_answers": [{"text": "Eiffel", "answer_start": 0}],
                         "is_impossible": True},
                    ],
                },
                {"context": "It is in Paris.",
                 "qas": [{"id": "q3", "question": "Where is it?",
                          "answers": [{"text": "Paris", "answer_start": 9}]}]},
            ],
        }
    ],
}  # fmt: skip


def test_squad_json_questions_and_paragraphs(tmp_path):
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(SQUAD_V2))
    exs = qa_formats.read_squad_json(path)
    assert [(e.id, e.input, e.label) for e in exs] == [
        ("q1", "Whose company designed the tower?", ["Gustave Eiffel's company", "Gustave Eiffel"]),
        ("q3", "Where is it?", ["Paris"]),
    ]  # q2 is unanswerable (v2)
    assert corpus.main(["--format=squad_json", f"--out={tmp_path / 'paras'}", str(path)]) == 2
    assert list(iter_beir_corpus(tmp_path / "paras" / "corpus.jsonl")) == [
        ("dev-v2.0-0-0", "Eiffel Tower", SQUAD_V2["data"][0]["paragraphs"][0]["context"]),
        ("dev-v2.0-0-1", "Eiffel Tower", "It is in Paris."),
    ]
    with pytest.raises(DataFormatError, match="repeated passage id"):
        corpus.main(["--format=squad_json", f"--out={tmp_path / 'x'}", str(path), str(path)])
    assert not (tmp_path / "x" / "corpus.jsonl").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"data": [{"paragraphs": [{"qas": [{}]}]}]}))
    with pytest.raises(DataFormatError, match=r"data\[0\].paragraphs\[0\].qas\[0\].question"):
        qa_formats.read_squad_json(tmp_path / "bad.json")


def test_dpr_qas_csv_and_retriever_json(tmp_path):
    qas = tmp_path / "nq-test.csv"
    qas.write_text(
        "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
        'when was the eiffel tower built\t["1887", "1889"]\n'
    )
    exs = qa_formats.read_dpr_qas_csv(qas, id_prefix="test-")
    assert [(e.id, e.label) for e in exs] == [
        ("test-0", ["Wilhelm Conrad Röntgen"]),
        ("test-1", ["1887", "1889"]),
    ]
    qas.write_text("question only\n")
    with pytest.raises(DataFormatError, match="nq-test.csv, line 1: expected 2 columns"):
        qa_formats.read_dpr_qas_csv(qas)
    retr = tmp_path / "trivia-dev.json"
    items = [{"question": "q?", "answers": ["a", "a", "b"], "positive_ctxs": []}]
    retr.write_text(json.dumps(items))
    (ex,) = qa_formats.read_dpr_retriever_json(retr, "dev-")
    assert (ex.id, ex.input, ex.label) == ("dev-0", "q?", ["a", "b"])
    retr.write_text(json.dumps([{"question": "q", "answers": []}]))
    with pytest.raises(DataFormatError, match="item 0.answers': empty list"):
        qa_formats.read_dpr_retriever_json(retr)


def test_build_cli_reads_squad_and_dpr_formats(tmp_path, monkeypatch):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(SQUAD_V2))
    qas = tmp_path / "trivia-test.csv"
    qas.write_text("q one\t['x']\n")
    # A `download:` input resolves through the download cache (pre-filled here: no network).
    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "downloads" / download.RESOURCES["squad/dev"].filename
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps(SQUAD_V2))
    data = tmp_path / "data"
    data.mkdir()
    build.main(["--name=squad", "--format=squad_json", f"--split=train={squad}",
                "--split=test=download:squad/dev", f"--data_dir={data}"])  # fmt: skip
    build.main(["--name=triviaqa", "--format=dpr_qas", f"--split=test={qas}", f"--data_dir={data}"])
    assert [tfds_builder.load_split(data, "squad", s)[1].id for s in ("train", "test")] == [
        "q3",
        "q3",
    ]
    assert tfds_builder.load_split(data, "triviaqa", "test")[0].label == ["x"]
