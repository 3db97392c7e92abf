"""One sampling step (next token per row from the logits): thinkforge's `engine.decode.pick` vs transformers' warpers.

    python benchmarks/sampling.py [--vocab 49152 --rows 1 32 64 --top-p 1.0 0.95 --scale 1 4]

thinkforge: top-p from a top-256 first (a row whose nucleus is wider: a sort), then a two-level inverse CDF, one
uniform per row. The peer: what transformers' `generate` runs at each step (TRL's GRPO generation included):
TemperatureLogitsWarper, TopPLogitsWarper (a full sort of the row), softmax, torch.multinomial. Logits are random
normal times --scale, temperature 0.8: at 4 a peaked row (the nucleus at 0.95: a median of ~90 tokens of 49,152),
at 1 a flat one (thousands: thinkforge's worst case, the top-256 and then the sort). Median of --repeats calls after
one warm-up. Prints a table, then one JSON line (the last --scale, --top-p and --rows).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

from rl_train_pass import timed  # a median of timed calls after one warm-up


def transformers_draw(logits, warpers):
    """What transformers' sampling does at each step: the warpers, softmax, one multinomial draw per row."""
    import torch

    for w in warpers:
        logits = w(None, logits)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def main() -> None:
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from thinkforge.engine.decode import pick
    from thinkforge.rollout.types import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.95])
    ap.add_argument("--scale", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, vocabulary {a.vocab}, temperature 0.8")
    print("| logits x | rows | top_p | thinkforge ms | transformers ms | ratio |\n|---|---|---|---|---|---|")
    line = {}
    for scale, top_p, rows in ((s, p, r) for s in a.scale for p in a.top_p for r in a.rows):
        logits = torch.randn(rows, a.vocab) * scale
        u = torch.rand(rows, dtype=torch.float64)
        params = SamplingParams(temperature=0.8, top_p=top_p)
        warpers = [TemperatureLogitsWarper(0.8)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

        ours_s = timed(partial(pick, logits, params, u), a.repeats)
        theirs_s = timed(partial(transformers_draw, logits, warpers), a.repeats)
        print(f"| {scale:g} | {rows} | {top_p} | {ours_s * 1e3:.2f} | {theirs_s * 1e3:.2f} | {theirs_s / ours_s:.2f} |", flush=True)
        line = {"metric": f"sampling_ms_{rows}_rows_top_p_{top_p}_logits_x{scale:g}", "thinkforge": round(ours_s * 1e3, 3),
                "peer": round(theirs_s * 1e3, 3), "ratio": round(theirs_s / ours_s, 3)}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
