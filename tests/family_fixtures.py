"""Shared by the family matrix tests (tests/test_family_matrix.py, tests/test_family_ppo.py):
every family's data built with the documented converters under one root, the PubMed
E-utilities stand-in (`search/serve.py`) and a CT.gov fake on 127.0.0.1, each family's config
with the overrides a user would pass, and scripted well-formed answers.

Every family shares one model shape (byte-level tiny tokenizer, one prompt bucket), so the
persistent compilation cache compiles the PPO programs once per process.
"""

import asyncio
import json
import shutil
import sqlite3
import threading

import jax
import ml_collections
import trainer_fixtures as fx
from aiohttp import web
from search_fakes import FakeCTGov
from tiny_models import save_tiny_tokenizer

from configs import common, ctgov, nq, pubmed, scifact, sql_bird
from deepretrieval_jax.data import backends, build, corpus
from deepretrieval_jax.rl import rollout
from deepretrieval_jax.search import serve
from deepretrieval_jax.search.bm25 import BM25Backend, BM25Index

N = len(fx.DOCS)  # 8 examples per split = one global batch
PROMPT_LEN = 1536  # the longest prompt (PICO) in bytes, rounded up: one shape for all
PMIDS = [str(30_000_000 + i) for i in range(N)]
NCTS = [f"NCT{i:08d}" for i in range(N)]
ANSWERS = [t.split()[-1] for t in fx.DOCS]  # a word only passage i holds


def words(i, n=3):
    return " ".join(fx.DOCS[i].split()[:n])


# task -> (config module, the scripted answer for example i, train reward, eval metric: value)
FAMILIES = {
    "scifact": (scifact, lambda i: words(i), 1.1, ("ndcg@10", 1.0)),
    "scifact_dense": ((scifact, "dense"), lambda i: words(i, 6), 1.1, ("ndcg@10", 1.0)),
    "msmarco_health": (scifact, lambda i: words(i), 1.1, ("ndcg@10", 1.0)),
    "pubmed": (pubmed, lambda i: words(i).replace(" ", " AND "), 6.0, ("recall@3000", 1.0)),
    "ctgov": (ctgov, lambda i: words(i).replace(" ", " AND "), 6.0, ("recall@3000", 1.0)),
    "nq": (nq, lambda i: words(i), 6.0, ("hit@5", 1.0)),
    "triviaqa": (nq, lambda i: words(i), 6.0, ("hit@5", 1.0)),
    "squad": (nq, lambda i: words(i), 6.0, ("hit@5", 1.0)),
    "bird": (sql_bird, lambda i: f"SELECT name FROM items WHERE id = {i}", 1.1,
             ("execution_accuracy", 1.0)),
    "spider": (sql_bird, lambda i: f"SELECT name FROM items WHERE id = {i}", 1.1,
               ("execution_accuracy", 1.0)),
}  # fmt: skip


# --- Data, written the way docs/tasks.md says ------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pico(i):
    return {"P": fx.DOCS[i], "I": "none", "C": "none", "O": "none"}


def build_data(root):
    data = root / "data"
    fx.write_beir(data)  # scifact/ (BEIR layout: read directly)
    shutil.copytree(data / "scifact", data / "msmarco_health")
    raw = root / "raw"
    raw.mkdir()
    cli = ["--data_dir", str(data)]
    for name, field, ids in (
        ("pubmed", "publication_pmids", PMIDS),
        ("ctgov", "trial_nctids", NCTS),
    ):
        rows = [{"id": f"r{i}", "pico": pico(i), field: [ids[i]], "pub_date": "2020/01/01"}
                for i in range(N)]  # fmt: skip
        path = write_jsonl(raw / f"{name}.jsonl", rows)
        splits = [f"--split=train={path}", f"--split=test={path}"]
        build.main([f"--name={name}", "--format=pico_jsonl", *splits, *cli])
    # Evidence: DPR passages -> wikipedia_dpr/, NQ qas csv, TriviaQA retriever json, SQuAD json.
    tsv = raw / "psgs_w100.tsv"
    tsv.write_text(
        "id\ttext\ttitle\n" + "".join(f"p{i}\t{t}\tT{i}\n" for i, t in enumerate(fx.DOCS))
    )
    corpus.main(["--format=dpr_tsv", f"--out={data / 'wikipedia_dpr'}", str(tsv)])
    qas = raw / "nq.csv"
    qas.write_text("".join(f"{words(i)}\t['{ANSWERS[i]}']\n" for i in range(N)))
    retriever = raw / "trivia.json"
    retriever.write_text(
        json.dumps([{"question": words(i), "answers": [ANSWERS[i]]} for i in range(N)])
    )
    squad = raw / "dev-v1.1.json"
    paragraphs = [{"context": t, "qas": [{"id": f"s{i}", "question": words(i),
                   "answers": [{"text": ANSWERS[i], "answer_start": t.rfind(ANSWERS[i])}]}]}
                  for i, t in enumerate(fx.DOCS)]  # fmt: skip
    squad.write_text(
        json.dumps({"version": "1.1", "data": [{"title": "Health", "paragraphs": paragraphs}]})
    )
    corpus.main(["--format=squad_json", f"--out={data / 'squad_paragraphs'}", str(squad)])
    for name, fmt, path in (("nq", "dpr_qas", qas), ("triviaqa", "dpr_json", retriever),
                            ("squad", "squad_json", squad)):  # fmt: skip
        build.main([f"--name={name}", f"--format={fmt}", f"--split=train={path}",
                    f"--split=test={path}", *cli])  # fmt: skip
    # SQL: one sqlite database per dataset root, questions in BIRD / Spider json.
    for name, gold in (("bird", "SQL"), ("spider", "query")):
        db = data / name / "shop" / "shop.sqlite"
        db.parent.mkdir(parents=True)
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE items (id INTEGER, name TEXT)")
            conn.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"n{i}") for i in range(N)])
        items = [{"question": f"name of item {i}?", "db_id": "shop", "evidence": "",
                  gold: f"SELECT name FROM items WHERE id = {i}"} for i in range(N)]  # fmt: skip
        path = raw / f"{name}.json"
        path.write_text(json.dumps(items))
        build.main([f"--name={name}", f"--format={name}", f"--split=train={path}",
                    f"--split=dev={path}", f"--split=test={path}", f"--db_root={data / name}",
                    *cli])  # fmt: skip
    return data


class Servers:
    """The PubMed stand-in (BM25 over the docs, as PMIDs) and a CT.gov fake, on one loop."""

    def __init__(self):
        # A dated snapshot (the examples search up to their review's date, 2020/01/01).
        index = BM25Index.build([(PMIDS[i], t, 20100101) for i, t in enumerate(fx.DOCS)])
        trials = BM25Index.build([(NCTS[i], t) for i, t in enumerate(fx.DOCS)])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(serve.make_app(BM25Backend(index)))
        self.ctgov = FakeCTGov(results=lambda term: trials.search(term, top_k=100))
        self._call(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self._call(site.start())
        self.pubmed_url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/entrez/eutils/"
        self._call(self.ctgov.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self):
        self._call(self.ctgov.stop())
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def make_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    save_tiny_tokenizer(root / "tok")
    servers = Servers()
    try:
        yield {"root": root, "data": build_data(root), "servers": servers}
    finally:
        servers.close()


def family_config(task, env):
    """The family's config file with the overrides a user passes on the command line (the
    config is locked, as `--config` locks it: an override of a field it lacks fails), then
    the tiny-policy settings of these tests."""
    module, arg = (
        FAMILIES[task][0] if isinstance(FAMILIES[task][0], tuple) else (FAMILIES[task][0], None)
    )
    cfg = module.get_config(arg)
    cfg.lock()
    cfg.data.task = task  # --config.data.task=...
    cfg.data.data_dir = str(env["data"])
    if task == "squad":
        cfg.data.corpus = "squad_paragraphs"  # SQuAD over its own paragraphs
    if task.endswith("_dense"):
        cfg.reward.search_opts.model = "minilm"  # a small local encoder instead of bge-base
    if task in ("pubmed", "ctgov"):
        url = env["servers"].pubmed_url if task == "pubmed" else env["servers"].ctgov.base_url
        cfg.reward.search_opts.base_url = url
        cfg.reward.rate_per_s = 100.0
    cfg.unlock()
    # The tiny policy (random init, byte-level tokenizer) and one small PPO step.
    cfg.model.preset = "tiny"
    cfg.model.overrides = ml_collections.ConfigDict(dict(
        embed_dim=32, mlp_dim=64, num_layers=1, max_position_embeddings=2048, dtype="float32",
        remat=False))  # fmt: skip
    cfg.tokenizer.name = str(env["root"] / "tok")
    cfg.mesh = common.mesh_config(data=-1)
    cfg.data.max_prompt_len = PROMPT_LEN
    cfg.data.prompt_buckets = (PROMPT_LEN,)
    cfg.sampling.max_new_tokens = 4
    cfg.train.prompts_per_step = N
    cfg.ppo.mini_batch_size = N
    cfg.train.num_steps = 1
    cfg.train.val_every = 0
    cfg.train.async_checkpoint = False
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    return cfg


def key_text(spec, inp):
    """The part of an example's input that appears verbatim in its prompt."""
    if spec.input_format == "pico":
        return inp["P"]
    return inp["question"] if spec.input_format == "sql" else inp


def doc_index(spec, text):
    """Which document example input `text` (its key text) was written from."""
    keys = {"pico": fx.DOCS, "sql": [f"name of item {i}?" for i in range(N)]}
    return keys.get(spec.input_format, [words(i) for i in range(N)]).index(text)


def scripted(spec, task, i):
    """A well-formed completion (after the prompt's assistant prefix) for document i."""
    answer = json.dumps({spec.answer_key: FAMILIES[task][1](i)})
    return f"I will search.\n</think>\n<answer>{answer}</answer>"


def reward_requests(cfg, spec, task, examples):
    """The trainer's reward requests (`rl.rollout`) for scripted answers to `examples`."""
    _, search_opts = backends.split_search_opts(spec, cfg.reward.search_opts)
    texts = [scripted(spec, task, doc_index(spec, key_text(spec, ex.input))) for ex in examples]
    return rollout.reward_requests(spec, examples, texts, 0, 1, search_opts)


def prepare(env, monkeypatch):
    monkeypatch.setenv("NCBI_API_KEY", "stand-in-key")  # configs/pubmed.py requires the key
    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(env["root"] / "cache"))
    return env
