"""One decode step (one new token per row) of a tiny model: the default KV cache vs the reserved one.

    python benchmarks/decode_step.py [--rows 256 --positions 10 100 150 --hidden 128 --layers 4]

The default transformers cache layer concatenates each layer's keys and values at every step (a copy of the
whole cache); `thinkforge.engine.cache.reserved_layer()` writes into a buffer reserved up front and hands
attention a view. Median of 30 steps at each cache length. The last line is one JSON object; ratio > 1 means
the reserved cache is faster (the peer here is the default cache layer, not another project).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def step_ms(model, rows: int, positions: int, reserved: bool) -> float:
    import torch
    from transformers import DynamicCache

    from thinkforge.engine.cache import reserved_layer

    ids = torch.randint(5, model.config.vocab_size, (rows, positions))
    mask = torch.ones_like(ids)
    cache = DynamicCache(config=model.config)
    if reserved:
        cache.layers = [reserved_layer()(positions + 40) for _ in cache.layers]
    times = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i in range(30):
            mask = torch.cat([mask, mask[:, :1]], 1)
            pos = torch.full((rows, 1), positions + i)
            t = time.perf_counter()
            model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    import torch

    from thinkforge import models, tiny
    from thinkforge.config import InitConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--positions", type=int, nargs="+", default=[10, 100, 150])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = models.load(str(tiny.init_model(Path(tmp) / "m", InitConfig(arch="phi3", hidden=a.hidden, layers=a.layers, heads=4))))
    model.eval()
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, phi3 hidden {a.hidden} x {a.layers} layers, {a.rows} rows")
    print("| cached positions | default cache ms/step | reserved cache ms/step |\n|---|---|---|")
    last = None
    for p in a.positions:
        default, reserved = step_ms(model, a.rows, p, False), step_ms(model, a.rows, p, True)
        print(f"| {p} | {default:.1f} | {reserved:.1f} |")
        last = (p, default, reserved)
    print(json.dumps({"metric": f"decode_ms_per_step_at_{last[0]}_positions", "thinkforge": round(last[2], 2),
                      "peer": round(last[1], 2), "ratio": round(last[1] / last[2], 3)}))


if __name__ == "__main__":
    main()
