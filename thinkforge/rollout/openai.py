"""A client for any OpenAI-compatible server: vLLM, SGLang, DeepSeek's API, `thinkforge serve`.

Standard library HTTP only (the one door for HTTP, STYLE 9). Bounded concurrency (a thread pool), per
request timeouts, retries with exponential backoff and jitter on connection errors, timeouts, 429 and 5xx
(honouring Retry-After); other 4xx are the user's to fix and fail at once with the server's message.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from thinkforge.errors import UserError
from thinkforge.rollout.types import Completion, SamplingParams

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class ServerError(UserError):
    """The server kept failing (or could not be reached) after every retry, or refused the request (a 4xx):
    one line for the user. `status`: the last HTTP status (None: no answer at all); `detail`: what it said."""

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status, self.detail = status, detail


class OpenAIClient:
    """The HTTP client of the OpenAI-compatible routes: a teacher's or evaluation's server by its model name
    (`chat`, and `generate` of the Sampler interface), and the transport of the vLLM rollout backend's requests
    (`post`; its health probe while the server starts is its own). `unreachable`: what the
    one-line error adds when the server cannot be reached (where its log is, which setting names it)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0, *,
                 max_retries: int = 5, backoff: float = 1.0, concurrency: int = 8, batch_size: int = 16,
                 unreachable: str = "is the server running at that address? check the base_url setting"):
        self.base_url = base_url.rstrip("/")
        self.model_name, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.concurrency = max_retries, backoff, max(1, concurrency)
        self.unreachable = unreachable
        self.retries = 0  # how many retries this client has made, for logs and tests
        self.batch_size = max(1, batch_size)  # prompts x samples per generate call (the Sampler interface)

    def post(self, route: str, body: dict) -> dict | None:
        """POST body as JSON to base_url + route; the answer's JSON object (None for an empty or non-JSON
        answer, as vLLM's admin routes give). Retries what RETRYABLE says; other 4xx are one UserError line."""
        data = json.dumps(body).encode() if body is not None else None  # None: a GET
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, status = "", (None, "")
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            request = urllib.request.Request(self.base_url + route, data=data, headers=headers,
                                             method="POST" if data is not None else "GET")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read()
                return json.loads(text) if text.strip().startswith(b"{") else None
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code not in RETRYABLE:
                    raise ServerError(f"{self.base_url}{route} answered {e.code}: {detail}", e.code, detail) from None
                last, status = f"HTTP {e.code}: {detail}", (e.code, detail)
                wait = _retry_after(e.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e  # the socket error inside
                last, status = f"{type(e).__name__}: {reason}", (None, str(reason))
                wait = None
            if attempt < self.max_retries:
                time.sleep(wait if wait is not None else self.backoff * 2**attempt * (0.5 + random.random()))
        raise ServerError(f"{self.base_url}{route} failed after {self.max_retries + 1} attempts (last: {last}); "
                          f"{self.unreachable}", *status)

    def _sampling(self, params: SamplingParams, n: int, i: int = 0) -> dict:
        """The sampling fields of request i of a call: its seed is that prompt's stream key (the rule of every
        backend, `SamplingParams.stream`), so no two prompts of a run share a seed."""
        body = {"model": self.model_name, "n": n, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "seed": params.stream(i) % 2**63}
        if params.top_k:
            body["top_k"] = params.top_k
        return body

    def chat(self, messages: list[dict], n: int, params: SamplingParams) -> list[tuple[str, str]]:
        """n (text, finish_reason) answers to one conversation. Reasoning servers may put the thinking in
        `reasoning_content` (vLLM, DeepSeek): it is put back inside <think> tags."""
        out = self.post("/chat/completions", {**self._sampling(params, n), "messages": messages})
        results = []
        for choice in out["choices"]:
            msg = choice.get("message") or {}
            text = msg.get("content") or ""
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            if reasoning and "<think>" not in text:
                text = f"<think>\n{reasoning.strip()}\n</think>\n{text}"
            results.append((text, "length" if choice.get("finish_reason") == "length" else "stop"))
        return results

    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> list[Completion]:
        """The Sampler interface over /completions (prompts already formatted; the served model's own end
        tokens decide where a completion stops)."""
        def one(i: int) -> list[Completion]:
            out = self.post("/completions", {**self._sampling(params, n, i), "prompt": prompts[i]})
            return [Completion(i, c.get("text", ""), (), "length" if c.get("finish_reason") == "length" else "stop")
                    for c in out["choices"]]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return [c for group in pool.map(one, range(len(prompts))) for c in group]

    def close(self) -> None:
        """Nothing to release: each request opens and closes its own connection."""

    def get(self, route: str) -> dict | None:
        """GET base_url + route: its JSON object (retried as `post` is)."""
        return self.post(route, None)


def _retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, float(value)) if value else None
    except ValueError:
        return None
