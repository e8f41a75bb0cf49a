"""The HTTP service on 127.0.0.1 (random free port) with the tiny model, through real clients.

Each test starts the real aiohttp app in its own event loop and talks to it with aiohttp's
client (and the `openai` client where installed). Batching is checked deterministically:
with a long `max_wait_ms`, a batch leaves only when `max_batch` requests are queued, so the
number of sampler calls does not depend on timing.
"""

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web
from tiny_models import save_tiny_policy, write_tiny_scifact

from deepretrieval_jax.data.tasks import get_task
from deepretrieval_jax.serving import policy as policy_lib
from deepretrieval_jax.serving import rewrite, server
from deepretrieval_jax.serving.scheduler import SchedulerConfig

CAP = 12  # max_new_tokens of the served policy
# Short prompt texts keep the tiny model's prompts in the 256-token bucket (fast on CPU).
SHORT = dict(system="Be brief.", instruction="Write a query.", note="",
             output_format='<think>...</think><answer>{"query": "..."}</answer>')  # fmt: skip
LONG_WAIT = 60_000.0  # ms: batches leave only when full (or at shutdown)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    # min_batch=8: every call compiles at one batch shape, whatever the number of requests.
    path = save_tiny_policy(tmp_path_factory.mktemp("served_policy"))
    return policy_lib.load_policy(
        path, name="tiny", max_new_tokens=CAP, max_batch=8, min_batch=8, prompt_buckets=(64, 256)
    )


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_tiny_scifact(tmp_path_factory.mktemp("corpora"))


@contextlib.asynccontextmanager
async def serving(policy, searchers=None, max_input_tokens=2048, max_body_bytes=1 << 20, **sched):
    tasks = {n: get_task(n, **SHORT) for n in ("scifact", "pubmed")}
    config = server.ServerConfig(
        max_input_tokens=max_input_tokens,
        max_body_bytes=max_body_bytes,
        scheduler=SchedulerConfig(**sched),
    )
    service = server.Service(policy, config, tasks, searchers or {})
    runner = web.AppRunner(server.make_app(service), shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            yield service, http
    finally:
        await runner.cleanup()


async def post(http, path, body):
    async with http.post(path, json=body) as r:
        return r.status, await r.json(), r.headers


def test_concurrent_requests_are_batched_and_routed_to_their_callers(policy):
    prompts = [f"prompt number {i}: " + "x" * i for i in range(8)]

    async def go():
        async with serving(policy, max_batch=8, max_wait_ms=LONG_WAIT) as (service, http):
            calls = policy.calls
            bodies = [
                {"model": "tiny", "prompt": p, "max_tokens": 6, "temperature": 0} for p in prompts
            ]
            replies = await asyncio.gather(*(post(http, "/v1/completions", b) for b in bodies))
            async with http.get("/v1/stats") as r:
                stats = await r.json()
            return replies, stats, policy.calls - calls

    replies, stats, calls = asyncio.run(go())
    assert calls == 1, "8 concurrent requests with max_batch=8 must share one sampler call"
    assert stats["batches"] == 1 and stats["batch_sizes"] == {"8": 1} and stats["completed"] == 8
    # Each caller gets its own prompt's completion: compare with a direct batched call.
    rows = [policy.encode(p) for p in prompts]
    direct = policy.generate(rows, policy_lib.GenSettings(), [6] * 8)
    for (status, body, _), want, row in zip(replies, direct, rows, strict=True):
        assert status == 200, body
        assert body["choices"][0]["text"] == want.text
        assert body["usage"]["prompt_tokens"] == len(row)
        assert body["usage"]["completion_tokens"] <= 6


def test_requests_with_different_settings_go_in_different_batches(policy):
    async def go():
        async with serving(policy, max_batch=4, max_wait_ms=LONG_WAIT) as (service, http):
            bodies = [
                {
                    "prompt": f"p{i}",
                    "max_tokens": 3,
                    "temperature": 0.0 if i % 2 else 0.7,
                    "top_p": 0.9,
                }
                for i in range(8)
            ]
            replies = await asyncio.gather(*(post(http, "/v1/completions", b) for b in bodies))
            return replies, service.scheduler.stats()

    replies, stats = asyncio.run(go())
    assert all(s == 200 for s, _, _ in replies)
    assert stats["batches"] == 2 and stats["batch_sizes"] == {"4": 2}


def test_openai_shapes_stop_strings_and_the_openai_client(policy):
    async def go():
        async with serving(policy, max_batch=8, max_wait_ms=0) as (service, http):
            port = http._base_url.port
            status, plain, _ = await post(
                http, "/v1/completions", {"prompt": "p1", "max_tokens": CAP, "temperature": 0}
            )
            assert status == 200, plain
            text = plain["choices"][0]["text"]
            # A stop string from the middle of the greedy text cuts it there (stop excluded).
            k = next(i for i, ch in enumerate(text) if ch != text[0])
            stop = text[k : k + 2]
            status, cut, _ = await post(
                http,
                "/v1/completions",
                {"prompt": ["p1"], "max_tokens": CAP, "temperature": 0, "stop": [stop]},
            )
            openai = pytest.importorskip("openai")
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
            )
            comp = await client.completions.create(
                model="tiny", prompt="p1", max_tokens=5, temperature=0
            )
            chat = await client.chat.completions.create(
                model="tiny",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],  # fmt: skip
                max_tokens=4,
                temperature=0.7,
                top_p=0.9,
            )
            models = await client.models.list()
            await client.close()
            return plain, text, stop, cut, comp, chat, models

    plain, text, stop, cut, comp, chat, models = asyncio.run(go())
    assert plain["object"] == "text_completion" and plain["model"] == "tiny"
    assert plain["id"].startswith("cmpl-") and isinstance(plain["created"], int)
    assert plain["choices"][0]["finish_reason"] in ("stop", "length")
    assert cut["choices"][0]["text"] == text[: text.find(stop)] != ""
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert (
        comp.object == "text_completion"
        and comp.choices[0].text == text[: len(comp.choices[0].text)]
    )
    assert comp.usage.completion_tokens <= 5
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert [m.id for m in models.data] == ["tiny"]


def test_malformed_and_oversize_requests_get_4xx(policy):
    bad = [
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "stream": True}, 400, "stream"),
        ("/v1/completions", {"prompt": "x", "max_tokens": CAP + 1}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "bogus": 1}, 400, "bogus"),
        ("/v1/completions", {"prompt": 7}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": "y" * 100}, 400, "prompt"),  # > max_input_tokens
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages",
        ),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/rewrite", {"task": "nope", "input": "x"}, 400, "task"),
        ("/v1/rewrite", {"task": 3, "input": "x"}, 400, "task"),
        ("/v1/rewrite", {"task": "scifact"}, 400, "input"),
        ("/v1/rewrite", {"task": "scifact", "input": {"a": 1}, "search": False}, 400, "input"),
        ("/v1/rewrite", {"task": "pubmed", "input": "not pico", "search": False}, 400, "input"),
        ("/v1/rewrite", {"task": "scifact", "input": "x"}, 400, "search"),  # no searcher
    ]

    async def go():
        async with serving(policy, max_input_tokens=50, max_body_bytes=4096, max_wait_ms=0) as (
            service,
            http,
        ):
            out = [(await post(http, p, b), code, param) for p, b, code, param in bad]
            raw = []
            hostile = (b'{"prompt": "a\\ud800b"}', b'{"messages": [{"role": "user", '
                       b'"content": "\\udfff"}]}', b'{"prompt": ' + b"[" * 3000)  # fmt: skip
            for data in (b"{not json", b"[1, 2]", b"NaN", b"x" * 5000, *hostile):
                async with http.post("/v1/completions", data=data) as r:
                    raw.append((r.status, await r.json()))
            async with http.get("/v1/completions") as r:
                raw.append((r.status, await r.json()))
            return out, raw, service.scheduler.stats()

    out, raw, stats = asyncio.run(go())
    for (status, body, _), code, param in out:
        assert status == code, (param, body)
        assert body["error"]["param"] == param and body["error"]["message"], body
    # Issue 14: lone surrogates and deep nesting were 500s (a server fault); they are 400s.
    assert [s for s, _ in raw] == [400, 400, 400, 413, 400, 400, 400, 405]
    assert "surrogate" in raw[4][1]["error"]["message"]
    assert "nested too deeply" in raw[6][1]["error"]["message"]
    assert all(b["error"]["message"] for _, b in raw)
    assert stats["submitted"] == 0, "invalid requests must never reach the device"


def test_a_full_queue_gets_503_and_shutdown_fails_queued_requests(policy):
    async def go():
        async with serving(policy, max_batch=8, max_wait_ms=LONG_WAIT, max_queue=2) as (
            service,
            http,
        ):
            body = {"prompt": "wait", "max_tokens": 2}
            queued = [asyncio.create_task(post(http, "/v1/completions", body)) for _ in range(2)]
            await service.scheduler.wait_for(lambda s: s["queued"] == 2)
            full = await post(http, "/v1/completions", body)
            await service.scheduler.close()  # what server shutdown does first
            return full, await asyncio.gather(*queued), service.scheduler.stats()

    (status, body, headers), queued, stats = asyncio.run(go())
    assert status == 503 and body["error"]["code"] == "queue_full" and headers["Retry-After"]
    assert [s for s, _, _ in queued] == [503, 503]
    assert stats["rejected_queue_full"] == 1 and stats["batches"] == 0


def test_a_request_that_never_runs_times_out_with_504(policy):
    async def go():
        async with serving(policy, max_batch=8, max_wait_ms=LONG_WAIT, timeout_s=0.3) as (
            service,
            http,
        ):
            reply = await post(http, "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            return reply, service.scheduler.stats()

    (status, body, _), stats = asyncio.run(go())
    assert status == 504 and body["error"]["type"] == "timeout"
    assert stats["timed_out"] == 1 and stats["queued"] == 0 and stats["batches"] == 0


def test_rewrite_returns_query_reasoning_and_results(policy, corpus_dir):
    spec = get_task("scifact", **SHORT)
    searchers = {"scifact": rewrite.Searcher(spec, str(corpus_dir))}

    async def go():
        async with serving(policy, searchers, max_wait_ms=0) as (service, http):
            fallback = await post(
                http,
                "/v1/rewrite",
                {"task": "scifact", "input": "Vitamin D reduces fractures", "max_tokens": 4,
                 "fallback": "original", "top_k": 2},
            )  # fmt: skip
            pico = await post(
                http,
                "/v1/rewrite",
                {"task": "pubmed", "input": {"P": "adults", "I": "aspirin", "O": "stroke"},
                 "search": False, "max_tokens": 4},
            )  # fmt: skip
            return fallback, pico

    (s1, r1, _), (s2, r2, _) = asyncio.run(go())
    assert s1 == 200, r1
    assert r1["task"] == "scifact" and isinstance(r1["completion"], str)
    assert r1["query"] is None and r1["error"], "a random tiny model writes no valid answer"
    assert r1["query_source"] == "original"
    assert r1["results"][0] == {"rank": 1, "id": "d1", "title": "Vitamin D and bones"}
    assert len(r1["results"]) <= 2 and r1["usage"]["completion_tokens"] <= 4
    assert s2 == 200, r2
    assert r2["results"] == [] and r2["query_source"] is None and "reasoning" in r2


def test_rows_with_different_limits_share_a_call(policy):
    rows = [policy.encode("p1"), policy.encode("prompt number 3: xxx")]
    greedy, calls = policy_lib.GenSettings(), policy.calls
    short = policy.generate(rows, greedy, [3, CAP])
    full = policy.generate(rows, greedy, [CAP, CAP])
    assert policy.calls - calls == 2
    assert short[0].completion_tokens <= 3 and full[0].text.startswith(short[0].text)
    assert short[1] == full[1]
    if full[0].completion_tokens > 3:
        assert short[0].finish_reason == "length"
    with pytest.raises(ValueError, match="longer than 256"):
        policy.generate([[1] * 257], greedy, [2])


def test_the_loop_keeps_queueing_while_the_device_is_busy_and_failures_reach_every_caller():
    """A stand-in `generate` that blocks until released shows the scheduler's threading: while
    one batch runs, new requests queue on the event loop and then leave together."""
    import threading

    from deepretrieval_jax.serving.policy import Completion, GenSettings
    from deepretrieval_jax.serving.scheduler import BatchScheduler

    release = threading.Event()

    def generate(rows, settings, limits):
        assert release.wait(30), "the test never released the device"
        if settings.temperature == 1.0:
            raise RuntimeError("device failure")
        return [Completion(f"row {r[0]}", "stop", len(r), 1) for r in rows]

    async def go():
        sched = BatchScheduler(generate, SchedulerConfig(max_batch=2, max_wait_ms=0))
        await sched.start()
        first = asyncio.create_task(sched.submit([1], GenSettings(), 1))
        await sched.wait_for(lambda s: s["running"] == 1)
        more = [asyncio.create_task(sched.submit([k], GenSettings(), 1)) for k in (2, 3)]
        await sched.wait_for(lambda s: s["queued"] == 2)  # queued while the device is busy
        release.set()
        texts = [c.text for c in await asyncio.gather(first, *more)]
        failed = await asyncio.gather(
            *(sched.submit([k], GenSettings(temperature=1.0), 1) for k in (4, 5)),
            return_exceptions=True,
        )
        stats = sched.stats()
        await sched.close()
        return texts, failed, stats

    texts, failed, stats = asyncio.run(go())
    assert texts == ["row 1", "row 2", "row 3"]
    assert [str(e) for e in failed] == ["device failure"] * 2
    assert stats["batch_sizes"] == {"1": 1, "2": 2} and stats["failed"] == 2


def test_warmup_compiles_every_batch_shape_ahead_of_requests(policy):
    settings = policy_lib.GenSettings(stop=("zz",))
    assert policy.warmup([settings], [10]) == 1  # min_batch = max_batch = 8: one shape
    traces = policy._sampler(settings).trace_count
    assert traces == 1
    policy.generate([policy.encode("p1")] * 3, settings, [4] * 3)
    assert policy._sampler(settings).trace_count == traces, "a warmed-up shape recompiled"
