"""llama.cpp's side of the GGUF export test and of benchmarks/cpu_decode.py, run by the llama.cpp venv's python
(`make llama-cpp`: .venv-llamacpp/bin/python thinkforge/_llamacpp_worker.py REQUEST.json): it imports only
llama_cpp and numpy, never thinkforge or torch. The request is one JSON object; the answer one JSON line on stdout.

  {"do": "tokenize", "model": F, "text": T}                  -> {"ids": [...]}
  {"do": "logits", "model": F, "ids": [...], "out": F.npy, "f32_cache": B}
      -> the (len(ids), vocab) float32 logits in F.npy (f32_cache: the KV cache in float32, not llama.cpp's f16)
  {"do": "chat", "model": F, "messages": [...], "max_tokens": N}  -> {"text": ...} (greedy; the GGUF's template)
  {"do": "rate", "model": F, "ids": [...], "rows": R, "new": N, "threads": K, "repeats": 3, "top_p": P}
      -> {"tok_per_s": [...]} (one per repeat, prefill included): R sequences of the prompt decoded together, one token per
         row per llama_decode, sampled at temperature 1.0 by llama.cpp's own sampler (a chain per row: its top-p
         sampler first where P < 1, then the draw)
"""

from __future__ import annotations

import json
import sys
import time


def _load(path: str, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False, f32_cache: bool = False):
    import llama_cpp

    # No weight repacking ("extra buffer types"): llama.cpp 0.3.36 repacks quantized weights (q8_0, Q4_1) for AMX
    # on Intel Xeons that have it, and crashes there (SIGSEGV at load or first eval, seen on this project's
    # machines); the plain CPU kernels compute the same numbers. The Llama class takes no such argument: its
    # defaults are set here.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        assert "use_extra_bufts" in dict(type(p)._fields_), "this llama_cpp has no use_extra_bufts: see _load"
        p.use_extra_bufts = False  # (on a ctypes structure without the field this would only add an attribute)
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=max(512, n_ctx), n_ubatch=512, logits_all=logits_all,
                           n_threads=threads, n_threads_batch=threads, verbose=False, **kv)


def tokenize(req: dict) -> dict:
    llm = _load(req["model"])
    return {"ids": llm.tokenize(req["text"].encode(), add_bos=False, special=True)}


def logits(req: dict) -> dict:
    import numpy as np

    ids = req["ids"]
    llm = _load(req["model"], n_ctx=max(64, len(ids)), logits_all=True, f32_cache=req.get("f32_cache", False))
    llm.eval(ids)
    np.save(req["out"], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    return {"n": len(ids)}


def chat(req: dict) -> dict:
    llm = _load(req["model"])
    out = llm.create_chat_completion(messages=req["messages"], max_tokens=req.get("max_tokens", 256), temperature=0.0)
    return {"text": out["choices"][0]["message"]["content"], "finish": out["choices"][0]["finish_reason"]}


def rate(req: dict) -> dict:
    import llama_cpp as lc

    ids, rows, new = req["ids"], req["rows"], req["new"]
    llm = _load(req["model"], n_ctx=64, threads=req.get("threads"))
    params = lc.llama_context_default_params()  # a context of its own: R sequences sharing one KV cache
    params.n_ctx = rows * (len(ids) + new + 8)
    params.n_batch = params.n_ubatch = max(512, len(ids), rows)
    params.n_seq_max, params.kv_unified = rows, True
    params.n_threads = params.n_threads_batch = req.get("threads") or llm.n_threads
    params.no_perf = True
    ctx = lc.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(max(len(ids), rows), 0, rows)
    totals = []
    for repeat in range(req.get("repeats", 3)):
        samplers = []
        for r in range(rows):
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            if req.get("top_p", 1.0) < 1.0:  # the nucleus first, then the draw (llama.cpp's own chain)
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(req["top_p"], 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(1000 * repeat + r))
            samplers.append(chain)
        lc.llama_memory_clear(memory, True)
        start = time.perf_counter()
        batch.n_tokens = len(ids)  # the prompt once, in sequence 0; copied to the other rows' sequences
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = t, i, 1, 0
            batch.logits[i] = i == len(ids) - 1
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        for r in range(1, rows):
            lc.llama_memory_seq_cp(memory, 0, r, -1, -1)
        last = [len(ids) - 1] * rows  # the batch index of each row's logits
        for step in range(new):
            tokens = [lc.llama_sampler_sample(samplers[r], ctx, last[r]) for r in range(rows)]
            if step == new - 1:
                break
            batch.n_tokens = rows
            for r, t in enumerate(tokens):
                batch.token[r], batch.pos[r], batch.n_seq_id[r], batch.seq_id[r][0] = t, len(ids) + step, 1, r
                batch.logits[r] = True
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            last = list(range(rows))
        end = time.perf_counter()
        totals.append(rows * new / (end - start))
        for s in samplers:
            lc.llama_sampler_free(s)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    return {"tok_per_s": totals}


def main() -> None:
    req = json.loads(open(sys.argv[1]).read()) if len(sys.argv) > 1 else json.loads(sys.stdin.read())
    answer = {"tokenize": tokenize, "logits": logits, "chat": chat, "rate": rate}[req["do"]](req)
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
