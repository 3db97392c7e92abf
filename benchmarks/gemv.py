"""The fast decode step's products alone: engine/kernels.py's against oneDNN's blocked ones (torch's fastest CPU path
for them), over a model's worth of float32 weights, at 1..32 rows.

    python benchmarks/gemv.py [--hidden 576 --inner 1536 --kv 192 --layers 30 --vocab 49152] [--rows 1 2 4 8 16 32]

The default shapes are SmolLM2-135M's: per layer q/k/v stacked (hidden + 2 kv) x hidden, o hidden x hidden, gate/up
stacked 2 inner x hidden (`gated_silu` on our side, the product then SiLU x up on oneDNN's), down hidden x inner; then
the output layer vocab x hidden. Random weights (the products' time does not depend on them). Each pass reads every
weight once; the two sides alternate, best of --repeats. The bound: one plain read of the same tensors (`sum`), the
rate a memory-bound one-row product cannot beat. This decided `kernels.ROWS` (the rows below which the step runs
these kernels). The last line is one JSON object: the first --rows, oneDNN's ms over ours.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch
    import torch.nn.functional as F

    from thinkforge.engine import kernels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--inner", type=int, default=1536)
    ap.add_argument("--kv", type=int, default=192, help="key (= value) width of a layer: kv heads x head width")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ops = kernels.ops()
    if ops is None:
        raise SystemExit(f"gemv.py: error: the CPU kernels are not available here: {kernels.why_not()}")
    torch.manual_seed(0)
    h, i = a.hidden, a.inner
    # (weight, kind): "linear" or "gated" (gate/up stacked)
    weights = [(torch.randn(n, k) * 0.02, kind) for _ in range(a.layers)
               for n, k, kind in ((h + 2 * a.kv, h, "linear"), (h, h, "linear"), (2 * i, h, "gated"), (h, i, "linear"))]
    weights.append((torch.randn(a.vocab, h) * 0.02, "linear"))
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w, _ in weights]
    total = sum(w.numel() for w, _ in weights) * 4

    def ours(xs):
        for w, kind in weights:
            x = xs[w.shape[1]]
            if kind == "gated":  # gate and up: the stacked matrix's halves (contiguous row ranges, not copies)
                ops.gated_silu(x, w[:i], w[i:], None, 0.0)
            else:
                ops.linear(x, [w], None, None, None, 0.0)

    def onednn(xs):
        for (w, kind), p in zip(weights, packed, strict=True):
            y = torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
            if kind == "gated":
                gate, up = y.chunk(2, dim=-1)
                F.silu(gate) * up

    def read(_):
        for w, _kind in weights:
            w.sum()

    print(f"CPU, {a.threads} threads, torch {torch.__version__}; {a.layers} layers of hidden {h}, inner {i}, kv {a.kv}, "
          f"vocab {a.vocab}: {total / 1e6:.0f} MB of float32 weights a pass")
    print("| rows | kernels ms | GB/s | oneDNN ms | GB/s | oneDNN / kernels | plain read (bound) ms |")
    print("|---|---|---|---|---|---|---|")
    first = None
    for rows in a.rows:
        xs = {k: torch.randn(rows, k) for k in (h, i)}
        best = {"ours": float("inf"), "onednn": float("inf"), "read": float("inf")}
        for _ in range(a.repeats):
            for name, fn in (("ours", ours), ("onednn", onednn), ("read", read)):
                t = time.perf_counter()
                fn(xs)
                best[name] = min(best[name], time.perf_counter() - t)
        ratio = best["onednn"] / best["ours"]
        print(f"| {rows} | {best['ours'] * 1e3:.1f} | {total / best['ours'] / 1e9:.1f} | {best['onednn'] * 1e3:.1f} | "
              f"{total / best['onednn'] / 1e9:.1f} | {ratio:.2f} | {best['read'] * 1e3:.1f} |", flush=True)
        first = first or (rows, best, ratio)
    rows, best, ratio = first
    print(json.dumps({"metric": f"gemv_ms_{rows}_rows", "thinkforge": round(best["ours"] * 1e3, 3),
                      "onednn": round(best["onednn"] * 1e3, 3), "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
