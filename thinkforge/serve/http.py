"""HTTP: the server (threads, connections, the listen backlog), and the handler's framing, auth and routing.
A request goes read_body -> protocol.parse_request -> the batcher (or a stream) -> responses."""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thinkforge.serve.batcher import Batcher
from thinkforge.serve.protocol import BadRequest, Request, parse_request
from thinkforge.serve.responses import completion_body, stream_events

MAX_BODY_BYTES = 16 * 2**20  # 16 MiB: far above any prompt the models here take
SERVER_BACKEND_CONTEXT = 4096  # the context assumed for a model served elsewhere, unless Settings.context says
BODY_TIMEOUT_S = 10.0  # a body that stops short of its Content-Length waits this long, then 408
ROUTES = {"/v1/models": "GET", "/models": "GET", "/health": "GET", "/v1/health": "GET",
          "/v1/completions": "POST", "/v1/chat/completions": "POST"}


@dataclass(frozen=True)
class Settings:
    """What `thinkforge serve` is asked: the name it serves under, where it listens, the key it requires, and
    how chat messages become a prompt (the model's format and system prompt; None = the think/answer one)."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    prompt_format: str = "auto"
    system: str | None = None
    context: int | None = None  # the model's context; None = its max_position_embeddings


class Server(ThreadingHTTPServer):
    """`server_close` ends the open keep-alive connections and waits for their handler threads: a handler
    left blocked on an idle client socket would otherwise wake during interpreter shutdown (an abort)."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 reset clients when 32 connected at once)

    def __init__(self, generator, tokenizer, settings: Settings, log=None):
        self.connections: set = set()  # before binding: a failed bind calls server_close, which reads them
        self.connections_lock = threading.Lock()
        self.batcher = Batcher(generator, generator.batch_size)  # a failed bind closes it too
        super().__init__((settings.host, settings.port), Handler)
        self.generator, self.tokenizer, self.model_name = generator, tokenizer, settings.model_name
        self.api_key, self.prompt_format, self.system = settings.api_key, settings.prompt_format, settings.system
        self.model = generator.model  # the in-process model (log-probs), None for a server backend
        if self.model is None:  # a server backend: it enforces its own context; ours is what the settings say
            self.context, self.vocab_size = settings.context or SERVER_BACKEND_CONTEXT, len(tokenizer)
        else:
            self.context = settings.context or self.model.config.max_position_embeddings
            self.vocab_size = self.model.config.vocab_size
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


def read_body(handler) -> dict:
    """The JSON object of a request's body (HTTP framing). Anything that leaves the connection's framing unknown
    (an oversized, short or unmeasured body) answers and closes the connection."""
    raw_length = handler.headers.get("Content-Length")
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        handler.close_connection = True
        raise BadRequest("chunked request bodies are not supported; send Content-Length", 411)
    try:
        length = int(raw_length or 0)
        if length < 0:
            raise ValueError
    except ValueError:
        handler.close_connection = True
        raise BadRequest(f"invalid Content-Length {raw_length!r}") from None
    if length > MAX_BODY_BYTES:
        handler.close_connection = True
        raise BadRequest(f"request body of {length} bytes is over the {MAX_BODY_BYTES} byte limit", 413)
    handler.connection.settimeout(BODY_TIMEOUT_S)
    try:
        data = handler.rfile.read(length)
    except TimeoutError:
        handler.close_connection = True
        raise BadRequest(f"the body stopped short of its Content-Length ({length} bytes) for {BODY_TIMEOUT_S:.0f} s",
                         408) from None
    finally:
        handler.connection.settimeout(None)
    if len(data) < length:
        handler.close_connection = True
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


def client_left(connection) -> bool:
    """True when the client closed its connection (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: errors and disconnects get their own lines
        pass

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
        if not self.server.api_key or self.headers.get("Authorization", "") == f"Bearer {self.server.api_key}":
            return True
        # The request body was not read: the connection closes, or its bytes would be parsed as the next request.
        self._error(401, "invalid or missing API key", "authentication_error", close=True)
        return False

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
            req = parse_request(read_body(self), route == "/v1/chat/completions", self.server)
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
        """Queue the request for the batcher and wait; a client that leaves meanwhile cancels it."""
        srv = self.server
        srv.batcher.submit(req)
        while not req.done.wait(0.05):
            if client_left(self.connection):
                req.cancelled.set()
                self.close_connection = True
                srv.log(f"client {self.client_address[0]}:{self.client_address[1]} disconnected; its request "
                        f"was cancelled")
                return
        if req.error is not None:
            raise req.error
        if not req.cancelled.is_set():
            self._json(200, completion_body(srv, req))

    def _stream(self, req: Request) -> None:
        self.send_response(200)
        for key, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("Connection", "close")):
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True
        stream_events(self.server, req, lambda data: (self.wfile.write(data), self.wfile.flush()))
