"""Packed SFT throughput: thinkforge vs TRL's SFTTrainer, same tiny model, data and batch, in one run.

    python benchmarks/sft_vs_trl.py [--hidden 128 --layers 4 --docs 800 --max-len 1024 --batch 4]

Measures non-pad training tokens per second of (1) `thinkforge midtrain` (packing), (2) TRL's
SFTTrainer with packing (its default BFD packing, padding-free), and (3) the raw rate of the same model on
the same packed batches: forward + backward + AdamW step and nothing else. Both trainers see the same
documents (prompt + completion, loss on the completion) for one epoch. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_data(work: Path, docs: int, hidden: int, layers: int, heads: int, model: str | None = None):
    from thinkforge import tasks, tiny
    from thinkforge.config import InitConfig
    from thinkforge.data import distill, selection

    model_dir = model or tiny.init_model(work / "model", InitConfig(arch="phi3", hidden=hidden, layers=layers, heads=heads))
    probs = tasks.load("synthetic").problems("train", docs // 2, 0, [2]) + tasks.load("synthetic").problems("train", docs // 2, 0, [1])
    distill.main(probs, distill.SyntheticTeacher(0.0, 0), 1, work / "d.jsonl", progress=False)
    selection.main(work / "d.jsonl", work / "sel")
    return str(model_dir), work / "sel" / "accepted.jsonl"


def run_thinkforge(model_dir, data, work, max_len, batch, system, autocast=False):
    from thinkforge.config import load_config
    from thinkforge.train import sft

    recipe = load_config(None, [f"model.name_or_path={model_dir}", f"model.system_prompt={system}",
                                f"midtrain.max_len={max_len}", f"midtrain.batch_size={batch}", "midtrain.grad_accum=1",
                                "midtrain.epochs=1", "midtrain.optim.lr=1e-3", "midtrain.optim.warmup_ratio=0.05",
                                f"midtrain.mixed_precision={'bf16' if autocast else 'no'}"])
    run = work / "tf"
    start = time.time()
    sft.main(recipe, "midtrain", run, data=str(data), progress=False)
    wall = time.time() - start
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    tokens = sum(r["tokens"] for r in rows)
    return {"tokens": tokens, "seconds": sum(r["step_seconds"] for r in rows), "wall": wall, "steps": len(rows)}


def run_trl(model_dir, data, work, max_len, batch, system, autocast=False):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from thinkforge.formats import render_prompt
    from thinkforge.io import read_jsonl

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": render_prompt(r["question"], "auto", system, tok), "completion": r["completion"]}
            for r in read_jsonl(data)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # TRL 1.16 defaults gradient_checkpointing (and bf16) to True; thinkforge runs without: same settings both sides
    args = SFTConfig(output_dir=str(work / "trl"), packing=True, max_length=max_len, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=0.05, num_train_epochs=1,
                     lr_scheduler_type="cosine", logging_steps=1, report_to="none", save_strategy="no",
                     dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, seed=0, bf16=autocast,
                     gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    start = time.time()
    out = trainer.train()
    seconds = time.time() - start
    return {"tokens": tokens, "seconds": seconds, "wall": seconds, "steps": out.global_step}


def run_raw(model_dir, data, max_len, batch, system, autocast=False):
    """Forward + backward + optimizer step over the same packed batches, nothing else."""
    import torch

    from thinkforge import models
    from thinkforge.data.packing import collate_packed, pack
    from thinkforge.losses import sft_loss
    from thinkforge.train import sft

    model, tok = models.load(model_dir)
    model.train()
    from thinkforge.config import load_config

    recipe = load_config(None, [f"model.system_prompt={system}"])
    examples = sft.load_examples(str(data), tok, recipe, max_len)
    bins = pack(examples, max_len)
    batches = [collate_packed(bins[i : i + batch], max_len, tok.pad_token_id) for i in range(0, len(bins), batch)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, start = 0, time.time()
    for k, (ids, labels, pos) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = sft_loss(model(input_ids=ids, position_ids=pos, use_cache=False).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(sft.n_tokens(row) for row in bins[k * batch : (k + 1) * batch])  # eos too (pad may be eos)
    return {"tokens": tokens, "seconds": time.time() - start, "steps": len(batches)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--docs", type=int, default=800)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default=None, help="A model folder instead of a tiny random one (e.g. models/smollm2-135m-instruct)")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast on fp32 weights in all three (TRL: bf16=True)")
    a = ap.parse_args()
    torch.manual_seed(0)
    system = "Solve it step by step."
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data = make_data(work, a.docs, a.hidden, a.layers, a.heads, a.model)
        import transformers

        transformers.logging.set_verbosity_error()
        raw = run_raw(model_dir, data, a.max_len, a.batch, system, a.autocast)
        tf = run_thinkforge(model_dir, data, work, a.max_len, a.batch, system, a.autocast)
        trl = run_trl(model_dir, data, work, a.max_len, a.batch, system, a.autocast)
    rate = {k: v["tokens"] / v["seconds"] for k, v in {"raw": raw, "thinkforge": tf, "trl": trl}.items()}
    shape = a.model or f"model hidden {a.hidden} x {a.layers} layers"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {shape}, {a.docs} docs, max_len {a.max_len}, "
          f"batch {a.batch}, bf16 autocast {a.autocast}")
    print("| run | tokens | seconds | steps | tokens/s |\n|---|---|---|---|---|")
    for name, r in (("raw fwd+bwd+step", raw), ("thinkforge sft (packed)", tf), ("TRL SFTTrainer (packed)", trl)):
        print(f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['steps']} | {r['tokens'] / r['seconds']:.0f} |")
    print(f"thinkforge / raw = {rate['thinkforge'] / rate['raw']:.2f}; thinkforge / TRL = {rate['thinkforge'] / rate['trl']:.2f}")
    print(json.dumps({"metric": "sft_packed_tokens_per_s", "thinkforge": round(rate["thinkforge"], 1),
                      "peer": round(rate["trl"], 1), "ratio": round(rate["thinkforge"] / rate["trl"], 3),
                      "raw": round(rate["raw"], 1)}))


if __name__ == "__main__":
    main()
