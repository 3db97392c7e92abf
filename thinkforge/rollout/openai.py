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
    """The server kept failing (or could not be reached) after every retry: one line for the user, who can
    start it or fix the address."""


class OpenAIClient:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, concurrency: int = 8):
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.concurrency = max_retries, backoff, max(1, concurrency)
        self.retries = 0  # how many retries this client has made, for logs and tests
        self.batch_size = 16  # prompts x samples per generate call (the Generator interface)

    def _post(self, route: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            request = urllib.request.Request(self.base_url + route, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code not in RETRYABLE:
                    raise UserError(f"{self.base_url}{route} answered {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                wait = _retry_after(e.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                wait = None
            if attempt < self.max_retries:
                time.sleep(wait if wait is not None else self.backoff * 2**attempt * (0.5 + random.random()))
        raise ServerError(f"{self.base_url}{route} failed after {self.max_retries + 1} attempts (last: {last}); is the "
                          f"server running at that address? check the base_url setting")

    def _sampling(self, params: SamplingParams, n: int, i: int = 0) -> dict:
        """The sampling fields of request i of a call: its seed is that prompt's stream key (the rule of every
        backend, `SamplingParams.stream`), so no two prompts of a run share a seed."""
        body = {"model": self.model, "n": n, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "seed": params.stream(i) % 2**63}
        if params.top_k:
            body["top_k"] = params.top_k
        return body

    def chat(self, messages: list[dict], n: int, params: SamplingParams) -> list[tuple[str, str]]:
        """n (text, finish_reason) answers to one conversation. Reasoning servers may put the thinking in
        `reasoning_content` (vLLM, DeepSeek): it is put back inside <think> tags."""
        out = self._post("/chat/completions", {**self._sampling(params, n), "messages": messages})
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
        """The rollout Generator interface over /completions (prompts already formatted)."""
        def one(i: int) -> list[Completion]:
            out = self._post("/completions", {**self._sampling(params, n, i), "prompt": prompts[i]})
            return [Completion(i, c.get("text", ""), (), "length" if c.get("finish_reason") == "length" else "stop")
                    for c in out["choices"]]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return [c for group in pool.map(one, range(len(prompts))) for c in group]

    def load_weights(self, model) -> dict[str, float]:
        raise RuntimeError("an OpenAI-compatible server takes no weight updates: RL needs rollout.backend hf or vllm")

    def close(self) -> None:
        pass


def _retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, float(value)) if value else None
    except ValueError:
        return None
