"""TFDS array_record build -> read back without TF -> grain iteration, sharding and resume."""

import json

import pytest

from deepretrieval_jax.data import pipeline, tfds_builder
from deepretrieval_jax.data.records import Example

N = 23


def examples(n=N, prefix="q"):
    return [
        Example(f"{prefix}{i}", f"claim {i}", {f"d{i}": 1, f"d{i + 1}": 2}, {}, {"row": i})
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    tfds_builder.build_examples(
        "tiny", {"train": examples(), "test": lambda: examples(5, "t")}, root
    )
    return root


def ids(batches):
    return [[e.id for e in b] for b in batches]


def test_build_and_read_back_without_tensorflow(data_dir):
    import sys

    assert "tensorflow" not in sys.modules  # array_record + TFDS data source only
    path = tfds_builder.dataset_dir(data_dir, "tiny")
    assert sorted(p.name for p in path.glob("*.array_record*")) == [
        "deep_retrieval_examples-test.array_record-00000-of-00001",
        "deep_retrieval_examples-train.array_record-00000-of-00001",
    ]
    train = tfds_builder.load_split(data_dir, "tiny", "train")
    assert len(train) == N
    assert [train[i] for i in range(N)] == examples()  # stored in order, records intact
    assert len(tfds_builder.load_split(data_dir, "tiny", "test")) == 5
    with pytest.raises(KeyError, match="no split 'dev'"):
        tfds_builder.load_split(data_dir, "tiny", "dev")
    with pytest.raises(FileNotFoundError, match="no built dataset 'other'"):
        tfds_builder.load_split(data_dir, "other", "train")


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(Exception, match="duplicate example id 'q0'"):
        tfds_builder.build_examples("dup", {"train": examples(2) + examples(1)}, tmp_path)


def test_resume_continues_exactly_across_epochs(data_dir):
    source = tfds_builder.load_split(data_dir, "tiny", "train")

    def make():
        return pipeline.make_iterator(source, batch_size=4, seed=7, shard_index=0, shard_count=1)

    it = make()
    head = ids(next(it) for _ in range(3))
    state = it.get_state()
    state = json.loads(json.dumps(state))  # what a checkpoint stores
    rest = ids(next(it) for _ in range(12))  # crosses several epoch boundaries
    resumed = make()
    resumed.set_state(state)
    assert ids(next(resumed) for _ in range(12)) == rest
    fresh = make()
    assert ids(next(fresh) for _ in range(3)) == head  # deterministic from the seed


def test_epochs_are_distinct_permutations(data_dir):
    source = tfds_builder.load_split(data_dir, "tiny", "train")
    it = pipeline.make_iterator(
        source, batch_size=1, seed=3, num_epochs=2, shard_index=0, shard_count=1,
        drop_remainder=False,
    )  # fmt: skip
    order = [b[0].id for b in it]
    first, second = order[:N], order[N:]
    assert len(order) == 2 * N
    assert sorted(first) == sorted(second) == sorted(e.id for e in examples())
    assert first != second and first != [f"q{i}" for i in range(N)]


def test_shards_are_disjoint_and_equal_sized(data_dir):
    source = tfds_builder.load_split(data_dir, "tiny", "train")
    seen = []
    for shard in range(3):
        it = pipeline.make_iterator(
            source, batch_size=2, seed=0, num_epochs=1, shard_index=shard, shard_count=3
        )
        seen.append([e.id for b in it for e in b])
    assert [len(s) for s in seen] == [6, 6, 6]  # 23 // 3 = 7 per shard, then whole batches of 2
    assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2])


def test_eval_pass_keeps_everything(data_dir):
    source = tfds_builder.load_split(data_dir, "tiny", "train")
    it = pipeline.make_iterator(
        source, batch_size=5, shuffle=False, num_epochs=1, drop_remainder=False,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    batches = list(it)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [e.id for b in batches for e in b] == [f"q{i}" for i in range(N)]


def test_default_shard_is_this_jax_process(data_dir):
    source = tfds_builder.load_split(data_dir, "tiny", "test")
    it = pipeline.make_iterator(source, batch_size=5, num_epochs=1, shuffle=False)
    assert ids(it) == [[f"t{i}" for i in range(5)]]  # one process: shard 0 of 1
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.make_iterator(source, batch_size=0)


def test_build_cli_from_original_files(tmp_path):
    from deepretrieval_jax.data import build

    pico = {"P": "a", "I": "b", "C": "c", "O": "d"}
    src = tmp_path / "test.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "pico": pico, "publication_pmids": [str(i)],
                        "pub_date": "2020/01/31"}) + "\n"
            for i in range(3)
        )
    )  # fmt: skip
    out = build.main(["--name=pubmed", "--format=pico_jsonl", f"--split=test={src}",
                      f"--data_dir={tmp_path / 'd'}"])  # fmt: skip
    assert out == tfds_builder.dataset_dir(tmp_path / "d", "pubmed")
    got = tfds_builder.load_split(tmp_path / "d", "pubmed", "test")
    assert [got[i].label for i in range(3)] == [["0"], ["1"], ["2"]]
    assert got[0].search_opts == {"maxdate": "2020/01/31"}
    with pytest.raises(SystemExit):
        build.main(["--name=x", "--format=pico_jsonl", "--split=nopath", f"--data_dir={tmp_path}"])


def test_rebuilding_over_a_dataset_refuses_or_replaces_it(tmp_path, capsys):
    from deepretrieval_jax.data import build

    def qa(path, question):
        path.write_text(json.dumps({"question": question, "answers": ["a"]}) + "\n")
        return f"test={path}"

    argv = ["--name=nq", "--format=dpr_jsonl", f"--data_dir={tmp_path}"]
    build.main([*argv, f"--split={qa(tmp_path / 'v1.jsonl', 'old question')}"])
    with pytest.raises(SystemExit) as exit_info:  # rebuilding is never a silent no-op
        build.main([*argv, f"--split={qa(tmp_path / 'v2.jsonl', 'new question')}"])
    assert exit_info.value.code == 2 and "already built" in capsys.readouterr().err
    assert tfds_builder.load_split(tmp_path, "nq", "test")[0].input == "old question"
    build.main([*argv, "--overwrite", f"--split=test={tmp_path / 'v2.jsonl'}"])
    source = tfds_builder.load_split(tmp_path, "nq", "test")
    assert len(source) == 1 and source[0].input == "new question"
    leftovers = [p for p in tmp_path.rglob("*") if ".rebuild-" in p.name or ".old-" in p.name]
    assert leftovers == []
