"""DPO throughput: thinkforge vs TRL's DPOTrainer, same tiny model, pairs and batch, in one run.

    python benchmarks/dpo_vs_trl.py [--hidden 128 --layers 4 --pairs 256 --batch 8]
    python benchmarks/dpo_vs_trl.py --model models/smollm2-135m-instruct --lora --autocast --pairs 64

Both precompute the reference log-probs before training (TRL: precompute_ref_log_probs=True) and train one
epoch, sigmoid loss, beta 0.1, fp32 weights, no gradient checkpointing (TRL's default is on), every dropout off
(thinkforge's DPO and TRL's disable_dropout alike). --autocast: bf16 autocast on both sides; --lora: r 16, alpha
32 on the same modules, the reference being the base without the adapter on both sides. Pairs/s counts
training only (thinkforge: the sum of step times in metrics.jsonl; TRL: trainer.train()). Prints a table, then one JSON line.
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


def make_pairs(work: Path, n: int, hidden: int, layers: int, heads: int, model: str | None = None):
    from thinkforge import tasks, tiny
    from thinkforge.config import InitConfig
    from thinkforge.data import distill, pairs

    model_dir = model or tiny.init_model(work / "model", InitConfig(arch="phi3", hidden=hidden, layers=layers, heads=heads))
    probs = tasks.load("synthetic").problems("train", 2 * n, 0, [2])
    distill.main(probs, distill.SyntheticTeacher(0.5, 0), 4, work / "d.jsonl", progress=False)
    stats = pairs.main([work / "d.jsonl"], work / "pairs.jsonl")
    lines = (work / "pairs.jsonl").read_text().splitlines()[:n]
    (work / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(model_dir), work / "pairs.jsonl", min(n, stats["pairs"])


def run_thinkforge(model_dir, data, work, batch, lora: bool = False, autocast: bool = False) -> dict:
    from thinkforge.config import load_config
    from thinkforge.train import dpo

    recipe = load_config(None, [f"model.name_or_path={model_dir}", f"model.system_prompt={SYSTEM}", "dpo.max_len=512",
                                f"dpo.batch_size={batch}", "dpo.grad_accum=1", "dpo.optim.lr=1e-5", "dpo.epochs=1",
                                f"lora.enabled={str(lora).lower()}", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
                                f"dpo.mixed_precision={'bf16' if autocast else 'no'}"])
    dpo.main(recipe, "dpo", work / "tf", data=str(data), progress=False)
    rows = [json.loads(x) for x in (work / "tf" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"seconds": sum(r["step_seconds"] for r in rows), "steps": len(rows)}


def run_trl(model_dir, data, work, batch, lora: bool = False, autocast: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from thinkforge.formats import render_prompt
    from thinkforge.io import read_jsonl

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": render_prompt(r["question"], "auto", SYSTEM, tok), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in read_jsonl(data)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # TRL 1.16 defaults gradient_checkpointing (and bf16) to True; thinkforge runs without: same settings both sides
    args = DPOConfig(output_dir=str(work / "trl"), beta=0.1, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     learning_rate=1e-5, num_train_epochs=1, report_to="none", save_strategy="no", use_cpu=True,
                     precompute_ref_log_probs=True, disable_tqdm=True, logging_steps=10, seed=0, max_length=512,
                     bf16=autocast,
                     gradient_checkpointing=False)
    peft_config = None
    if lora:
        from peft import LoraConfig

        from thinkforge.models import default_lora_targets

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=default_lora_targets(model),
                                 task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_config)
    start = time.time()
    out = trainer.train()
    return {"seconds": time.time() - start, "steps": out.global_step}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default=None, help="A model folder instead of a tiny random one (e.g. models/smollm2-135m-instruct)")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--autocast", action="store_true", help="fp32 weights, bf16 autocast (CPU with AMX; TRL: bf16=True)")
    a = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data, n = make_pairs(work, a.pairs, a.hidden, a.layers, a.heads, a.model)
        tf = run_thinkforge(model_dir, data, work, a.batch, a.lora, a.autocast)
        trl = run_trl(model_dir, data, work, a.batch, a.lora, a.autocast)
    rate = {"tf": n / tf["seconds"], "trl": n / trl["seconds"]}
    shape = a.model or f"phi3 hidden {a.hidden} x {a.layers} layers"
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {shape}, {n} pairs, batch {a.batch}, "
          f"one epoch, lora {a.lora}, autocast {a.autocast}")
    print("| run | seconds | steps | pairs/s |\n|---|---|---|---|")
    print(f"| thinkforge dpo | {tf['seconds']:.1f} | {tf['steps']} | {rate['tf']:.3g} |")
    print(f"| TRL DPOTrainer | {trl['seconds']:.1f} | {trl['steps']} | {rate['trl']:.3g} |")
    print(json.dumps({"metric": "dpo_pairs_per_s", "thinkforge": round(rate["tf"], 2), "peer": round(rate["trl"], 2),
                      "ratio": round(rate["tf"] / rate["trl"], 3)}))


if __name__ == "__main__":
    main()
