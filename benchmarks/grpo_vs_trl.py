"""One GRPO step: thinkforge vs TRL's GRPOTrainer on identical settings, in one run.

    python benchmarks/grpo_vs_trl.py [--hidden 128 --layers 4 --steps 4]
    python benchmarks/grpo_vs_trl.py --arch phi --hidden 2560 --layers 32 --heads 32 --lora --bf16 \\
        --max-new-tokens 384 --only thinkforge        # Phi-2 shape on a GPU

Same tiny model folder, 8 prompts x 8 samples (G = 8), exactly `--max-new-tokens` new tokens per sample
(min_new_tokens is set in the model's generation_config and in TRL's generation_kwargs), mu = 1
(num_iterations 1), beta = 0.04, the same +1/-1 verifiable reward, one optimizer step per rollout batch.
The two trainers run in alternating rounds (thinkforge, TRL, thinkforge, TRL, ... `--rounds` each, a fresh
trainer per round) so that a slow spell of the machine hits both; seconds per step are the median over every
round's steps 2..N (step 1 pays warm-up). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SYSTEM = "Solve it step by step."


def make_model(work: Path, a) -> str:
    import shutil

    from transformers import GenerationConfig

    from thinkforge import tiny
    from thinkforge.config import InitConfig

    if a.model:  # a real model folder: a copy, whose generation config is changed below
        path = Path(shutil.copytree(a.model, work / "model"))
    else:
        path = tiny.init_model(work / "model", InitConfig(arch=a.arch, hidden=a.hidden, layers=a.layers, heads=a.heads))
    gc = GenerationConfig.from_pretrained(path)
    gc.min_new_tokens = a.max_new_tokens  # every sample exactly max_new_tokens long, in both trainers
    gc.save_pretrained(path)
    return str(path)


def run_thinkforge(model_dir: str, work: Path, a) -> dict:
    import shutil

    shutil.rmtree(work / "tf", ignore_errors=True)
    from thinkforge.config import load_config
    from thinkforge.train import rl

    # No preflight: every sample is cut at max_new_tokens by design (equal work on both sides) and a random model
    # earns no reward variance, so the learnability check would stop the run; it runs before step 1 and TRL has
    # none, so the steps timed are the same with or without it (PITFALLS 24: it once broke this script).
    over = [f"model.name_or_path={model_dir}", f"model.system_prompt={SYSTEM}", "rl.algo=grpo", f"rl.steps={a.steps}",
            "rl.preflight=false", "rl.prompts_per_step=8", "rl.group_size=8", f"rl.max_new_tokens={a.max_new_tokens}",
            "rl.mu=1", "rl.beta=0.04", "rl.optim.lr=1e-5", "rl.temperature=1.0", "rl.temperature_start=null", "rl.top_p=1.0",
            "rl.truncation=none", "rl.loss_agg=sequence", f"rl.micro_batch={a.micro_batch}", "rl.gen_batch=64",
            "rl.checkpoints.every=0", "rl.difficulties=[1]"]
    if a.lora:
        over.append("lora.enabled=true")
    if a.bf16:
        over.append("model.dtype=bfloat16")
    if a.autocast:
        over.append("rl.mixed_precision=bf16")
    recipe = load_config(None, over)
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rl.main(recipe, "rl", work / "tf", progress=False)
    rows = [json.loads(x) for x in (work / "tf" / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    timed = rows[1:] or rows
    return {"times": [r["step_seconds"] for r in timed], "gen_times": [r["gen_seconds"] for r in timed],
            "tokens": rows[-1]["response_tokens"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def run_trl(model_dir: str, work: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinkforge import tasks
    from thinkforge.formats import render_prompt
    from thinkforge.rewards import verifiable

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    probs = tasks.load("synthetic").problems("train", 8 * (a.steps + 1), 0, [1])
    ds = Dataset.from_list([{"prompt": render_prompt(p.question, "auto", SYSTEM, tok), "reference": p.reference} for p in probs])

    def reward(completions, reference, **_):
        return [verifiable(c, r) for c, r in zip(completions, reference, strict=True)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *args, **kw):
            self.t0 = time.time()

        def on_step_end(self, *args, **kw):
            self.times.append(time.time() - self.t0)

    timer = Timer()
    # TRL 1.16 defaults gradient_checkpointing (and bf16) to True and GRPO's disable_dropout to False: set as thinkforge runs
    args = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=64, num_generations=8,
                      gradient_accumulation_steps=1, max_completion_length=a.max_new_tokens, num_iterations=1,
                      beta=0.04, learning_rate=1e-5, temperature=1.0, top_p=1.0, max_steps=a.steps, logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=a.bf16 or a.autocast,
                      generation_kwargs={"min_new_tokens": a.max_new_tokens}, disable_tqdm=True, seed=0,
                      gradient_checkpointing=False, disable_dropout=True)  # thinkforge's RL turns every dropout off
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if a.bf16 else torch.float32)
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        from thinkforge.models import default_lora_targets

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=default_lora_targets(model),
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[timer], peft_config=peft_config)
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    timed = timer.times[1:] or timer.times
    return {"times": timed, "tokens": lengths[-1] if lengths else None, "peak_gib": None}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="phi3")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    ap.add_argument("--autocast", action="store_true", help="fp32 weights, bf16 autocast (CPU with AMX; TRL: bf16=True)")
    ap.add_argument("--model", default=None, help="A model folder instead of a tiny random one (e.g. models/smollm2-135m-instruct)")
    ap.add_argument("--only", choices=["thinkforge", "trl"], default=None)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each trainer")
    a = ap.parse_args()
    import statistics

    import transformers

    transformers.logging.set_verbosity_error()
    runs: dict[str, list[dict]] = {"thinkforge": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model(work, a)
        for _ in range(a.rounds):
            if a.only != "trl":
                runs["thinkforge"].append(run_thinkforge(model_dir, work, a))
            if a.only != "thinkforge":
                runs["trl"].append(run_trl(model_dir, work, a))
    res = {}
    for name, rs in runs.items():
        if rs:
            times = [t for r in rs for t in r["times"]]
            peaks = [r["peak_gib"] for r in rs if r["peak_gib"] is not None]
            res[name] = {"seconds": statistics.median(times), "rounds": [statistics.median(r["times"]) for r in rs],
                         "tokens": rs[-1]["tokens"], "peak_gib": max(peaks) if peaks else None}
    tf, trl = res.get("thinkforge"), res.get("trl")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    shape = a.model or f"{a.arch} hidden {a.hidden} x {a.layers} layers"
    print(f"{device}, torch {torch.__version__}, {shape}, 8 prompts x 8 samples, {a.max_new_tokens} new tokens, mu 1, "
          f"beta 0.04, lora {a.lora}, bf16 {a.bf16}, autocast {a.autocast}, {a.rounds} rounds x {a.steps} steps")
    print("| run | s/step (median) | per round | new tokens per sample | peak GiB |\n|---|---|---|---|---|")
    for name, r in (("thinkforge rl (grpo)", tf), ("TRL GRPOTrainer", trl)):
        if r:
            peak = None if r["peak_gib"] is None else round(r["peak_gib"], 2)
            print(f"| {name} | {r['seconds']:.2f} | {' / '.join(f'{x:.2f}' for x in r['rounds'])} | {r['tokens']} | {peak} |")
    line = {"metric": "grpo_seconds_per_step", "thinkforge": round(tf["seconds"], 3) if tf else None,
            "peer": round(trl["seconds"], 3) if trl else None,
            "ratio": round(trl["seconds"] / tf["seconds"], 3) if tf and trl else None}
    if not (tf and trl):
        line["peak_gib"] = (tf or trl)["peak_gib"]
    print(json.dumps(line))

if __name__ == "__main__":
    main()
