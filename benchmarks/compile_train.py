"""Compiled training (`model.compile`, train/compiled.py) against eager, for SFT, DPO and GRPO passes, in one run.

    python benchmarks/compile_train.py [--model models/smollm2-135m-instruct] [--repeats 3]
    python benchmarks/compile_train.py --tiny      # the smoke test's size (and torch.compile's aot_eager backend)

The model as the real-model recipes train it (LoRA r 16 on q/k/v/o, bf16 autocast, dropout off, the training
stages' attention). Three micro-batches, forward + backward (no optimizer step: the same in both):
- `sft`: LM training on unpadded rows (--lm-rows x --lm-row tokens), log-probs of every token;
- `dpo`: --pairs preference pairs (prompt --prompt tokens, chosen and rejected of --short..--long), the pair's prompt
  run once (train/dpo.py's pair_logprobs), the sigmoid loss;
- `grpo`: 2 prompts x 8 completions (benchmarks/rl_train_pass.py's micro-batch), the policy loss.
Eager first (median of --repeats after a warm-up), then the decoder layers compiled (`compile_layers`): each
pass's first call (compiling, reported apart) and then its median. The figures train/compiled.py's `auto` uses
(`MEASURED`) come from this script's rows (a later pass reuses the graphs an earlier one compiled: GRPO's first
call after DPO's is not a stage's compile time). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rl_train_pass import lm_pass, rl_pass, rollout, timed, tiny_model_dir, training_model

ROOT = Path(__file__).resolve().parent.parent


def dpo_pass(model, pairs, pad_id: int):
    import torch
    import torch.nn.functional as F

    from thinkforge.train.dpo import pair_logprobs

    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen, rejected = pair_logprobs(model, pairs, pad_id)
    (-F.logsigmoid(0.1 * (chosen - rejected)).mean()).backward()


def make_pairs(tok, n: int, prompt: int, short: int, long: int, seed: int):
    import torch

    from thinkforge.data.packing import Example

    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(10, len(tok), (k,), generator=g).tolist()

    out = []
    for _ in range(n):
        p = ids(prompt)
        a, b = (int(x) for x in torch.randint(short, long + 1, (2,), generator=g))
        out.append((Example(p, ids(a)), Example(p, ids(b))))
    return out


def main() -> None:
    import torch

    from thinkforge.train.compiled import compile_layers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, short rows: the smoke test")
    ap.add_argument("--prompt", type=int, default=150)
    ap.add_argument("--short", type=int, default=66)
    ap.add_argument("--long", type=int, default=186)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--lm-rows", type=int, default=8)
    ap.add_argument("--lm-row", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend (the smoke test: aot_eager, no code made)")
    a = ap.parse_args()
    if a.tiny:
        a.model = tiny_model_dir()
        a.prompt, a.short, a.long, a.lm_row, a.lm_rows, a.pairs, a.repeats = 12, 4, 20, 32, 2, 2, 1
        a.backend = "aot_eager" if a.backend == "inductor" else a.backend
    model, tok = training_model(a.model)
    batch = rollout(tok, 2, 8, a.prompt, a.short, a.long, seed=0)
    pairs = make_pairs(tok, a.pairs, a.prompt, a.short, a.long, seed=2)
    rows = torch.randint(10, len(tok), (a.lm_rows, a.lm_row), generator=torch.Generator().manual_seed(1))
    tokens = {"sft": rows.numel(), "grpo": int(batch.prompt_mask.sum() + batch.completion_mask.sum()),
              "dpo": sum(len(c.prompt) + len(c.completion) + len(r.completion) for c, r in pairs)}
    passes = {"sft": lambda: lm_pass(model, rows), "dpo": lambda: dpo_pass(model, pairs, tok.pad_token_id),
              "grpo": lambda: rl_pass(model, batch, 8, False)}
    eager = {k: tokens[k] / timed(fn, a.repeats) for k, fn in passes.items()}
    compile_layers(model, a.backend)
    first, compiled = {}, {}
    for k, fn in passes.items():
        t = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t
        compiled[k] = tokens[k] / timed(fn, a.repeats)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {Path(a.model).name}, LoRA r 16 q/k/v/o, "
          f"bf16 autocast, decoder layers compiled ({a.backend}, dynamic shapes)")
    print("| pass | tokens | eager tokens/s | first compiled call s | compiled tokens/s | compiled / eager |")
    print("|---|---|---|---|---|---|")
    for k in passes:
        print(f"| {k} | {tokens[k]} | {eager[k]:.0f} | {first[k]:.1f} | {compiled[k]:.0f} | {compiled[k] / eager[k]:.2f} |")
    print(json.dumps({"metric": "compiled_training", **{k: {"eager": round(eager[k], 1), "compiled": round(compiled[k], 1),
                                                             "first_call_s": round(first[k], 1)} for k in passes}}))


if __name__ == "__main__":
    main()
