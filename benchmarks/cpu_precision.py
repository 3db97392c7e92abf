"""What this CPU gives a real model: fp32 vs bf16 autocast, per phase, on SmolLM2-135M-Instruct.

    python benchmarks/cpu_precision.py [--model models/smollm2-135m-instruct] [--threads 2] [--compile] [--tiny]

Training: LoRA (r 16, q/k/v/o) forward + backward + AdamW on 8 x 256 tokens (the real-model recipes' SFT
micro-batch), the median of 3 steps after one warm-up. Generation: the recipes' HF backend (`HFGenerator`,
our decode loop with the reserved KV cache), 32 prompts x 1 sample x 128 new tokens, greedy, min_new_tokens set
so every row runs all 128 steps; prefill and decode apart (one forward over 64 x 100 prompt tokens; 20 decode
steps of 64 rows). `--compile` adds bf16 autocast on `torch.compile(model, dynamic=True)` (inductor; its first
call, which compiles, is reported apart as "first train step s"). `--tiny`: every phase at a few tokens, the
same code in seconds (tests/test_scripts.py runs it). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    train: tuple[int, int]  # rows x tokens of the training micro-batch
    rows: int  # rows of the prefill and decode phases
    prefill: int  # prompt tokens of the prefill phase
    steps: int  # decode steps
    prompts: int  # prompts generated from
    new: int  # new tokens per prompt


FULL = Sizes(train=(8, 256), rows=64, prefill=100, steps=20, prompts=32, new=128)
TINY = Sizes(train=(2, 16), rows=2, prefill=8, steps=2, prompts=2, new=4)


def autocast(on: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def train_rate(model, on: bool, size: Sizes) -> tuple[float, float]:
    import torch

    ids = torch.randint(100, min(40000, model.config.vocab_size), size.train)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        with autocast(on):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return size.train[0] * size.train[1] / statistics.median(times[1:]), times[0]


def phase_rates(model, on: bool, size: Sizes) -> tuple[float, float]:
    import torch

    x = torch.randint(100, min(40000, model.config.vocab_size), (size.rows, size.prefill))
    with torch.no_grad(), autocast(on):
        model(input_ids=x[:, :10])  # warm-up
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        t1 = time.perf_counter()
        cache, y = out.past_key_values, x[:, -1:]
        for _ in range(size.steps):
            cache = model(input_ids=y, past_key_values=cache, use_cache=True).past_key_values
        t2 = time.perf_counter()
    return size.rows * size.prefill / (t1 - t0), size.rows * size.steps / (t2 - t1)


def generate_rate(model, tok, on: bool, size: Sizes) -> float:
    from thinkforge.formats import render_prompt
    from thinkforge.rollout.hf import HFGenerator
    from thinkforge.rollout.types import SamplingParams

    prompts = [render_prompt(f"Mia has {i} apples and buys {i + 3} more. How many now?", "chat_template", None, tok)
               for i in range(size.prompts)]
    model.generation_config.min_new_tokens = size.new
    gen = HFGenerator(model, tok, 64)
    with autocast(on):
        t0 = time.perf_counter()
        out = gen.generate(prompts, 1, SamplingParams(size.new, 0.0))
        dt = time.perf_counter() - t0
    model.generation_config.min_new_tokens = None
    return sum(len(c.token_ids) for c in out) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also bf16 autocast on torch.compile(model) (inductor)")
    ap.add_argument("--tiny", action="store_true", help="every phase at a few tokens (the smoke test)")
    a = ap.parse_args()
    size = TINY if a.tiny else FULL
    import torch

    from thinkforge import models

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = models.load(a.model)
    lora = models.add_lora(model, 16, 32, 0.0)
    res = {}
    for mode in ("fp32", "bf16", "bf16+compile") if a.compile else ("fp32", "bf16"):
        on = mode != "fp32"
        net = torch.compile(lora, dynamic=True) if mode.endswith("compile") else lora
        lora.train()
        train, first = train_rate(net, on, size)
        lora.eval()
        prefill, decode = phase_rates(net, on, size)
        try:
            gen = round(generate_rate(net, tok, on, size), 1)
        except RuntimeError as e:  # AOTAutograd fails on the reserved KV cache: inputs that are views of one buffer
            gen = f"fails: {str(e).splitlines()[0][:60]}"
        res[mode] = {"train_tokens_per_s": round(train, 1), "prefill_tokens_per_s": round(prefill, 1),
                     "decode_tokens_per_s": round(decode, 1), "generate_tokens_per_s": gen,
                     "first_train_step_s": round(first, 1)}
        print(mode, json.dumps(res[mode]), file=sys.stderr, flush=True)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {a.model}, LoRA r 16")
    print(f"| precision | train tokens/s | prefill tokens/s | decode tokens/s ({size.rows} rows) | generate tokens/s "
          f"({size.prompts} x {size.new}) | first train step s |")
    print("|---|---|---|---|---|---|")
    for mode, r in res.items():
        print(f"| {mode} | {r['train_tokens_per_s']:.0f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
              f"{r['generate_tokens_per_s']} | {r['first_train_step_s']} |")
    print(json.dumps({"metric": "cpu_bf16_autocast", **res,
                      "train_ratio": round(res["bf16"]["train_tokens_per_s"] / res["fp32"]["train_tokens_per_s"], 2)}))


if __name__ == "__main__":
    main()
