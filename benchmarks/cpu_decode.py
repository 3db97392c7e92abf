"""CPU generation: thinkforge's decode loop vs llama.cpp on the same model at the same weight precision.

    make real-model llama-cpp
    python benchmarks/cpu_decode.py [--model models/smollm2-135m-instruct] [--new 128] [--rows 1 32] [--threads 2]
    python benchmarks/cpu_decode.py --random phi     # Phi-2's layers, random weights, SmolLM2's size and tokenizer
    python benchmarks/cpu_decode.py --top-p 0.95     # nucleus sampling on both sides (chat's and evaluation's default)

For each precision (f32, bf16): the model is exported with `thinkforge export --gguf` at that precision and
llama.cpp (llama-cpp-python in .venv-llamacpp, its own sampler chain per row) decodes R rows of the same chat
prompt for --new tokens, all rows in one llama_decode per step; thinkforge decodes the same prompt x R rows with
its HF backend's loop (`engine.decode.decode`, per-sample streams, temperature 1.0; --top-p below 1: the nucleus
first, on both sides), once with the fast step
(`engine/fast.py`, what chat, serve, eval and rollouts run), in float32 at up to `kernels.ROWS` rows once more with
oneDNN's products in place of engine/kernels.py's (the A/B of that change), and once through transformers' forward
(before it all).
Every row runs all --new steps (no stop token) on both sides; rates are rows x new / wall seconds, prefill
included, the best of --repeats. The Q4_1 GGUF of `make real-model` runs in llama.cpp for context.

Bandwidth bound: one decode step at one row reads every weight once, so tokens/s <= bandwidth / weight bytes;
bandwidth is measured here (the best of 5 reads of a 1 GiB tensor). bf16 runs only on a CPU that computes it
natively (AMX or AVX512-BF16). The last line is one JSON object: bf16 (else f32) at one row, thinkforge over
llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
QUESTION = "A farmer has 17 sheep and buys 26 more, then sells 9. How many sheep are left? Think step by step."


def bandwidth() -> float:
    """Bytes per second of one read of a 1 GiB tensor (the best of 5)."""
    import torch

    x = torch.ones(256 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def llama_cpp(gguf: Path, ids: list[int], rows: int, new: int, threads: int, repeats: int, top_p: float = 1.0) -> float:
    request = {"do": "rate", "model": str(gguf), "ids": ids, "rows": rows, "new": new, "threads": threads, "repeats": repeats,
               "top_p": top_p}
    done = subprocess.run([str(LLAMA_PYTHON), str(ROOT / "thinkforge" / "_llamacpp_worker.py")], input=json.dumps(request),
                          capture_output=True, text=True, check=True)
    return max(json.loads(done.stdout.strip().splitlines()[-1])["tok_per_s"])


def thinkforge_rate(model, ids: list[int], rows: int, new: int, repeats: int, fast: bool, top_p: float = 1.0) -> float:
    import torch

    from thinkforge.engine.decode import Prompts, RowStreams, decode
    from thinkforge.rollout.types import SamplingParams

    params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=top_p)
    best = 0.0
    held = {} if fast else None
    for repeat in range(repeats + 1):  # the first call packs the weights (once per weight version): not timed
        streams = RowStreams([(repeat, r) for r in range(rows)], torch.float64, "cpu")
        t = time.perf_counter()
        out = decode(model, Prompts([ids], rows, [], 0, min_new_tokens=new), params, uniforms=streams, fast=held)
        took = time.perf_counter() - t
        assert sum(map(len, out)) == rows * new
        if repeat:
            best = max(best, rows * new / took)
    if fast:
        assert held, "the fast step refused this model"
    return best


# Random-init shapes of SmolLM2-135M's size class (its 49,152-token vocabulary): Phi-2's layer (heads of 80, 40% of
# each rotated, a 4x GELU MLP) at 640 wide and 16 deep, 142M parameters (Phi-2 itself: 2,560 x 32, 2.8B).
RANDOM = {"phi": dict(hidden_size=640, num_hidden_layers=16, num_attention_heads=8, intermediate_size=2560,
                      partial_rotary_factor=0.4, resid_pdrop=0.0, embd_pdrop=0.0, max_position_embeddings=2048)}


def random_model(arch: str, tokenizer_from: str, out: Path) -> str:
    """A folder with a random-init `arch` model shaped by RANDOM and `tokenizer_from`'s tokenizer (seed 0)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkforge.arch import ARCHS

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    config = getattr(transformers, ARCHS[arch].config_class)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                              eos_token_id=tok.eos_token_id, **RANDOM[arch])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def main() -> None:
    import torch

    from thinkforge import models
    from thinkforge.engine import kernels
    from thinkforge.export import export_gguf
    from thinkforge.train.loop import native_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--q4", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus mass on both sides (1.0: none)")
    ap.add_argument("--random", choices=sorted(RANDOM), help="instead of --model's weights: a random-init model of this "
                    "architecture in SmolLM2-135M's size class, with --model's tokenizer (no such checkpoint here)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.random:
        a.model = random_model(a.random, a.model, Path(tempfile.mkdtemp(prefix="cpu-decode-")) / a.random)
    model, tok = models.load(a.model, dtype="float32", device="cpu")
    model.eval()
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    params = sum(p.numel() for p in model.parameters())
    bw = bandwidth()
    print(f"CPU, {a.threads} threads, torch {torch.__version__}, {Path(a.model).name} ({params / 1e6:.1f}M parameters), "
          f"prompt {len(ids)} tokens, {a.new} new tokens per row, temperature 1.0, top_p {a.top_p}; measured read bandwidth {bw / 1e9:.1f} GB/s")
    print("| precision | weights MB | 1-row bound tok/s | rows | llama.cpp tok/s | thinkforge tok/s | ratio | "
          "thinkforge, oneDNN's products tok/s | thinkforge via transformers' forward tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            if dtype == torch.bfloat16 and not native_bf16("cpu"):  # both engines would convert every weight
                print("| bf16 | not run: this CPU has no native bf16 (no AMX, no AVX512-BF16) | | | | | | | |")
                continue
            gguf = Path(tmp) / f"m-{precision}.gguf"
            export_gguf(a.model, gguf, precision)
            weights = params * (4 if precision == "f32" else 2)
            m = model.to(dtype)
            for rows in a.rows:
                theirs = llama_cpp(gguf, ids, rows, a.new, a.threads, a.repeats, a.top_p)
                ours = thinkforge_rate(m, ids, rows, a.new, a.repeats, fast=True, top_p=a.top_p)
                onednn = "same"  # where the kernels do not run (more rows, bf16, not built), the step is oneDNN's
                if dtype == torch.float32 and rows <= kernels.ROWS and kernels.ops() is not None:
                    at_most, kernels.ROWS = kernels.ROWS, 0
                    try:
                        onednn = f"{thinkforge_rate(m, ids, rows, a.new, a.repeats, fast=True, top_p=a.top_p):.0f}"
                    finally:
                        kernels.ROWS = at_most
                plain = thinkforge_rate(m, ids, rows, a.new, 1, fast=False, top_p=a.top_p)
                results[(precision, rows)] = (ours, theirs)
                print(f"| {precision} | {weights / 1e6:.0f} | {bw / weights:.0f} | {rows} | {theirs:.0f} | {ours:.0f} | "
                      f"{ours / theirs:.2f} | {onednn} | {plain:.0f} |", flush=True)
            gguf.unlink()
    if Path(a.q4).is_file():
        q4 = {rows: llama_cpp(Path(a.q4), ids, rows, a.new, a.threads, a.repeats, a.top_p) for rows in a.rows}
        size = Path(a.q4).stat().st_size
        print(f"| Q4_1 (llama.cpp only, for context) | {size / 1e6:.0f} | {bw / size:.0f} | "
              + ", ".join(f"{r}: {v:.0f}" for r, v in q4.items()) + " | | | | | |")
    precision = "bf16" if ("bf16", a.rows[0]) in results else "f32"
    ours, theirs = results[(precision, a.rows[0])]
    nucleus = f"_top_p_{a.top_p}" if a.top_p < 1 else ""
    print(json.dumps({"metric": f"cpu_decode_tok_per_s_{precision}_{a.rows[0]}_row{nucleus}", "thinkforge": round(ours, 1),
                      "peer": round(theirs, 1), "ratio": round(ours / theirs, 3)}))


if __name__ == "__main__":
    main()
