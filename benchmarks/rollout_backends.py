"""Rollouts on the two backends, same model, same settings: transformers in-process (hf) vs a vLLM server.

    python benchmarks/rollout_backends.py [--hidden 512 --layers 8 --heads 8 --rounds 3]
    python benchmarks/rollout_backends.py --vllm-command "vllm serve" --device cuda   # on a GPU

8 prompts x 8 samples x up to 128 new tokens at temperature 1.0 (a random-init model stops early now and
then: tokens/s counts the tokens really generated). Generation: the median over `--rounds` calls after one
warm-up call; the vLLM server's start is timed apart. Then one GRPO step on each backend (`thinkforge rl`,
3 steps of 8 prompts x 8 samples; the median of steps 2-3): step seconds, of which generation, and the
weight sync's seconds (vLLM: full weights reloaded in place, then checked). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"{name} has {a} apples and buys {b} more. How many apples does {name} have now?"
           for name, a, b in [("Mia", 3, 4), ("Leo", 7, 2), ("Ana", 12, 9), ("Sam", 5, 5), ("Zoe", 21, 3),
                              ("Max", 8, 13), ("Eva", 30, 11), ("Tom", 2, 40)]]


def time_generation(gen, tok, a) -> dict:
    from thinkforge.formats import render_prompt
    from thinkforge.rollout.types import SamplingParams

    prompts = [render_prompt(p, "auto", "Solve it step by step.", tok) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=1.0, seed=0)
    gen.generate(prompts, 8, params)  # warm-up
    times, tokens = [], []
    for r in range(a.rounds):
        t0 = time.perf_counter()
        out = gen.generate(prompts, 8, SamplingParams(**{**params.__dict__, "seed": r + 1}))
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(c.token_ids) for c in out))
    s = statistics.median(times)
    return {"seconds": s, "tokens": int(statistics.median(tokens)), "tokens_per_s": statistics.median(tokens) / s}


def grpo_step(model_dir: str, backend: str, work: Path, a) -> dict:
    from thinkforge.config import load_config
    from thinkforge.train import rl

    run = work / f"rl-{backend}"
    server = [f"rollout.vllm_command={json.dumps(a.vllm_command)}", "rollout.max_model_len=1024"]
    # No preflight: a random-init model earns no reward variance, so the learnability check would stop the run
    # before the steps this measures (it runs before step 1; PITFALLS 24: it once broke this script).
    recipe = load_config(None, [f"model.name_or_path={model_dir}", f"model.device={a.device}", "rl.steps=3",
                                "rl.preflight=false", "rl.prompts_per_step=8", "rl.group_size=8",
                                f"rl.max_new_tokens={a.max_new_tokens}", "rl.gen_batch=64", "rl.micro_batch=16",
                                "rl.optim.lr=1e-5", "rl.checkpoints.every=0", "rl.temperature_start=null",
                                "rl.temperature=1.0", f"rollout.backend={backend}", *(server if backend == "vllm" else [])])
    rl.main(recipe, "rl", run, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"pg_loss"' in x][1:]
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("step_seconds", "gen_seconds", "sync_seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8, help="hidden / heads must be a head size vLLM supports (32, 64, 80, ...)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vllm-command", default=f"{ROOT / '.venv-vllm' / 'bin' / 'python'} -m vllm.entrypoints.openai.api_server")
    p.add_argument("--model", default=None, help="A model folder instead of a tiny random one (e.g. models/smollm2-135m-instruct)")
    p.add_argument("--no-grpo", action="store_true", help="generation only, no GRPO steps")
    a = p.parse_args()

    import torch

    from thinkforge import models, tiny
    from thinkforge.config import InitConfig, RolloutConfig
    from thinkforge.rollout.hf import HFGenerator
    from thinkforge.train.backend import make_backend
    from thinkforge.train.dist import Dist

    work = Path(tempfile.mkdtemp(prefix="tf-rollout-bench-"))
    model_dir = a.model or str(tiny.init_model(work / "model", InitConfig(arch="phi3", hidden=a.hidden, layers=a.layers,
                                                                          heads=a.heads)))
    model, tok = models.load(model_dir, device=a.device)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"hf": time_generation(HFGenerator(model, tok, 64), tok, a)}
    cfg = RolloutConfig(backend="vllm", vllm_command=a.vllm_command, max_model_len=1024)
    t0 = time.perf_counter()
    with contextlib.closing(make_backend(model, tok, 64, cfg, work / "gen", Dist(), max_new_tokens=a.max_new_tokens)) as backend:
        start = time.perf_counter() - t0
        res["vllm"] = time_generation(backend.sampler, tok, a) | {"start_seconds": start}
    del model
    none = {"step_seconds": float("nan"), "gen_seconds": float("nan"), "sync_seconds": float("nan")}
    steps = {b: none if a.no_grpo else grpo_step(model_dir, b, work, a) for b in ("hf", "vllm")}

    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    shape = a.model or f"phi3 hidden {a.hidden} x {a.layers} layers"
    print(f"{device}, torch {torch.__version__}, {shape} ({n_params / 1e6:.1f}M parameters), "
          f"8 prompts x 8 samples, up to {a.max_new_tokens} new tokens, temperature 1.0, {a.rounds} rounds")
    print("| backend | generate s | tokens | tokens/s | GRPO step s | of it generation s | weight sync s |\n|---|---|---|---|---|---|---|")
    for b in ("hf", "vllm"):
        g, s = res[b], steps[b]
        print(f"| {b} | {g['seconds']:.2f} | {g['tokens']} | {g['tokens_per_s']:.0f} | {s['step_seconds']:.2f} | "
              f"{s['gen_seconds']:.2f} | {s['sync_seconds']:.3f} |")
    print(f"vLLM server start: {res['vllm']['start_seconds']:.1f} s")
    print(json.dumps({"metric": "rollout_tokens_per_s", "hf": round(res["hf"]["tokens_per_s"], 1),
                      "vllm": round(res["vllm"]["tokens_per_s"], 1),
                      "ratio": round(res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 3),
                      "grpo_step_seconds": {b: round(s["step_seconds"], 3) for b, s in steps.items()},
                      "vllm_sync_seconds": round(steps["vllm"]["sync_seconds"], 4)}))


if __name__ == "__main__":
    main()
