"""Request validation and response pieces of the HTTP API (OpenAI's shapes and error format).

Supported OpenAI subset: `model`, `prompt` (a string, a list of one string, or a list of
token ids) / `messages` (roles system, user, assistant; content a string or a list of text
parts), `max_tokens` (`max_completion_tokens` for chat), `temperature` (0 = greedy), `top_p`,
`n` (1 only), `stop` (a string or up to 4 strings), `seed` and `user` (accepted, not used:
batches share one random stream), `stream` (false only), `frequency_penalty` and
`presence_penalty` (0 only), `logprobs` (null/false only), `echo` (false only).
Unknown fields are rejected with 400, so a client never silently gets different semantics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from aiohttp import web

from deepretrieval_jax.serving.policy import Completion, GenSettings

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "user", "stream",
           "frequency_penalty", "presence_penalty", "logprobs", "top_k"}  # fmt: skip
COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
REWRITE_FIELDS = {"task", "input", "search", "top_k", "fallback", "max_tokens", "temperature",
                  "top_p"}  # fmt: skip
_ROLES = ("system", "user", "assistant")
_STATUS_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 500: "internal_error"}  # fmt: skip


class ApiError(Exception):
    """An error response: HTTP status + OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, type=None, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _STATUS_TYPES.get(status, "error")

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return web.json_response(body, status=self.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure as an OpenAI-shaped JSON error."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text or e.reason
        if e.status == 413:
            message = f"request body too large: {e.text}"
        return ApiError(e.status, message).response()
    except Exception as e:  # a bug or a failed device call: say what, keep serving
        return ApiError(500, f"{type(e).__name__}: {e}").response()


async def json_body(request: web.Request) -> dict:
    try:
        body = await request.json(loads=lambda s: json.loads(s, parse_constant=_no_constant))
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:  # JSON escapes can spell a lone surrogate ("\ud800"), which no tokenizer can encode.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end].encode("utf-8", "backslashreplace").decode()
        raise ApiError(
            400, f"the request body is not valid Unicode: lone surrogate {bad}"
        ) from None
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def check_fields(body: Mapping, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported field(s): {unknown}", param=unknown[0])


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
               list: "a list"}  # fmt: skip


def field(body: Mapping, name: str, kind, default=None, required: bool = False):
    """body[name] checked to be of `kind` (bools are not numbers); `default` when absent/null."""
    if body.get(name) is None:
        if required:
            raise ApiError(400, f"missing required field {name!r}", param=name)
        return default
    value = body[name]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    if not ok:
        raise ApiError(400, f"{name!r} must be {_TYPE_NAMES[kind]}", param=name)
    return value


def int_field(body: Mapping, name: str, default: int, low: int, high: int) -> int:
    value = field(body, name, int, default)
    if not low <= value <= high:
        raise ApiError(400, f"{name!r} must be in [{low}, {high}], got {value}", param=name)
    return value


def sampling(body: Mapping, cap: int, default_tokens: int | None = None, default_temp=1.0):
    """(GenSettings, max_tokens) from the OpenAI sampling fields."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = int_field({name: max_tokens}, name, min(default_tokens or cap, cap), 1, cap)
    temperature = field(body, "temperature", float, default_temp)
    top_p = field(body, "top_p", float, 1.0)
    top_k = field(body, "top_k", int, 0)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    try:
        return GenSettings(temperature, top_p, top_k, tuple(s for s in stop if s)), max_tokens
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def check_openai(body: Mapping, allowed: set[str], model: str) -> None:
    """Unknown fields, the model name and the options this server does not implement."""
    check_fields(body, allowed)
    name = field(body, "model", str, default=model)
    if name != model:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {model!r}",
                       param="model", code="model_not_found")  # fmt: skip
    if field(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if field(body, "stream", bool, False):
        raise ApiError(400, "streaming is not supported; set stream=false", param="stream")
    if field(body, "echo", bool, False):
        raise ApiError(400, "echo is not supported", param="echo")
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if field(body, name, float, 0.0) != 0:
            raise ApiError(400, f"{name} is not supported (must be 0)", param=name)
    field(body, "seed", int)
    field(body, "user", str)


def prompt_field(body: Mapping, vocab_size: int) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        if not all(0 <= t < vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        return prompt
    raise ApiError(
        400, "'prompt' must be a string, a list of one string, or a list of token ids",
        param="prompt",
    )  # fmt: skip


def messages_field(body: Mapping) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}] needs a role in {_ROLES}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):  # fmt: skip
                raise ApiError(400, f"messages[{i}]: only text content parts are supported",
                               param="messages")  # fmt: skip
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}  # fmt: skip
