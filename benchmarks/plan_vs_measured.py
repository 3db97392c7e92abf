"""`thinkforge plan`'s predicted peak against the measured peak of one step on this CPU.

    python benchmarks/plan_vs_measured.py [--tiny]

Each configuration is measured by benchmarks/long_context_memory.py's one-step child (a fresh process, peak
resident memory), and predicted by thinkforge.plan from the same model config and step shape (fp32, no
gradient checkpointing, the default output-head chunk). Configurations differ in length, vocabulary and
width (`--tiny`: one small one, the same code in seconds; tests/test_scripts.py runs it). Prints a table, then
one JSON line with the largest relative error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = [  # stage, tokens, vocab, hidden, layers
    ("sft", 4096, 200_064, 64, 2),
    ("sft", 16384, 200_064, 64, 2),
    ("dpo", 8192, 200_064, 64, 2),
    ("grpo", 16384, 200_064, 64, 2),
    ("sft", 8192, 32_000, 256, 4),
    ("grpo", 4096, 32_000, 256, 4),
]
TINY = [("grpo", 256, 1024, 32, 1)]


def predicted(stage: str, tokens: int, vocab: int, hidden: int, layers: int) -> float:
    import dataclasses

    from thinkforge import plan
    from thinkforge.config import load_config

    cfg = _config(vocab, hidden, layers, 2 * tokens)
    shape = plan.shape_of(cfg)
    name = {"grpo": "rl"}.get(stage, stage)
    # the plan's own setting for the default recipe (fp32 on a CPU), reshaped to the measured step: a packed row, a
    # pair, a group of two, without a (T, T) mask (train/attention.py), a reference, or a rollout KV cache
    s = dataclasses.replace(plan.settings_for(load_config(None, []), name, "cpu", cfg), row_tokens=tokens,
                            rows_per_item=1 if stage == "sft" else 2, batch=1, checkpointing=False, masks=False,
                            head_chunk=None, reference=False, kv_cache=0, kv_tokens=0, vllm_share=0.0)
    return plan.peak(plan.predict(shape, s, 1, "ddp", "cpu")) / 2**30


def _config(vocab, hidden, layers, max_len):
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_len, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)


def measured(stage: str, tokens: int, vocab: int, hidden: int, layers: int) -> float:
    cmd = [sys.executable, str(HERE / "long_context_memory.py"), "--stage", stage, "--one", str(tokens), "--path", "head",
           "--vocab", str(vocab), "--hidden", str(hidden), "--layers", str(layers), "--limit-gb", "20"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_gb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="one small configuration (the smoke test)")
    a = ap.parse_args()
    rows = []
    for c in TINY if a.tiny else CONFIGS:
        m, p = measured(*c), predicted(*c)
        rows.append((*c, p, m, p / m - 1))
        print(rows[-1], file=sys.stderr, flush=True)
    print("| stage | tokens | vocabulary | hidden x layers | predicted GB | measured GB | error |\n|---|---|---|---|---|---|---|")
    for stage, t, v, h, n, p, m, e in rows:
        print(f"| {stage} | {t} | {v} | {h} x {n} | {p:.2f} | {m:.2f} | {100 * e:+.0f}% |")
    print(json.dumps({"metric": "plan_relative_error", "max_abs": round(max(abs(r[-1]) for r in rows), 3),
                      "configurations": len(rows)}))


if __name__ == "__main__":
    main()
