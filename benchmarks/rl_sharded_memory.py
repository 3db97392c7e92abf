"""Peak resident memory per rank of full-parameter RL on 2 ranks: DDP against FSDP2, the same model and steps.

    python benchmarks/rl_sharded_memory.py                  # hidden 768 x 12 layers (85M parameters)
    python benchmarks/rl_sharded_memory.py --hidden 256 --layers 2 --steps 1   # a quick check

GRPO with beta 0.04 (a frozen reference: full fine-tuning keeps a second model) and the in-process backend
(every rank generates its share; under FSDP2 in lockstep). Under DDP every rank holds the whole policy, its
gradients, its AdamW moments and the whole reference; under FSDP2 each rank holds its shard of all four (plus
the layers gathered in flight). Each configuration runs `accelerate launch --num_processes 2` on gloo ranks;
each rank records its own peak (`ru_maxrss`) after the stage. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def recipe_args(model: str, steps: int) -> list[str]:
    return [f"model.name_or_path={model}", f"rl.steps={steps}", "rl.preflight=false", "rl.prompts_per_step=4",
            "rl.group_size=4", "rl.max_new_tokens=16", "rl.micro_batch=8", "rl.beta=0.04", "rl.checkpoints.every=0",
            "rl.reward=weighted", "rewards.weights={'format': 1.0}"]


def child(a) -> None:
    """One rank: the RL stage, then this process's peak."""
    from thinkforge.config import load_config
    from thinkforge.stages import STAGES
    from thinkforge.train.dist import leave

    recipe = load_config(None, recipe_args(a.model, a.steps))
    t0 = time.time()
    STAGES["rl"].run(recipe, Path(a.out) / "run", progress=False)
    rank = int(os.environ.get("RANK", "0"))
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "seconds": time.time() - t0,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    leave()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    work = Path(tempfile.mkdtemp(prefix="rl-sharded-"))
    model = tiny.init_model(work / "model", InitConfig(hidden=a.hidden, layers=a.layers, heads=max(1, a.hidden // 64)))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(t.numel() for t in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
    rows = []
    for strategy in ("ddp", "fsdp2"):
        out = work / strategy
        out.mkdir()
        how = ["--multi_gpu"] if strategy == "ddp" else ["--use_fsdp", "--fsdp_version", "2"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--main_process_port",
               _port(), __file__, "--child", "--model", str(model), "--out", str(out), "--steps", str(a.steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"{strategy} failed:\n{r.stderr[-3000:]}")
        ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
        rows.append({"strategy": strategy, "peak_gb": max(x["peak_gb"] for x in ranks),
                     "seconds": max(x["seconds"] for x in ranks), "ranks": ranks})
        print(rows[-1], file=sys.stderr, flush=True)
    state = params * (4 + 4 + 8 + 4) / 2**30  # fp32 weights, gradients, AdamW moments, reference
    print(f"Model: {params / 1e6:.1f}M parameters (hidden {a.hidden} x {a.layers} layers); training state with the "
          f"reference: {state:.2f} GB whole\n")
    print("| strategy | peak per rank GB | seconds |\n|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['peak_gb']:.2f} | {r['seconds']:.1f} |")
    ddp, fsdp = rows[0]["peak_gb"], rows[1]["peak_gb"]
    print(json.dumps({"metric": "rl_peak_gb_per_rank", "params": params, "ddp": round(ddp, 2), "fsdp2": round(fsdp, 2),
                      "fsdp2_over_ddp": round(fsdp / ddp, 3)}))


if __name__ == "__main__":
    main()
