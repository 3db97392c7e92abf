"""Response shaping: a finished request as the OpenAI JSON body (choices, usage, log-probs as vLLM gives them),
and a streamed one as server-sent events (`data: {...}` lines, then `data: [DONE]`)."""

from __future__ import annotations

import json
import time
import uuid

from thinkforge.rollout.types import encode
from thinkforge.serve.protocol import Request


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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


def logprobs_block(tokenizer, model, prompt: list[int], completion: list[int], *, top: int, echo: bool, chat: bool):
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


def completion_body(srv, req: Request) -> dict:
    """The JSON answer to a finished (non-streamed) request: its choices, cut at the stop strings, and usage."""
    choices, n_out = [], 0
    for i, c in enumerate(req.result):
        text, stopped = cut_at_stop(c.text, req.stop)
        finish = "stop" if stopped else c.finish_reason
        n_out += len(c.token_ids)
        prompt = req.prompts[c.prompt_index]
        block = None
        if req.logprobs is not None or req.echo:
            kept = list(c.token_ids) if not stopped else encode(srv.tokenizer, text)
            block = logprobs_block(srv.tokenizer, srv.model, prompt, kept, top=req.logprobs or 0, echo=req.echo, chat=req.chat)
        if req.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish, "logprobs": block})
        else:
            if req.echo:
                text = srv.tokenizer.decode(prompt) + text
            choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": block})
    n_in = sum(len(p) for p in req.prompts) * req.n
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": srv.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


def stream_events(srv, req: Request, write) -> None:
    """Generate one prompt's completion and write it as server-sent events through `write(bytes)`; a client
    that left makes `write` raise, which closes the generation at its next token."""
    base = {"id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": srv.model_name, "object": "chat.completion.chunk" if req.chat else "text_completion"}

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
        if req.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

    def send(obj) -> None:
        write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

    if req.chat:
        send(chunk(None, None, role=True))
    sent, finish = "", "length"
    with srv.batcher.lock:
        pieces = srv.generator.stream(req.prompts[0], req.params)
        try:
            for piece in pieces:
                full, stopped = cut_at_stop(sent + piece, req.stop)
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
