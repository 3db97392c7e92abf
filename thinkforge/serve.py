"""An OpenAI-compatible HTTP server over any checkpoint: /v1/models, /v1/completions, /v1/chat/completions.

Streaming answers as server-sent events (`data: {...}` lines, then `data: [DONE]`), as the official
`openai` client expects. Binds 127.0.0.1 by default; with an API key, requests must carry
`Authorization: Bearer KEY`. One model, one generation at a time (a lock), many connections (threads).
This is for local use, tests and small teachers; at scale point clients at vLLM or SGLang instead, which
speak the same API.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thinkforge.formats import SYSTEM_PROMPT, render_prompt
from thinkforge.rollout.types import SamplingParams

DEFAULT_MAX_TOKENS = 256


class BadRequest(Exception):
    pass


def render_messages(messages: list[dict], tokenizer, prompt_format: str, system: str | None) -> str:
    """Chat messages -> prompt text: the tokenizer's chat template, else the seeds' Phi-2/Phi-4 layout."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRequest("each message needs 'role' and 'content'")
        if isinstance(m["content"], list):  # content parts: keep the text ones
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
    use_template = prompt_format == "chat_template" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None))
    if use_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fmt = "phi2" if prompt_format == "auto" else prompt_format
    sys_text = next((m["content"] for m in messages if m["role"] == "system"), system)
    turns = [m for m in messages if m["role"] != "system"]
    if fmt == "plain" or len(turns) == 1:
        return render_prompt(turns[-1]["content"], fmt, sys_text)
    # Multi-turn in the seeds' layouts: each turn closed like the system line, then the assistant tag.
    nl, end = ("\n", "\n") if fmt == "phi2" else ("", "<|end|>")
    text = f"<|system|>{nl}{sys_text if sys_text is not None else SYSTEM_PROMPT}{end}"
    for m in turns:
        role = "assistant" if m["role"] == "assistant" else "user"
        text += f"<|{role}|>{nl}{m['content']}{end}"
    return text + f"<|assistant|>{nl}"


def _params(body: dict) -> SamplingParams:
    def num(key, default, cast=float):
        v = body.get(key, default)
        if v is None:
            return default
        try:
            return cast(v)
        except (TypeError, ValueError):
            raise BadRequest(f"'{key}' must be a number") from None

    max_tokens = num("max_completion_tokens", None, int) or num("max_tokens", DEFAULT_MAX_TOKENS, int)
    p = SamplingParams(
        max_new_tokens=max_tokens, temperature=num("temperature", 1.0), top_p=num("top_p", 1.0),
        top_k=max(0, num("top_k", 0, int)), seed=num("seed", 0, int),
    )
    if p.max_new_tokens < 1 or p.temperature < 0 or not 0 < p.top_p <= 1:
        raise BadRequest("need max_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
    return p


def _cut_at_stop(text: str, stop) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Server(ThreadingHTTPServer):
    """`server_close` ends the open keep-alive connections and waits for their handler threads: a handler
    left blocked on an idle client socket would otherwise wake during interpreter shutdown (an abort)."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, addr, generator, tokenizer, model_name: str, api_key: str | None = None,
                 prompt_format: str = "auto", system: str | None = None):
        self.connections: set = set()  # before binding: a failed bind calls server_close, which reads them
        self.connections_lock = threading.Lock()
        super().__init__(addr, Handler)
        self.generator, self.tokenizer, self.model_name = generator, tokenizer, model_name
        self.api_key, self.prompt_format, self.system = api_key, prompt_format, system
        self.lock = threading.Lock()

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        with self.connections_lock:
            open_now = list(self.connections)
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the handler's read returns: its thread ends
            except OSError:
                pass
        super().server_close()  # joins the handler threads


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet; the CLI prints one line per request instead
        pass

    # ---- plumbing
    def _json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", close: bool = False) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}}, close)

    def _authorized(self) -> bool:
        if not self.server.api_key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.server.api_key}":
            return True
        # The request body was not read: the connection closes, or its bytes would be parsed as the next request.
        self._error(401, "invalid or missing API key", "authentication_error", close=True)
        return False

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _sse(self, obj) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    # ---- routes
    def do_GET(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "thinkforge"}]})
        elif self.path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        if not self._authorized():
            return
        try:
            body = self._body()
            route = self.path.rstrip("/")
            if route == "/v1/chat/completions":
                self._complete(body, chat=True)
            elif route == "/v1/completions":
                self._complete(body, chat=False)
            else:
                self._error(404, f"no route {self.path}")
        except BadRequest as e:
            self._error(400, str(e))
        except Exception as e:  # a generation failure must answer 500, so clients can retry
            self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")

    def _complete(self, body: dict, chat: bool) -> None:
        srv = self.server
        params = _params(body)
        n = int(body.get("n") or 1)
        if not 1 <= n <= 64:
            raise BadRequest("'n' must be between 1 and 64")
        if chat:
            prompts = [render_messages(body.get("messages"), srv.tokenizer, srv.prompt_format, srv.system)]
        else:
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise BadRequest("'prompt' must be a string or a list of strings")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        base = {"id": rid, "created": created, "model": srv.model_name}
        if body.get("stream"):
            if len(prompts) * n != 1:
                raise BadRequest("streaming supports one prompt and n=1")
            return self._stream(prompts[0], params, body.get("stop"), chat, base)
        with srv.lock:
            completions = srv.generator.generate(prompts, n, params)
        choices, n_out = [], 0
        for i, c in enumerate(completions):
            text, stopped = _cut_at_stop(c.text, body.get("stop"))
            finish = "stop" if stopped else c.finish_reason
            n_out += len(c.token_ids)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                                "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
        n_in = sum(len(srv.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts) * n
        self._json(200, {**base, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                         "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    def _stream(self, prompt: str, params: SamplingParams, stop, chat: bool, base: dict) -> None:
        srv = self.server
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {**base, "object": obj, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return {**base, "object": obj, "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        self._sse_start()
        if chat:
            self._sse(chunk(None, None, role=True))
        sent, finish = "", "length"
        n_tokens = 0
        with srv.lock:
            for piece in srv.generator.stream(prompt, params):
                n_tokens += 1
                full, stopped = _cut_at_stop(sent + piece, stop)
                if full[len(sent):]:
                    self._sse(chunk(full[len(sent):], None))
                sent = full
                if stopped:
                    finish = "stop"
                    break
            else:
                ids = srv.tokenizer(sent, add_special_tokens=False).input_ids
                finish = "stop" if len(ids) < params.max_new_tokens else "length"
        self._sse(chunk(None, finish))
        self._sse("[DONE]")


def make_server(generator, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, prompt_format: str = "auto", system: str | None = None) -> Server:
    return Server((host, port), generator, tokenizer, model_name, api_key, prompt_format, system)
