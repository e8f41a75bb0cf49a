"""The HTTP service (aiohttp): `POST /v1/rewrite` and an OpenAI-compatible subset.

Routes (JSON in, JSON out; docs/serving.md has the full API):
  POST /v1/rewrite            {"task", "input", ...} -> {"query", "reasoning", "results", ...}
  POST /v1/completions        OpenAI text completions (prompt, max_tokens, temperature, ...)
  POST /v1/chat/completions   OpenAI chat completions (messages, ...)
  GET  /v1/models, /healthz, /v1/stats

Invariants:
- Generation goes through one `BatchScheduler` (batched device calls in a worker thread);
  searches run on the event loop through the task's async backend.
- Limits: request bodies over `max_body_bytes` get 413; prompts over `max_input_tokens` get
  400; `max_tokens` above `max_new_tokens` get 400; a full queue gets 503 (with Retry-After),
  a request not done within `timeout_s` gets 504. Malformed JSON, unknown fields' wrong types,
  unknown tasks and unsupported options (n > MAX_N, echo, top logprobs) get 400; an unknown
  model gets 404. `n` choices are n scheduler requests; `stream=true` sends the finished
  choices as server-sent events (serving/choices.py).
  Every error body is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
- Binds to 127.0.0.1 unless told otherwise (`launch/serve.py --host`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from deepretrieval_jax.data.tasks import TaskSpec
from deepretrieval_jax.serving import choices as choices_lib
from deepretrieval_jax.serving import openai_api as oa
from deepretrieval_jax.serving import rewrite
from deepretrieval_jax.serving.policy import GenSettings, Policy, cut_at_stop
from deepretrieval_jax.serving.scheduler import (
    BatchScheduler,
    QueueFull,
    RequestTimeout,
    SchedulerClosed,
    SchedulerConfig,
)

ApiError = oa.ApiError
SERVICE_KEY = web.AppKey("service", object)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    max_input_tokens: int = 2048  # prompt tokens (capped by the policy's largest bucket)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    default_completion_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    max_results: int = 100  # /v1/rewrite top_k cap
    scheduler: SchedulerConfig = SchedulerConfig()


class Service:
    """The policy, its scheduler, the served tasks and their searchers."""

    def __init__(
        self,
        policy: Policy,
        config: ServerConfig = ServerConfig(),
        tasks: Mapping[str, TaskSpec] | None = None,
        searchers: Mapping[str, rewrite.Searcher] | None = None,
        stops: Mapping[str, tuple[str, ...]] | None = None,
    ):
        self.policy, self.config = policy, config
        self.tasks = dict(tasks or {})
        self.stops = dict(stops or {})  # per task: the trained run's stop strings
        self.searchers = dict(searchers or {})
        self.scheduler = BatchScheduler(policy.generate, config.scheduler)
        self.max_input_tokens = min(config.max_input_tokens, policy.max_prompt_tokens)

    async def generate(self, prompt: str | list[int], settings: GenSettings, max_tokens: int):
        tokens = self.policy.encode(prompt) if isinstance(prompt, str) else prompt
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(tokens) > self.max_input_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(tokens)} tokens; the limit is {self.max_input_tokens}",
                code="context_length_exceeded",
                param="prompt",
            )
        try:
            return await self.scheduler.submit(tokens, settings, max_tokens)
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_overloaded", code="queue_full") from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), type="server_unavailable") from None
        except RequestTimeout as e:
            raise ApiError(504, str(e), type="timeout") from None

    # ---------------------------------------------------------------- handlers
    async def rewrite(self, request: web.Request) -> web.Response:
        body = await oa.json_body(request)
        oa.check_fields(body, oa.REWRITE_FIELDS)
        name = oa.field(body, "task", str, required=True)
        if name not in self.tasks:
            raise ApiError(
                400, f"unknown task {name!r}; served: {sorted(self.tasks)}", param="task"
            )
        spec = self.tasks[name]
        if "input" not in body:
            raise ApiError(400, "missing required field 'input'", param="input")
        try:
            inp = rewrite.parse_input(spec, body["input"])
        except rewrite.InputError as e:
            raise ApiError(400, str(e), param="input") from None
        want_search = oa.field(body, "search", bool, default=True)
        top_k = oa.int_field(body, "top_k", 10, 1, self.config.max_results)
        fallback = oa.field(body, "fallback", str, default="none")
        if fallback not in ("none", "original"):
            raise ApiError(400, "fallback must be 'none' or 'original'", param="fallback")
        no_top_k = {k: v for k, v in body.items() if k != "top_k"}  # top_k = results here
        settings, max_tokens = oa.sampling(no_top_k, self.policy.max_new_tokens, default_temp=0.0)
        stop = self.stops.get(name, ())
        settings = dataclasses.replace(settings, stop=rewrite.stop_strings(stop))
        prompt = rewrite.render_prompt(spec, inp, self.policy.tokenizer)
        searcher = self.searchers.get(name) if want_search else None
        if want_search and searcher is None:
            raise ApiError(400, f"search is not enabled for task {name!r}", param="search")
        completion = await self.generate(prompt, settings, max_tokens)
        text = rewrite.close_answer(spec, completion.text, stop)
        out = await rewrite.finish(spec, inp, text, searcher, top_k, fallback)
        out["finish_reason"] = completion.finish_reason
        out["usage"] = oa.usage(completion)
        return web.json_response(out)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await oa.json_body(request)
        oa.check_openai(body, oa.COMPLETION_FIELDS, self.policy.name)
        out = oa.output_options(body, chat=False)
        prompt = oa.prompt_field(body, self.policy.num_ids)
        settings, max_tokens = oa.sampling(
            body, self.policy.max_new_tokens, self.config.default_completion_tokens
        )
        completions = await self._generate_n(prompt, settings, max_tokens, out.n)
        head = self._head("cmpl", "text_completion")
        choices, pieces = [], []
        for i, c in enumerate(completions):
            text, reason, segs = self._cut(c, settings, out)
            lp = choices_lib.completion_logprobs(self.policy, c, segs) if out.logprobs else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
            pieces.append((c, segs))
        if not out.stream:
            return web.json_response({**head, "choices": choices, "usage": _usage(completions)})

        def chunks():
            for i, (c, segs) in enumerate(pieces):
                for seg in segs:
                    lp = None
                    if out.logprobs:
                        lp = choices_lib.completion_logprobs(self.policy, c, [seg])
                    yield {**head, "choices": [{"index": i, "text": seg.text, "logprobs": lp,
                                                "finish_reason": None}]}  # fmt: skip
                last = {"index": i, "text": "", "logprobs": None,
                        "finish_reason": choices[i]["finish_reason"]}  # fmt: skip
                yield {**head, "choices": [last]}
            if out.include_usage:
                yield {**head, "choices": [], "usage": _usage(completions)}

        return await _stream(request, chunks())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await oa.json_body(request)
        oa.check_openai(body, oa.CHAT_FIELDS, self.policy.name)
        out = oa.output_options(body, chat=True)
        messages = oa.messages_field(body)
        try:
            prompt = self.policy.render_chat(messages)
        except Exception as e:  # a template that rejects the conversation (roles, order)
            raise ApiError(400, f"the chat template rejected the messages: {e}") from None
        settings, max_tokens = oa.sampling(body, self.policy.max_new_tokens)
        completions = await self._generate_n(prompt, settings, max_tokens, out.n)
        choices, pieces = [], []
        for i, c in enumerate(completions):
            text, reason, segs = self._cut(c, settings, out)
            lp = choices_lib.chat_logprobs(self.policy, c, segs) if out.logprobs else None
            message = {"role": "assistant", "content": text}
            choices.append(
                {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}
            )
            pieces.append((c, segs))
        if not out.stream:
            head = self._head("chatcmpl", "chat.completion")
            return web.json_response({**head, "choices": choices, "usage": _usage(completions)})
        head = self._head("chatcmpl", "chat.completion.chunk")

        def chunks():
            for i, (c, segs) in enumerate(pieces):
                first = {"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}  # fmt: skip
                yield {**head, "choices": [first]}
                for seg in segs:
                    lp = choices_lib.chat_logprobs(self.policy, c, [seg]) if out.logprobs else None
                    yield {**head, "choices": [{"index": i, "delta": {"content": seg.text},
                                                "logprobs": lp, "finish_reason": None}]}  # fmt: skip
                last = {"index": i, "delta": {}, "logprobs": None,
                        "finish_reason": choices[i]["finish_reason"]}  # fmt: skip
                yield {**head, "choices": [last]}
            if out.include_usage:
                yield {**head, "choices": [], "usage": _usage(completions)}

        return await _stream(request, chunks())

    async def _generate_n(self, prompt, settings: GenSettings, max_tokens: int, n: int):
        """`n` completions of one prompt: n requests of the scheduler (they batch together)."""
        return await asyncio.gather(
            *(self.generate(prompt, settings, max_tokens) for _ in range(n))
        )

    def _cut(self, completion, settings: GenSettings, out: oa.OutputOptions):
        """(text cut at the stop string, finish reason, token segments when needed)."""
        text, hit = cut_at_stop(completion.text, settings.stop)
        reason = "stop" if hit else completion.finish_reason
        need = out.stream or out.logprobs
        segs = choices_lib.segments(self.policy, completion, text) if need else []
        return text, reason, segs

    def _head(self, prefix: str, obj: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj,
                "created": int(time.time()), "model": self.policy.name}  # fmt: skip

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.policy.name, "object": "model", "created": 0, "owned_by": "local"}
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.policy.name,
                                  "tasks": sorted(self.tasks)})  # fmt: skip

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.scheduler.stats(), "sampler_calls": self.policy.calls})


def _usage(completions) -> dict[str, int]:
    """Usage of `n` choices: the prompt counted once, the completions summed."""
    prompt = completions[0].prompt_tokens
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}  # fmt: skip


async def _stream(request: web.Request, chunks) -> web.StreamResponse:
    """Sends `chunks` as server-sent events (`data: {...}` ... `data: [DONE]`)."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for event in choices_lib.sse(chunks):
        await response.write(event)
    await response.write_eof()
    return response


def make_app(service: Service) -> web.Application:
    """The aiohttp application; the scheduler starts and stops with it."""
    app = web.Application(
        client_max_size=service.config.max_body_bytes, middlewares=[oa.error_middleware]
    )
    app.router.add_post("/v1/rewrite", service.rewrite)
    app.router.add_post("/v1/completions", service.completions)
    app.router.add_post("/v1/chat/completions", service.chat)
    app.router.add_get("/v1/models", service.models)
    app.router.add_get("/v1/stats", service.stats)
    app.router.add_get("/healthz", service.health)

    async def lifecycle(app: web.Application):
        await service.scheduler.start()
        yield
        await service.scheduler.close()
        for s in service.searchers.values():
            await s.close()

    app.cleanup_ctx.append(lifecycle)
    app[SERVICE_KEY] = service
    return app


def build_service(
    policy: Policy,
    task_names: list[str],
    config: ServerConfig = ServerConfig(),
    data_dir: str | None = None,
    search: bool = True,
    protocol=None,
) -> Service:
    """A Service for `task_names` with their search backends (when `search`); the task the
    policy was trained on is prompted as in training (`protocol`: `serving.protocol.find`).
    No task names: the protocol's task."""
    from deepretrieval_jax.serving import protocol as protocol_lib

    resolved = {}
    for name in task_names or [None]:
        spec, stop = protocol_lib.resolve(name, protocol)
        resolved[spec.name] = (spec, stop)
    tasks = {n: spec for n, (spec, _) in resolved.items()}
    stops = {n: stop for n, (_, stop) in resolved.items()}
    searchers: dict[str, Any] = {}
    if search:
        searchers = {n: rewrite.Searcher(spec, data_dir) for n, spec in tasks.items()}
    return Service(policy, config, tasks, searchers, stops)
