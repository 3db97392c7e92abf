"""Supervised fine-tuning: stage 1 (mid-training, packed) and stage 2 (SFT, unpacked).

    L = -(1/N) sum over completion tokens of log pi(y_t | x, y_<t)      (SPEC 4; N = the step's tokens)

Reads top to bottom as the algorithm: tokenise -> (pack) -> for each step: micro-batches -> loss ->
backward -> clip -> update -> log -> checkpoint. A rerun with the same run folder resumes from the newest
checkpoint at the same step with the same data order.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from thinkforge.config import Recipe, SFTConfig
from thinkforge.data.packing import Example, collate_packed, collate_padded, pack, tokenize
from thinkforge.errors import UserError
from thinkforge.formats import prompt_renderer
from thinkforge.io import read_jsonl
from thinkforge.losses import Normaliser, label_mask, normaliser, shift_labels
from thinkforge.monitor import progress_bar
from thinkforge.train import dist as distributed
from thinkforge.train import loop
from thinkforge.train.head import final, hidden_states


def load_examples(path: str, tokenizer, recipe: Recipe, max_len: int) -> list[Example]:
    rows = read_jsonl(path, required=["question", "completion"])
    if not rows:
        raise UserError(f"{path}: no training rows")
    prompt = prompt_renderer(recipe.model, tokenizer)
    return [tokenize(tokenizer, prompt(r["question"]), r["completion"], max_len) for r in rows]


def build_rows(examples: list[Example], cfg: SFTConfig) -> list:
    """Training rows: bins of examples (packed) or the examples themselves."""
    return pack(examples, cfg.max_len) if cfg.packing else examples


def collate(rows: list, cfg: SFTConfig, pad_id: int) -> dict:
    if cfg.packing:
        ids, labels, pos = collate_packed(rows, cfg.max_len, pad_id)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}  # no attention_mask: see packing.py
    ids, labels, attn = collate_padded(rows, pad_id)
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def n_tokens(row) -> int:
    """A row's real tokens, its eos included (counting ids unequal to pad misses eos where pad == eos)."""
    return sum(len(d) for d in row) if isinstance(row, list) else len(row)


def step_normaliser(batches: list[dict]) -> Normaliser:
    """The step's loss normaliser: its completion tokens over every micro-batch (SPEC 4's N)."""
    return sum(normaliser(label_mask(b["labels"]), "token") for b in batches)


def forward_loss(model, batch: dict, norm: Normaliser, chunk: int | None = None) -> torch.Tensor:
    """SPEC 4's SFT loss of this micro-batch (its share of the step's `norm`), the output layer applied a chunk
    of completion tokens at a time (train/head.py: never the (B, T, V) logits)."""
    inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    with hidden_states(model, chunk) as head:
        hidden = final(model(**inputs, use_cache=False))  # (B, T, D)
    logp, mask = head.logprobs(hidden, shift_labels(batch["labels"].to(model.device)))  # (B, T)
    return norm(-logp, mask)


def main(recipe: Recipe, stage: str, run_dir: str | Path, data: str | None = None, progress: bool = True,
         stop_after: int | None = None) -> Path | None:
    """Train stage `stage` ("midtrain" or "sft") into run_dir; returns the final model folder.

    stop_after: checkpoint and return None after that many steps, as an interruption would (the schedule
    still spans the whole run, so a rerun continues exactly).
    """

    cfg: SFTConfig = getattr(recipe, stage)
    data = data or cfg.data
    if not data:
        raise UserError(f"{stage}.data is not set: pass --data FILE.jsonl (rows with question and completion)")
    run_dir = Path(run_dir)
    final_dir = run_dir / "final"
    loop.seed_everything(recipe.seed)
    dist = distributed.init(recipe.collective_timeout)
    model, tok, ckpt = loop.load_for_training(recipe, run_dir)
    model.train()  # dropout on (the config's, lora.dropout): no pass here is compared with another, unlike DPO and RL
    ddp = dist.wrap(model)  # the model the loss runs through (DDP over the ranks)

    examples = load_examples(data, tok, recipe, cfg.max_len)
    rows = build_rows(examples, cfg)
    per_step = cfg.batch_size * cfg.grad_accum
    n_steps = loop.total_steps(len(rows), per_step, cfg.epochs, cfg.max_steps)
    warmup = int(cfg.optim.warmup_ratio * n_steps)
    optimizer = loop.make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay)
    start = 0
    if ckpt:
        start = loop.restore(ckpt, optimizer, model, dist)["step"]
    metrics = loop.Metrics(run_dir, resume_step=start, write=dist.main)
    n_tok = sum(len(e) for e in examples)
    steps_per_epoch = loop.total_steps(len(rows), per_step, 1)
    compiled = loop.start_entries(recipe, model, "sft", n_tok / steps_per_epoch * n_steps, cfg.mixed_precision, run_dir,
                                   resumed=start > 0)  # the whole stage's: a resumed run decides alike
    if start == 0:
        metrics.log(0, {"event": "start", "documents": len(examples), "rows": len(rows), "steps": n_steps,
                        "tokens": n_tok, "packing": cfg.packing, **compiled})

    device = str(model.device)
    checkpoints = loop.Checkpoints(run_dir, stage, n_steps, cfg.checkpoints.every, cfg.checkpoints.keep, stop_after, dist)
    bar = progress_bar(n_steps, stage, "step", progress and dist.main, start)
    for step in range(start, n_steps):
        t0 = time.time()
        idx = loop.step_indices(len(rows), per_step, recipe.seed, step)  # the global batch, on every rank
        micro = dist.share([idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)])  # this rank's
        batches = [collate([rows[i] for i in mb], cfg, tok.pad_token_id) for mb in micro or [idx[:1]]]
        norm = dist.normaliser(step_normaliser(batches) if micro else Normaliser("token", 0.0))
        loss_sum, rounds = 0.0, dist.rounds(len(micro))
        for r, (k, weight) in enumerate(rounds):
            with dist.sync(ddp, last=r == len(rounds) - 1):
                with loop.autocast(device, cfg.mixed_precision):
                    loss = forward_loss(ddp, batches[k], norm.scaled(weight), cfg.head_chunk)
                loss.backward()
            loss_sum += loss.item()
        lr = loop.lr_at(step, n_steps, cfg.optim.lr, warmup, cfg.optim.min_lr_ratio)
        grad_norm = loop.apply_update(model.parameters(), optimizer, cfg.optim.clip, lr)

        seconds = time.time() - t0
        n_in = sum(int(b["input_ids"].numel()) for b in batches[: len(micro)])
        real = sum(n_tokens(rows[i]) for mb in micro for i in mb)
        loss_sum, n_in, real = dist.all_sum([loss_sum / dist.world, n_in, real])  # the step's, over ranks
        n_in, real = int(n_in), int(real)
        metrics.log(step + 1, {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": real / seconds,
                               "nonpad_share": real / max(1, n_in), "completion_tokens": round(norm.denominator * dist.world),
                               "tokens": real, "step_seconds": seconds})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}", refresh=False)
        if checkpoints.end_of_step(step + 1, model, tok, optimizer):
            return loop.finish(bar, metrics)
    return loop.finish(bar, metrics, model, tok, final_dir, dist)
