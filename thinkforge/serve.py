"""An OpenAI-compatible HTTP server over any checkpoint: /v1/models, /v1/completions, /v1/chat/completions.

What a client can lean on:
- Every request is validated before it reaches the model; a bad one gets a 4xx JSON error in the OpenAI shape
  (`{"error": {"message", "type", "param", "code"}}`): wrong types, n outside 1..64, a non-finite temperature
  (400), an unknown model (404), another method (405), a body that stops short of its Content-Length (408), an
  oversized body (413), a prompt plus max_tokens above the model's context (400, as vLLM says it).
- Concurrent requests with the same sampling settings are generated together in one batch (a batcher thread
  owns the model). Each request keeps its own random stream, keyed by its seed, so batched or alone it draws
  the same samples; without a `seed` each request gets a fresh one.
- A client that disconnects cancels its request: a batch whose clients all left stops at the next token, a
  stream stops when its write fails. The log gets one line, not a traceback.
- Prompts as token ids, and `logprobs` / `echo` on /v1/completions as vLLM answers them (the prompt's
  log-probs with echo, top-k alternatives), so log-likelihood evaluation clients (lm-eval's local-completions)
  run unchanged; chat takes `logprobs: true` and `top_logprobs`.
- Streams as server-sent events (`data: {...}` lines, then `data: [DONE]`); binds 127.0.0.1 by default; with
  an API key, requests must carry `Authorization: Bearer KEY`.
At scale point clients at vLLM or SGLang instead, which speak the same API.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import secrets
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thinkforge.formats import SYSTEM_PROMPT, render_prompt
from thinkforge.rollout.types import Completion, SamplingParams, encode

DEFAULT_MAX_TOKENS = 256
MAX_N = 64
MAX_BODY_BYTES = 16 * 2**20  # 16 MiB: far above any prompt the models here take
BODY_TIMEOUT_S = 10.0  # a body that stops short of its Content-Length waits this long, then 408
MAX_TOP_LOGPROBS = 20
BATCH_WINDOW_S = 0.003  # how long the batcher waits for more requests after the first


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


def parse_request(body: dict, chat: bool, srv: Server) -> Request:
    """The request a body asks for, or BadRequest (or a 404 for another model's name)."""
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
        text = render_messages(_messages(body), srv.tokenizer, srv.prompt_format, srv.system)
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


def render_messages(messages: list[dict], tokenizer, prompt_format: str, system: str | None) -> str:
    """Chat messages -> prompt text: the tokenizer's chat template, else the seeds' Phi-2/Phi-4 layout."""
    use_template = prompt_format == "chat_template" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None))
    if use_template:  # the system prompt training used, unless the client sent its own (it was dropped here before)
        if not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": SYSTEM_PROMPT if system is None else system}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fmt = "phi2" if prompt_format == "auto" else prompt_format
    sys_text = next((m["content"] for m in messages if m["role"] == "system"), system)
    turns = [m for m in messages if m["role"] != "system"]
    if not turns:
        raise BadRequest("'messages' needs a user message", param="messages")
    if fmt == "plain" or len(turns) == 1:
        return render_prompt(turns[-1]["content"], fmt, sys_text)
    # Multi-turn in the seeds' layouts: each turn closed like the system line, then the assistant tag.
    nl, end = ("\n", "\n") if fmt == "phi2" else ("", "<|end|>")
    text = f"<|system|>{nl}{sys_text if sys_text is not None else SYSTEM_PROMPT}{end}"
    for m in turns:
        role = "assistant" if m["role"] == "assistant" else "user"
        text += f"<|{role}|>{nl}{m['content']}{end}"
    return text + f"<|assistant|>{nl}"


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ---------------------------------------------------------------- log-probs (echo, logprobs)


def token_logprobs(model, ids: list[int], top: int):
    """For each token of `ids` after the first: (its log-prob, [(alternative id, log-prob)] * top), from one
    forward pass with the model's raw distribution (vLLM's default logprobs mode)."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids], device=model.device)
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
    chosen = logp.gather(1, x[0, 1:, None])[:, 0].tolist()
    alts = [[] for _ in chosen]
    if top:
        values, indices = logp.topk(top, dim=-1)
        alts = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return chosen, alts


def logprobs_block(tokenizer, model, prompt: list[int], completion: list[int], top: int, echo: bool, chat: bool):
    """The `logprobs` field of one choice: the legacy completions shape (tokens, token_logprobs, top_logprobs,
    text_offset; with echo the prompt's tokens first, the very first without a log-prob) or chat's `content`
    list. As vLLM, each position's alternatives include the token itself."""
    ids = [*prompt, *completion]
    chosen, alts = token_logprobs(model, ids, top) if len(ids) > 1 else ([], [])
    first = 0 if echo else len(prompt)
    tokens, lps, tops = [], [], []
    for k in range(first, len(ids)):
        tokens.append(tokenizer.decode([ids[k]]))
        if k == 0:
            lps.append(None)
            tops.append(None)
            continue
        options = {tokenizer.decode([i]): v for i, v in alts[k - 1]}
        options[tokens[-1]] = chosen[k - 1]
        lps.append(chosen[k - 1])
        tops.append(options)
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode())}
                                              for k, v in sorted(o.items(), key=lambda kv: -kv[1])][:top]}
                            for t, lp, o in zip(tokens, lps, tops, strict=True)]}
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------- batching


class Batcher:
    """The one thread that runs the model: it takes the oldest request and every queued one with the same
    settings (n, temperature, top-p, top-k, max tokens) up to `max_rows` sequences, and generates them in one
    call; each prompt keeps its request's random stream (seed, position). `lock` is held while the model runs
    (streams take it too)."""

    def __init__(self, generator, max_rows: int):
        self.generator, self.max_rows = generator, max(1, max_rows)
        self.lock = threading.Lock()
        self.pending: collections.deque[Request] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        self.batches: collections.deque[int] = collections.deque(maxlen=10_000)  # requests per batch (recent)
        self.thread = threading.Thread(target=self._run, name="thinkforge-batcher", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.ready:
            self.pending.append(req)
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join(timeout=30)

    @staticmethod
    def _key(req: Request):
        p = req.params
        return req.n, p.temperature, p.top_p, p.top_k, p.max_new_tokens

    def _take(self) -> list[Request] | None:
        with self.ready:
            while not self.pending and not self.closed:
                self.ready.wait()
            if self.closed:
                return None
        time.sleep(BATCH_WINDOW_S)  # let requests that arrive together meet
        with self.ready:
            first = self.pending[0]
            batch, rest, rows = [], collections.deque(), 0
            while self.pending:
                req = self.pending.popleft()
                size = len(req.prompts) * req.n
                if self._key(req) == self._key(first) and (not batch or rows + size <= self.max_rows):
                    batch.append(req)
                    rows += size
                else:
                    rest.append(req)
            self.pending = rest
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            for r in batch:
                if r.cancelled.is_set():  # its client left while it waited
                    r.done.set()
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            self.batches.append(len(batch))
            prompts, streams = [], []
            for r in batch:
                prompts += r.prompts
                streams += [r.params.stream(i) for i in range(len(r.prompts))]
            params = replace(batch[0].params, streams=tuple(streams))
            try:
                with self.lock:
                    if hasattr(self.generator, "interrupt"):
                        self.generator.interrupt = functools.partial(_all_cancelled, batch)
                    try:
                        out = self.generator.generate(prompts, batch[0].n, params) if params.max_new_tokens else \
                            [Completion(i, "", (), "length") for i in range(len(prompts)) for _ in range(batch[0].n)]
                    finally:
                        if hasattr(self.generator, "interrupt"):
                            self.generator.interrupt = None
            except Exception as e:  # noqa: BLE001 - answered as a 500 to each of the batch's clients
                for r in batch:
                    r.error = e
                    r.done.set()
                continue
            offset = 0
            for r in batch:
                k = len(r.prompts)
                r.result = [replace(c, prompt_index=c.prompt_index - offset) for c in out
                            if offset <= c.prompt_index < offset + k]
                offset += k
                r.done.set()


def _all_cancelled(batch: list[Request]) -> bool:
    return all(r.cancelled.is_set() for r in batch)


# ---------------------------------------------------------------- server


class Server(ThreadingHTTPServer):
    """`server_close` ends the open keep-alive connections and waits for their handler threads: a handler
    left blocked on an idle client socket would otherwise wake during interpreter shutdown (an abort)."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 reset clients when 32 connected at once)

    def __init__(self, addr, generator, tokenizer, model_name: str, api_key: str | None = None,
                 prompt_format: str = "auto", system: str | None = None, context: int | None = None,
                 log=None):
        self.connections: set = set()  # before binding: a failed bind calls server_close, which reads them
        self.connections_lock = threading.Lock()
        self.batcher = Batcher(generator, getattr(generator, "batch_size", 16))  # a failed bind closes it too
        super().__init__(addr, Handler)
        self.generator, self.tokenizer, self.model_name = generator, tokenizer, model_name
        self.api_key, self.prompt_format, self.system = api_key, prompt_format, system
        self.model = getattr(generator, "model", None)  # the in-process model (log-probs), None for a server backend
        config = getattr(self.model, "config", None)
        self.context = context or getattr(config, "max_position_embeddings", None) or 4096
        self.vocab_size = getattr(config, "vocab_size", None) or len(tokenizer)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        """A client that went away is one log line; anything else keeps its traceback (a bug)."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.log(f"client {client_address[0]}:{client_address[1]} disconnected ({type(error).__name__})")
        else:
            super().handle_error(request, client_address)

    def server_close(self):
        with self.connections_lock:
            open_now = list(self.connections)
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the handler's read returns: its thread ends
            except OSError:
                pass
        super().server_close()  # joins the handler threads
        self.batcher.close()


ROUTES = {"/v1/models": "GET", "/models": "GET", "/health": "GET", "/v1/health": "GET",
          "/v1/completions": "POST", "/v1/chat/completions": "POST"}


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: errors and disconnects get their own lines
        pass

    # ---- plumbing
    def _json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", ROUTES.get(self.path.split("?")[0].rstrip("/") or "/", "GET, POST"))
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", close: bool = False,
               param: str | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}}, close)

    def _authorized(self) -> bool:
        if not self.server.api_key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.server.api_key}":
            return True
        # The request body was not read: the connection closes, or its bytes would be parsed as the next request.
        self._error(401, "invalid or missing API key", "authentication_error", close=True)
        return False

    def _body(self) -> dict:
        """The JSON object of the body. Anything that leaves the connection's framing unknown (an oversized,
        short or unmeasured body) answers and closes the connection."""
        raw_length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise BadRequest("chunked request bodies are not supported; send Content-Length", 411)
        try:
            length = int(raw_length or 0)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"invalid Content-Length {raw_length!r}") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"request body of {length} bytes is over the {MAX_BODY_BYTES} byte limit", 413)
        self.connection.settimeout(BODY_TIMEOUT_S)
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise BadRequest(f"the body stopped short of its Content-Length ({length} bytes) for {BODY_TIMEOUT_S:.0f} s",
                             408) from None
        finally:
            self.connection.settimeout(None)
        if len(data) < length:
            self.close_connection = True
            raise BadRequest(f"the body ended before its Content-Length ({len(data)} of {length} bytes)")
        try:
            body = json.loads(data or b"{}")
        except ValueError:
            raise BadRequest("request body is not valid JSON") from None
        except RecursionError:  # a body nested deeper than the parser's stack (it was a 500)
            raise BadRequest("request body is nested too deeply to be a request") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _client_left(self) -> bool:
        """True when the client closed its connection (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ---- routes
    def _route(self, method: str) -> str | None:
        route = self.path.split("?")[0].rstrip("/")
        if route not in ROUTES:
            self._error(404, f"no route {self.path}", "NotFoundError", close=method == "POST")
            return None
        if ROUTES[route] != method:
            self._error(405, f"{method} is not allowed on {route}; use {ROUTES[route]}", close=method != "GET")
            return None
        return route

    def do_GET(self):
        if not self._authorized() or (route := self._route("GET")) is None:
            return
        if route.endswith("models"):
            self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "thinkforge",
                 "max_model_len": self.server.context}]})
        else:
            self._json(200, {"status": "ok"})

    def _not_allowed(self):
        self.close_connection = True  # the body, if any, is not read
        route = self.path.split("?")[0].rstrip("/")
        self._error(405 if route in ROUTES else 404, f"{self.command} is not allowed on {self.path}", close=True)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def do_POST(self):
        if not self._authorized() or (route := self._route("POST")) is None:
            return
        try:
            req = parse_request(self._body(), route == "/v1/chat/completions", self.server)
            if req.stream:
                return self._stream(req)
            self._complete(req)
        except BadRequest as e:
            self._error(e.status, str(e), e.kind, close=self.close_connection, param=e.param)
        except (ConnectionError, TimeoutError):
            raise  # the client left: Server.handle_error logs one line
        except Exception as e:  # a generation failure answers 500, so clients can retry
            self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")

    def _complete(self, req: Request) -> None:
        srv = self.server
        srv.batcher.submit(req)
        while not req.done.wait(0.05):
            if self._client_left():
                req.cancelled.set()
                self.close_connection = True
                srv.log(f"client {self.client_address[0]}:{self.client_address[1]} disconnected; its request "
                        f"was cancelled")
                return
        if req.error is not None:
            raise req.error
        if req.cancelled.is_set():
            return
        choices, n_out = [], 0
        for i, c in enumerate(req.result):
            text, stopped = _cut_at_stop(c.text, req.stop)
            finish = "stop" if stopped else c.finish_reason
            n_out += len(c.token_ids)
            prompt = req.prompts[c.prompt_index]
            block = None
            if req.logprobs is not None or req.echo:
                kept = list(c.token_ids) if not stopped else encode(srv.tokenizer, text)
                block = logprobs_block(srv.tokenizer, srv.model, prompt, kept, req.logprobs or 0, req.echo, req.chat)
            if req.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish, "logprobs": block})
            else:
                if req.echo:
                    text = srv.tokenizer.decode(prompt) + text
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": block})
        n_in = sum(len(p) for p in req.prompts) * req.n
        self._json(200, {"id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24],
                         "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
                         "model": srv.model_name, "choices": choices,
                         "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    def _stream(self, req: Request) -> None:
        srv = self.server
        base = {"id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": srv.model_name, "object": "chat.completion.chunk" if req.chat else "text_completion"}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if req.chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        def send(obj) -> None:
            payload = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if req.chat:
            send(chunk(None, None, role=True))
        sent, finish = "", "length"
        with srv.batcher.lock:
            pieces = srv.generator.stream(req.prompts[0], req.params)
            try:
                for piece in pieces:
                    full, stopped = _cut_at_stop(sent + piece, req.stop)
                    if full[len(sent):]:
                        send(chunk(full[len(sent):], None))  # a client that left raises here: generation stops
                    sent = full
                    if stopped:
                        finish = "stop"
                        break
                else:
                    ids = srv.tokenizer(sent, add_special_tokens=False).input_ids
                    finish = "stop" if len(ids) < req.params.max_new_tokens else "length"
            finally:
                pieces.close()  # stops the generation at its next token
        send(chunk(None, finish))
        send("[DONE]")


def make_server(generator, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, prompt_format: str = "auto", system: str | None = None,
                context: int | None = None, log=None) -> Server:
    return Server((host, port), generator, tokenizer, model_name, api_key, prompt_format, system, context, log)
