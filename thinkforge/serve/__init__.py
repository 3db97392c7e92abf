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

The rooms, in the order a request walks through them:
    http.py       the server and the handler: HTTP framing (read_body), auth, routing, cancellation
    protocol.py   a body -> a validated Request (or BadRequest, the 4xx the client gets)
    batcher.py    the one thread that runs the model: requests with the same settings generated together
    responses.py  the JSON answer (choices, usage, log-probs as vLLM gives them) or the server-sent events
"""

from __future__ import annotations

from thinkforge.serve.http import Server, Settings


def make_server(generator, tokenizer, settings: Settings, log=None) -> Server:
    """The server (bound, not yet serving: call serve_forever) of `generator` (a `rollout.types.Streamer`: the in-process backend)."""
    return Server(generator, tokenizer, settings, log)


__all__ = ["Server", "Settings", "make_server"]
