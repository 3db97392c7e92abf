"""Request parsing and validation: a body becomes a `Request` (prompts as token ids, n, sampling settings with
the seed resolved) or a BadRequest with the status and OpenAI error shape the client gets."""

from __future__ import annotations

import math
import secrets
import threading
from dataclasses import dataclass, field

from thinkforge.formats import render_messages
from thinkforge.rollout.types import Completion, SamplingParams, encode

DEFAULT_MAX_TOKENS = 256
MAX_N = 64
MAX_TOP_LOGPROBS = 20


class BadRequest(Exception):
    """A client error: answered with `status` and the message, in the OpenAI error shape."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


# ---------------------------------------------------------------- request validation


def _int(body: dict, key: str, default, low: int, high: int | None = None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise BadRequest(f"'{key}' must be an integer, got {v!r}", param=key)
    v = int(v)
    if v < low or (high is not None and v > high):
        raise BadRequest(f"'{key}' must be {'between ' + str(low) + ' and ' + str(high) if high is not None else 'at least ' + str(low)}, got {v}", param=key)
    return v


def _float(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"'{key}' must be a finite number, got {v!r}", param=key)
    if v < low or v > high or (low_open and v == low):
        raise BadRequest(f"'{key}' must be in {'(' if low_open else '['}{low}, {high}], got {v}", param=key)
    return float(v)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise BadRequest("'stop' must be a string or a list of strings", param="stop")


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
        if any(p.get("type", "text") != "text" for p in content):
            raise BadRequest(f"messages[{i}].content: only text parts are supported", param="messages")
        return "".join(p.get("text", "") for p in content)
    if content is None and m.get("role") == "assistant":
        return ""
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}",
                     param="messages")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}].role must be system, user or assistant, got {role!r}", param="messages")
        out.append({"role": role, "content": _content(m, i)})
    return out


def _prompts(body: dict, vocab: int) -> list[str | list[int]]:
    """/v1/completions `prompt`: a string, a list of strings, a list of token ids, or a list of those lists."""
    p = body.get("prompt")

    def ids_ok(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(p, str):
        prompts = [p]
    elif ids_ok(p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or ids_ok(x) for x in p):
        prompts = p
    else:
        raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                         param="prompt")
    for x in prompts:
        if isinstance(x, list) and any(not 0 <= t < vocab for t in x):
            raise BadRequest(f"'prompt' holds a token id outside the vocabulary (0..{vocab - 1})", param="prompt")
    return prompts


@dataclass
class Request:
    """A validated completion request: prompts as token ids, n, sampling settings (the seed resolved)."""

    chat: bool
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stop: list[str]
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; None = no log-probs
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] | None = None
    error: BaseException | None = None


def parse_request(body: dict, chat: bool, srv) -> Request:
    """The request a body asks for, or BadRequest (or a 404 for another model's name). srv: the http.Server
    (its model name, tokenizer, prompt format and system prompt, context, vocabulary, in-process model)."""
    model = body.get("model")
    if model is not None and model != srv.model_name:
        raise BadRequest(f"The model `{model}` does not exist; this server serves `{srv.model_name}`", 404,
                         "NotFoundError", "model")
    n = _int(body, "n", 1, 1, MAX_N)
    stream = body.get("stream", False)
    echo = body.get("echo", False)
    for key, v in (("stream", stream), ("echo", echo)):
        if not isinstance(v, bool):
            raise BadRequest(f"'{key}' must be true or false, got {v!r}", param=key)
    if chat:
        if echo:
            raise BadRequest("'echo' is for /v1/completions", param="echo")
        try:
            text = render_messages(_messages(body), srv.tokenizer, srv.prompt_format, srv.system)
        except ValueError as e:
            raise BadRequest(str(e), param="messages") from None
        prompts = [encode(srv.tokenizer, text)]
        want = body.get("logprobs", False)
        if not isinstance(want, bool):
            raise BadRequest("'logprobs' must be true or false on chat completions", param="logprobs")
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        logprobs = top if want else None
    else:
        prompts = [encode(srv.tokenizer, p) for p in _prompts(body, srv.vocab_size)]
        logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    if any(not p for p in prompts):
        raise BadRequest("a prompt is empty", param="prompt" if not chat else "messages")
    longest = max(len(p) for p in prompts)
    room = srv.context - longest
    max_tokens = _int(body, "max_completion_tokens", None, 0) if body.get("max_completion_tokens") is not None \
        else _int(body, "max_tokens", None, 0)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    if max_tokens == 0 and not echo:
        raise BadRequest("'max_tokens' must be at least 1 (0 only with echo, to score a prompt)", param="max_tokens")
    if longest + max_tokens > srv.context or room < 1:
        raise BadRequest(f"This model's maximum context length is {srv.context} tokens. However, you requested "
                         f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
                         f"Please reduce the prompt or max_tokens.", param="max_tokens")
    if (logprobs is not None or echo) and srv.model is None:
        raise BadRequest("log-probs and echo need the in-process model (rollout.backend=hf)", param="logprobs")
    if stream and (len(prompts) * n != 1 or echo or logprobs is not None):
        raise BadRequest("streaming supports one prompt, n=1, without echo or log-probs", param="stream")
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, low_open=True), top_k=max(0, _int(body, "top_k", 0, -1)),
        seed=(seed if seed is not None else secrets.randbits(63)) % 2**63,
    )
    return Request(chat, prompts, n, params, _stop(body), stream, echo, logprobs)
