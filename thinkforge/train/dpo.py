"""Stage 3: rollout preference learning with DPO (or IPO) against the stage-2 model as reference.

    h_w = log pi(y_w|x) - log pi_ref(y_w|x),  h_l likewise;  L = -log sigmoid(beta (h_w - h_l))   (SPEC 4)

The reference log-probabilities are computed once, before the first update, with the starting weights (the
stage-2 model; with a fresh LoRA adapter that is the base with the adapter at zero), and saved in the run
folder: no second model is kept in memory and a resumed run uses the same reference.
Reads top to bottom: tokenise pairs -> reference pass -> for each step: micro-batches of pairs, each pair's
prompt run once and continued by chosen and rejected -> sequence log-probs -> loss -> backward -> clip ->
update -> log -> checkpoint.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from thinkforge import models
from thinkforge.config import DPOConfig, Recipe
from thinkforge.data.packing import Example, tokenize
from thinkforge.errors import UserError
from thinkforge.formats import prompt_renderer
from thinkforge.io import read_jsonl
from thinkforge.losses import Normaliser, dpo_loss, normaliser
from thinkforge.monitor import progress_bar
from thinkforge.rollout.types import Rollout
from thinkforge.train import dist as distributed
from thinkforge.train import loop
from thinkforge.train.forward import forward_logp

Pair = tuple[Example, Example]  # (chosen, rejected), same prompt


def load_pairs(path: str, tokenizer, recipe: Recipe, max_len: int) -> list[Pair]:
    rows = read_jsonl(path, required=["question", "chosen", "rejected"])
    if not rows:
        raise UserError(f"{path}: no preference pairs")
    render = prompt_renderer(recipe.model, tokenizer)
    out = []
    for r in rows:
        prompt = render(r["question"])
        out.append((tokenize(tokenizer, prompt, r["chosen"], max_len), tokenize(tokenizer, prompt, r["rejected"], max_len)))
    return out


def pair_logprobs(model, pairs: list[Pair], pad_id: int, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of chosen and rejected completions. -> (B,), (B,)

    A pair is an RL group of two: its prompt runs once and its KV cache is repeated for both continuations
    (train.forward.forward_logp; under gradient checkpointing each row runs whole), where the prompt once
    ran twice, with chosen and with rejected."""
    if any(c.prompt != r.prompt for c, r in pairs):
        raise ValueError("a preference pair's chosen and rejected continue different prompts")
    rows = Rollout.build([c.prompt for c, _ in pairs], [x.completion for pair in pairs for x in pair],
                         [i // 2 for i in range(2 * len(pairs))], pad_id, rewards=[0.0] * (2 * len(pairs)))
    logp, _, _ = forward_logp(model, rows, slice(0, 2 * len(pairs)), chunk=chunk)  # (2B, C): 0 past each completion
    seq = logp.sum(-1)  # (2B,) chosen, rejected, chosen, ...
    return seq[0::2], seq[1::2]


def model_identity(source: str) -> str:
    """A model as the reference log-probs depend on it: a local folder by the contents of its config and weight
    files (not its path: a moved run folder is the same model; not their sizes: a model retrained in place keeps
    its shapes), a hub id by its name.

    It reads every weight byte once per run, on each rank, streamed in blocks (hashlib.file_digest): sha256 ran
    at 1.4 GB/s on one core of our CPU box (SHA-NI; blake2b 0.8 GB/s), ~5 s for a 7.6 GB bf16 checkpoint that
    the load has just put in the page cache, next to minutes of reference pass."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
            with open(f, "rb") as stream:
                h.update(f"{f.name}:{hashlib.file_digest(stream, 'sha256').hexdigest()}|".encode())
    return h.hexdigest()


def reference_key(pairs: list[Pair], start_model: str, precision: str) -> str:
    """What the reference log-probs were computed from: every pair's token ids, the start model and the
    precision. A pairs file regenerated with as many pairs is another file (it was once validated by count)."""
    h = hashlib.sha256(f"{start_model}|{precision}".encode())
    for chosen, rejected in pairs:
        h.update(repr((chosen.prompt, chosen.completion, rejected.prompt, rejected.completion)).encode())
    return h.hexdigest()


def step_normaliser(n_pairs: int) -> Normaliser:
    """A pair is a row of the sequence normaliser: the step's loss is the mean over its n_pairs pairs."""
    return normaliser(torch.ones(n_pairs, 1), "sequence")


def backward(model, batch: list[Pair], ref: torch.Tensor, norm: Normaliser, cfg: DPOConfig, pad_id: int) -> tuple[float, dict]:
    """Backpropagate these pairs' share of the step's loss (ref: their (b, 2) reference log-probs); returns
    the share and the pair-mean statistics."""
    with loop.autocast(str(model.device), cfg.mixed_precision):
        chosen, rejected = pair_logprobs(model, batch, pad_id, cfg.head_chunk)
    r = ref.to(chosen.device)
    losses, parts = dpo_loss(chosen.float(), rejected.float(), r[:, 0], r[:, 1], cfg.beta, cfg.loss)  # (b,)
    loss = norm(losses.unsqueeze(-1), torch.ones_like(losses).unsqueeze(-1))
    loss.backward()
    return loss.item(), parts


@torch.no_grad()
def reference_logprobs(model, pairs: list[Pair], pad_id: int, batch_size: int, chunk: int | None = None) -> torch.Tensor:
    """(N, 2) reference log-probs [chosen, rejected] with the current weights, dropout off."""
    out = []
    with models.eval_mode(model):
        for i in range(0, len(pairs), batch_size):
            c, r = pair_logprobs(model, pairs[i : i + batch_size], pad_id, chunk)
            out.append(torch.stack([c, r], -1).float().cpu())
    return torch.cat(out)


def main(recipe: Recipe, stage: str, run_dir: str | Path, data: str | None = None, progress: bool = True,
         stop_after: int | None = None) -> Path | None:
    """Train stage `stage` (a DPO section of the recipe, "dpo") into run_dir; returns the final model folder.
    The signature every stage shares (thinkforge/stages.py)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cfg: DPOConfig = getattr(recipe, stage)
    data = data or cfg.data
    if not data:
        raise UserError(f"{stage}.data is not set: pass --data PAIRS.jsonl (rows with question, chosen, rejected)")
    run_dir = Path(run_dir)
    loop.seed_everything(recipe.seed)
    dist = distributed.init(recipe.collective_timeout)
    model, tok, ckpt = loop.load_for_training(recipe, run_dir)
    models.disable_dropout(model)  # the implicit rewards compare the policy's pass with the reference's

    pairs = load_pairs(data, tok, recipe, cfg.max_len)
    ref_path = run_dir / "reference_logps.safetensors"
    precision = "bf16" if loop.uses_bf16(str(model.device), cfg.mixed_precision) else "fp32"  # computed, not asked
    key = reference_key(pairs, model_identity(loop.start_model(recipe, run_dir)),
                        f"{precision}|{loop.weights_dtype(recipe, str(model.device))}")
    ref = None
    if ref_path.is_file():
        with safe_open(str(ref_path), "pt") as f:
            made_for = (f.metadata() or {}).get("key")
        if made_for == key:
            ref = load_file(str(ref_path))["logps"]
        elif ckpt:
            raise UserError(f"{ref_path} was computed for other pairs (or another start model, another precision: "
                            f"this host computes {precision} under {stage}.mixed_precision={cfg.mixed_precision}, or by an "
                            f"older thinkforge) than {data}, and {run_dir} has checkpoints trained on them; use a new run "
                            "folder, or resume on a host that computes as the first did")
    if ref is None:
        if ckpt:
            raise UserError(f"{run_dir} has checkpoints but no reference log-probs; use a new run folder")
        with loop.autocast(str(model.device), cfg.mixed_precision):  # the precision of the loss's own pass
            ref = reference_logprobs(model, pairs, tok.pad_token_id, cfg.batch_size, cfg.head_chunk)  # (N, 2), on every rank
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_file({"logps": ref}, str(ref_path), metadata={"key": key})
    model.train()
    ddp = dist.wrap(model)

    per_step = cfg.batch_size * cfg.grad_accum
    n_steps = loop.total_steps(len(pairs), per_step, cfg.epochs, cfg.max_steps)
    warmup = int(cfg.optim.warmup_ratio * n_steps)
    optimizer = loop.make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay)
    start = loop.restore(ckpt, optimizer, model, dist)["step"] if ckpt else 0
    metrics = loop.Metrics(run_dir, resume_step=start, write=dist.main)
    pair_tokens = sum(len(c) + len(r.completion) for c, r in pairs)  # a pair's prompt runs once
    compiled = loop.start_entries(recipe, model, "dpo", pair_tokens / loop.total_steps(len(pairs), per_step, 1) * n_steps,
                                   cfg.mixed_precision, run_dir, resumed=start > 0)
    if start == 0:
        metrics.log(0, {"event": "start", "pairs": len(pairs), "steps": n_steps, **compiled})
    checkpoints = loop.Checkpoints(run_dir, stage, n_steps, cfg.checkpoints.every, cfg.checkpoints.keep, stop_after, dist)
    bar = progress_bar(n_steps, stage, "step", progress and dist.main, start)
    for step in range(start, n_steps):
        t0 = time.time()
        idx = loop.step_indices(len(pairs), per_step, recipe.seed, step)  # the global batch, on every rank
        micro = dist.share([idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)])  # this rank's
        norm = dist.normaliser(step_normaliser(sum(len(mb) for mb in micro)))
        totals: dict[str, float] = {}
        rounds = dist.rounds(len(micro))
        for r, (k, weight) in enumerate(rounds):
            mb = (micro or [idx[:1]])[k]
            with dist.sync(ddp, last=r == len(rounds) - 1):
                loss, parts = backward(ddp, [pairs[j] for j in mb], ref[mb], norm.scaled(weight), cfg, tok.pad_token_id)
            share = weight * len(mb) / len(idx)  # the statistics are pair means: weight each micro-batch by its pairs
            totals["loss"] = totals.get("loss", 0.0) + loss / dist.world
            for key, v in parts.items():
                totals[key] = totals.get(key, 0.0) + v * share
        totals = dict(zip(totals, dist.all_sum(list(totals.values())), strict=True))  # the step's, over ranks
        lr = loop.lr_at(step, n_steps, cfg.optim.lr, warmup, cfg.optim.min_lr_ratio)
        grad_norm = loop.apply_update(model.parameters(), optimizer, cfg.optim.clip, lr)
        seconds = time.time() - t0
        metrics.log(step + 1, {**totals, "lr": lr, "grad_norm": grad_norm, "pairs_per_s": len(idx) / seconds,
                               "step_seconds": seconds})
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.3f}", acc=f"{totals['preference_accuracy']:.2f}", refresh=False)
        if checkpoints.end_of_step(step + 1, model, tok, optimizer):
            return loop.finish(bar, metrics)
    return loop.finish(bar, metrics, model, tok, run_dir / "final", dist)
