"""QLoRA on a CPU: memory and step time of LoRA training with the base in 4-bit NF4, bf16 and fp32.

    python benchmarks/qlora_cpu.py [--model models/smollm2-135m-instruct] [--steps 8] [--autocast on off] [--tiny]

The same LoRA on every base (r 16, alpha 32, dropout 0, the architecture's targets: q/k/v/o for Llama) trains on
one fixed batch (4 rows x 256 random token ids, seed 0) with AdamW (lr 1e-3) on the trainable parameters, which
stay float32. Bases: `models.load(path, load_in_4bit=True)` (NF4, double-quantized scales, bitsandbytes' CPU
layers; the compute dtype is the load dtype, float32), `dtype="bfloat16"`, `dtype="float32"`. Each (base, autocast)
runs in its own process, so its peak resident memory (`ru_maxrss`) is its own; weight MB counts the parameters
once each (tied embeddings) and, for 4-bit layers, bitsandbytes' quantization state (absmax scales, their own
scales, code tables). A step is forward + backward + AdamW step; its time is the median over `--steps` steps after
2 warm-up steps. The first loss is step 1's (before any update), the last the final step's: each base trains.
`--autocast on` wraps the forward in `torch.autocast("cpu", dtype=torch.bfloat16)`; `off` runs the base's dtype.
`--tiny`: a 2-layer Llama (hidden 64) made here, 2 rows x 16 tokens, 2 steps (tests/test_scripts.py runs it).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BASES = ("4bit", "bf16", "fp32")
LOAD = {"4bit": {"load_in_4bit": True}, "bf16": {"dtype": "bfloat16"}, "fp32": {"dtype": "float32"}}
WARMUP = 2


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def weight_bytes(model) -> int:
    """Resident bytes of the weights: every parameter once (tied embeddings share one tensor), plus the NF4
    quantization state of bitsandbytes' 4-bit layers (absmax, and with double quantization its own absmax and
    code tables). PEFT's LoRA wrapper around such a layer is also named Linear4bit: only bitsandbytes' class counts."""
    tensors = {p.data_ptr(): p for p in model.parameters()}
    if "bitsandbytes" in sys.modules:
        import bitsandbytes

        for m in model.modules():
            if isinstance(m, bitsandbytes.nn.Linear4bit):
                qs = m.weight.quant_state  # double-quantized (models.four_bit_config): its scales have their own
                for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
                    tensors[t.data_ptr()] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())


def child(a) -> dict:
    """One (base, autocast) configuration in this process: load, add LoRA, train `a.steps` + 2 steps."""
    import torch

    from thinkforge import models

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.base == "4bit":
        models.import_bitsandbytes("cpu")  # imported before the clock starts, as peft is: load seconds are loading
    import peft  # noqa: F401

    floor = peak_mb()  # torch, transformers, peft, bitsandbytes: the libraries before any weight
    t0 = time.perf_counter()
    model, _ = models.load(a.model, device="cpu", **LOAD[a.base])
    load_s = time.perf_counter() - t0
    load_peak = peak_mb()
    model = models.add_lora(model, 16, 32, 0.0)  # the architecture's targets: q/k/v/o on a Llama
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # PEFT upcasts adapters on a bf16 base already; make it a fact of the benchmark
        p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW(params, lr=a.lr)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.rows, a.tokens), generator=g)  # (B, T)
    on = a.autocast == ["on"]  # the child is given one setting
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()
    times, losses = [], []
    for _ in range(WARMUP + a.steps):
        t = time.perf_counter()
        with cast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    step = statistics.median(times[WARMUP:])
    return {"load_s": round(load_s, 2), "libraries_mb": round(floor), "load_peak_mb": round(load_peak),
            "peak_mb": round(peak_mb()), "weight_mb": round(weight_bytes(model) / 2**20, 1), "trainable": sum(p.numel() for p in params),
            "step_s": round(step, 3), "tokens_per_s": round(a.rows * a.tokens / step, 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    ap.add_argument("--autocast", nargs="+", choices=["on", "off"], default=["on", "off"],
                    help="bf16 autocast on the forward (on), the base's own dtype (off), or both")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps, after 2 warm-up steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer Llama made here, 2 x 16 tokens, 2 steps (the smoke test)")
    ap.add_argument("--base", choices=BASES, help=argparse.SUPPRESS)  # the child process's one configuration
    a = ap.parse_args()
    if a.base:
        print(json.dumps(child(a)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            from thinkforge import tiny
            from thinkforge.config import InitConfig

            a.model = str(tiny.init_model(os.path.join(tmp, "llama"), InitConfig(arch="llama", hidden=64, layers=2)))
            a.rows, a.tokens, a.steps = 2, 16, 2
        rows = {}
        for base in a.bases:
            for cast in a.autocast:
                cmd = [sys.executable, __file__, "--base", base, "--autocast", cast, "--model", a.model,
                       "--rows", str(a.rows), "--tokens", str(a.tokens), "--steps", str(a.steps), "--lr", str(a.lr)]
                cmd += ["--threads", str(a.threads)] if a.threads else []
                done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: the child's warnings, as they come
                if done.returncode:
                    sys.exit(f"{base} (autocast {cast}) exited {done.returncode}")
                rows[f"{base}/autocast_{cast}"] = json.loads(done.stdout.strip().splitlines()[-1])
                print(base, cast, json.dumps(rows[f"{base}/autocast_{cast}"]), file=sys.stderr, flush=True)
    import torch

    print(f"CPU, {a.threads or torch.get_num_threads()} threads, torch {torch.__version__}, {a.model}, LoRA r 16 "
          f"(alpha 32, q/k/v/o), {a.rows} x {a.tokens} tokens, median of {a.steps} steps after {WARMUP}")
    print("| base | bf16 autocast | load s | peak RSS MB: libraries / after load / training | weight MB | step s "
          "| tokens/s | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base, cast = name.split("/autocast_")
        print(f"| {base} | {cast} | {r['load_s']:.1f} | {r['libraries_mb']} / {r['load_peak_mb']} / {r['peak_mb']} | {r['weight_mb']:.1f} | "
              f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    print(json.dumps({"metric": "qlora_cpu", **rows}))


if __name__ == "__main__":
    main()
