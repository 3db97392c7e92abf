"""Stage 4: RL with verifiable reward, GRPO or PPO (SPEC 4), with the Phi-4 stability recipe.

Each step reads as the algorithm:
    rollouts = sample(prompts, G each, annealed temperature)      -> Rollout (typed, shapes documented)
    rewards  = score(completions, references)                      +1/-1 or the weighted Infused Phi-2 set
    keep     = filter groups (zero variance, easy, all wrong, uniform length), refill (dynamic sampling)
    adv      = group_advantages(rewards) | GAE over a value head (PPO)
    loss     = policy_loss(logp, old_logp, adv, ref_logp, beta, clip_low/high, aggregation)
    update -> log (rewards per function, accuracy, lengths, KL, clip fraction, entropy, truncation) -> aha

No forward pass is done twice: with mu = 1 the old log-probs are the detached training log-probs; the
reference log-probs come from one no-grad pass (with LoRA: the adapter disabled, no second model).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from thinkforge import models
from thinkforge.config import Recipe, RLConfig
from thinkforge.data.sources import Problem, training_problems
from thinkforge.formats import prompt_renderer
from thinkforge.grading import grade
from thinkforge.losses import (
    IGNORE,
    entropy,
    gae,
    group_advantages,
    overlong_penalty,
    policy_loss,
    token_logprobs,
    value_loss,
)
from thinkforge.monitor import AhaDetector, progress_bar, sample_stats
from thinkforge.rewards import WeightedRewards
from thinkforge.rollout.hf import HFGenerator
from thinkforge.rollout.types import Generator, Rollout, SamplingParams, pad_id
from thinkforge.train import loop


def temperature_at(step: int, cfg: RLConfig) -> float:
    """Linear annealing temperature_start -> temperature over anneal_steps, then fixed (Phi-4 recipe)."""
    if cfg.temperature_start is None or cfg.anneal_steps == 0 or step >= cfg.anneal_steps:
        return cfg.temperature
    return cfg.temperature_start + (cfg.temperature - cfg.temperature_start) * step / cfg.anneal_steps


# ---------------------------------------------------------------- sampling and scoring


def generate_groups(generator: Generator, prompts: list[str], n: int, params: SamplingParams, stats: dict) -> list:
    """n completions per prompt; on out-of-memory the batch is halved and retried, a prompt that still fails
    is skipped and counted (never a crash). Returns per prompt a list of completions or None."""
    out: list = [None] * len(prompts)
    i = 0
    while i < len(prompts):
        per_call = max(1, generator.batch_size // n)
        chunk = prompts[i : i + per_call]
        try:
            comps = generator.generate(chunk, n, SamplingParams(**{**params.__dict__, "seed": params.seed + i}))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if generator.batch_size > n:
                generator.batch_size //= 2
                stats["generation_retries"] = stats.get("generation_retries", 0) + 1
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            stats["generation_failures"] = stats.get("generation_failures", 0) + 1
            stats["last_generation_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            i += len(chunk)
            continue
        for j in range(len(chunk)):
            out[i + j] = [c for c in comps if c.prompt_index == j]
        i += len(chunk)
    return out


def score(text: str, finish: str, problem: Problem, cfg: RLConfig, rewards: WeightedRewards | None) -> tuple[float, dict, bool]:
    """(reward, reward per function, correct) of one completion."""
    correct = grade(text, problem.reference, problem.kind, list(problem.choices) if problem.choices else None)
    if rewards is None:
        total, parts = (1.0 if correct else -1.0), {"verifiable": 1.0 if correct else -1.0}
    else:
        total, parts = rewards.score(text, problem.reference, problem.kind)
    if finish == "length" and cfg.truncation == "penalize":
        total = -1.0 if rewards is None else 0.0
    return total, parts, correct


def keep_group(rewards: list[float], correct: list[bool], lengths: list[int], cfg: RLConfig) -> str | None:
    """None to keep the group, else the reason it is dropped."""
    if cfg.drop_easy and all(correct):
        return "easy"
    if cfg.drop_all_wrong and not any(correct):
        return "all_wrong"
    if cfg.dynamic_sampling and max(rewards) - min(rewards) < 1e-9:
        return "zero_variance"
    if cfg.uniform_length is not None:
        mean = sum(lengths) / len(lengths)
        cv = (sum((x - mean) ** 2 for x in lengths) / len(lengths)) ** 0.5 / max(mean, 1e-9)
        if cv > cfg.uniform_length:
            return "length_spread"
    return None


def collect(step: int, problems: list[Problem], generator: Generator, tok, recipe: Recipe, rewards, prompt_fn) -> tuple[Rollout, dict]:
    """Sample, score and filter until prompts_per_step groups are kept (or refills run out)."""
    cfg = recipe.rl
    g = cfg.group_size
    temperature = temperature_at(step, cfg)
    params = SamplingParams(cfg.max_new_tokens, temperature, cfg.top_p, 0, recipe.seed * 1_000_003 + step * 1000)
    rng = random.Random(f"{recipe.seed}-{step}")  # prompt draws are a pure function of the step: exact resume
    stats: dict = {"temperature": temperature, "dropped": {}, "groups_seen": 0, "zero_variance_groups": 0}
    kept: list[tuple[Problem, list, list[float], list[dict], list[bool]]] = []
    for round_ in range(cfg.max_refills + 1):
        need = cfg.prompts_per_step - len(kept)
        if need <= 0:
            break
        draw = [problems[rng.randrange(len(problems))] for _ in range(math.ceil(need * cfg.oversample))]
        groups = generate_groups(generator, [prompt_fn(p.question) for p in draw], g,
                                 SamplingParams(**{**params.__dict__, "seed": params.seed + 100 * round_}), stats)
        for p, comps in zip(draw, groups, strict=True):
            if comps is None:
                continue
            stats["groups_seen"] += 1
            scored = [score(c.text, c.finish_reason, p, cfg, rewards) for c in comps]
            r = [s[0] for s in scored]
            corr = [s[2] for s in scored]
            if max(r) - min(r) < 1e-9:
                stats["zero_variance_groups"] += 1
            reason = keep_group(r, corr, [len(c.token_ids) for c in comps], cfg)
            if reason:
                stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
            elif len(kept) < cfg.prompts_per_step:
                kept.append((p, comps, r, [s[1] for s in scored], corr))
        if not (cfg.dynamic_sampling or cfg.drop_easy or cfg.drop_all_wrong or cfg.uniform_length):
            break
    if not kept:
        return None, stats

    prompts, completions, rewards_t, correct, group, texts, finish, parts = [], [], [], [], [], [], [], []
    for gi, (p, comps, r, pr, corr) in enumerate(kept):
        prompts.append(tok(prompt_fn(p.question), add_special_tokens=False).input_ids)
        for c, ri, pi, ci in zip(comps, r, pr, corr, strict=True):
            if not c.token_ids and c.text:
                raise RuntimeError("the rollout backend returned text without token ids: the RL loss needs the "
                                   "sampled ids (re-tokenised text can differ from what was sampled)")
            completions.append(list(c.token_ids) or [tok.eos_token_id])
            rewards_t.append(ri)
            parts.append(pi)
            correct.append(ci)
            group.append(gi)
            texts.append(c.text)
            finish.append(c.finish_reason)
    lengths = torch.tensor([len(c) for c in completions])
    r = torch.tensor(rewards_t)
    if cfg.overlong_cache:
        r = r + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_cache)
    rollout = Rollout.build(prompts, completions, group, pad_id(tok), r, correct, [f == "length" for f in finish], texts, g)
    stats.update(sample_stats(texts))
    stats["reward_parts"] = {k: sum(d[k] for d in parts) / len(parts) for k in parts[0]}
    stats["response_tokens"] = lengths.float().mean().item()
    return rollout, stats


# ---------------------------------------------------------------- the update


def completion_mask(rollout: Rollout, cfg: RLConfig) -> torch.Tensor:
    """(N, C) mask of the completion tokens that carry loss."""
    mask = rollout.completion_mask.float()
    if cfg.truncation == "mask":
        mask = mask * (~rollout.truncated).float().unsqueeze(-1)
    return mask


def balance_mask(adv: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Reward re-balancing: every positive-advantage sample and an equal number of negative ones. (N,) -> (N,)"""
    pos = [i for i, a in enumerate(adv.tolist()) if a > 0]
    neg = [i for i, a in enumerate(adv.tolist()) if a < 0]
    rng.shuffle(neg)
    keep = torch.zeros_like(adv)
    keep[pos + neg[: max(len(pos), 1)]] = 1.0
    return keep


def forward_logp(model, rollout: Rollout, rows: slice, temperature: float, value_head=None, share_prompt: bool | None = None,
                 value_trunk: bool = True):
    """Log-probs of the completion tokens (n, C) under the sampling temperature (PITFALLS 5), the logits that
    predict them (n, C, V), and the values before each of them (n, C) for PPO.

    A group's prompt is run once: its KV cache is repeated for the group's completions, which run on top of
    it (gradients flow into the prompt pass through the cache). Under gradient checkpointing, which drops the
    cache in training, each row runs prompt + completion in one pass instead; the numbers are the same.
    """
    dev = model.device
    comp = rollout.completion_ids[rows].to(dev)
    c_mask = rollout.completion_mask[rows].to(dev)
    needed, row_prompt = torch.unique(rollout.group[rows], return_inverse=True)  # the prompts these rows continue
    p_ids, p_mask = rollout.prompt_ids[needed].to(dev), rollout.prompt_mask[needed].to(dev)
    row_prompt = row_prompt.to(dev)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = value_head is not None
    if share_prompt is None:
        share_prompt = not (model.training and any(getattr(x, "gradient_checkpointing", False) is True for x in model.modules()))
    if share_prompt:
        from transformers import DynamicCache

        first = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, past_key_values=DynamicCache(config=model.config),
                      use_cache=True, logits_to_keep=1, output_hidden_states=hidden)
        cache = first.past_key_values
        cache.batch_select_indices(row_prompt)  # each completion row gets its prompt's keys and values
        c_pos = p_pos[row_prompt, -1:] + 1 + torch.arange(comp.shape[1], device=dev)
        out = model(input_ids=comp, attention_mask=torch.cat([p_mask[row_prompt], c_mask], -1), position_ids=c_pos,
                    past_key_values=cache, use_cache=True, output_hidden_states=hidden)
        logits = torch.cat([first.logits[row_prompt, -1:], out.logits[:, :-1]], 1)
        states = torch.cat([first.hidden_states[-1][row_prompt, -1:], out.hidden_states[-1][:, :-1]], 1) if hidden else None
    else:
        mask = torch.cat([p_mask[row_prompt], c_mask], -1)
        out = model(input_ids=torch.cat([p_ids[row_prompt], comp], -1), attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False, output_hidden_states=hidden)
        start = p_ids.shape[1] - 1  # the last prompt position predicts the first completion token
        logits = out.logits[:, start:-1]
        states = out.hidden_states[-1][:, start:-1] if hidden else None
    logp, _ = token_logprobs(logits, comp.masked_fill(c_mask == 0, IGNORE), temperature)
    if hidden and not value_trunk:
        states = states.detach()  # the value loss trains the head only
    values = value_head(states.float()).squeeze(-1) if hidden else None  # (n, C)
    return logp, logits, values


@torch.no_grad()
def no_grad_logp(model, rollout: Rollout, micro: int, temperature: float, disable_adapter: bool = False) -> torch.Tensor:
    outs = []
    was = model.training
    model.eval()
    ctx = model.disable_adapter() if disable_adapter else torch.autocast("cpu", enabled=False)
    with ctx:
        for i in range(0, len(rollout.texts), micro):
            outs.append(forward_logp(model, rollout, slice(i, i + micro), temperature)[0].float().cpu())
    model.train(was)
    return torch.cat(outs)


def main(recipe: Recipe, run_dir: str | Path, progress: bool = True, stop_after: int | None = None,
         make_generator=None) -> Path | None:
    """Run the RL stage into run_dir (resuming from its last checkpoint). `make_generator(model, tokenizer,
    batch_size)` returns the rollout backend (`rollout.types.Generator`); default: in-process HF generation."""

    cfg: RLConfig = recipe.rl
    run_dir = Path(run_dir)
    m = recipe.model
    loop.seed_everything(recipe.seed)
    model, tok, ckpt = loop.load_for_training(recipe, run_dir)
    lora = models.is_adapter(model)
    # The reference: with LoRA the adapter disabled (no second model); otherwise a frozen copy of the start.
    ref_model = None
    if cfg.beta > 0 and not lora:
        ref_model, _ = models.load(m.name_or_path, m.dtype if m.dtype != "auto" else "float32", m.device, m.trust_remote_code)
        ref_model.eval().requires_grad_(False)
    value_head = None
    if cfg.algo == "ppo":
        hidden = model.get_input_embeddings().weight.shape[1]
        value_head = torch.nn.Linear(hidden, 1).to(model.device)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
        if ckpt:
            extras = loop.load_extras(ckpt)
            value_head.load_state_dict({"weight": extras["value_head.weight"], "bias": extras["value_head.bias"]})
    model.train()

    problems = training_problems(cfg.source, cfg.n_problems, cfg.difficulties, recipe.seed, cfg.data_path, cfg.columns,
                                 stream="rl" if cfg.fresh_prompts else "")
    rewards = WeightedRewards(recipe.rewards.weights) if cfg.reward == "weighted" else None
    generator = (make_generator or HFGenerator)(model, tok, cfg.gen_batch)
    prompt_fn = prompt_renderer(m, tok)

    # Clipped together: the policy's parameters, and the value head's when its loss also trains the model.
    clipped = list(model.parameters()) + (list(value_head.parameters()) if value_head is not None and cfg.value_trunk else [])
    optimizer = loop.make_optimizer(model, cfg.lr, cfg.weight_decay)
    if value_head is not None:
        optimizer.add_param_group({"params": list(value_head.parameters()), "weight_decay": 0.0,
                                   "lr": cfg.lr * cfg.value_lr_scale, "lr_scale": cfg.value_lr_scale})
    start = loop.restore(ckpt, optimizer)["step"] if ckpt else 0
    metrics = loop.Metrics(run_dir, resume_step=start)
    if start == 0:
        metrics.log(0, {"event": "start", "algo": cfg.algo, "note": "with mu=1 and beta=0 the loss can read 0 "
                        "while gradients flow: watch pg_loss, kl, clip_fraction (PITFALLS 1)"})
    aha = AhaDetector(cfg.aha_window, cfg.aha_rise)
    for row in _past_rows(run_dir, start):  # rebuild the detector's history on resume
        aha.update(row["step"], row, [])
    warmup = int(cfg.warmup_ratio * cfg.steps)
    bar = progress_bar(cfg.steps, f"rl/{cfg.algo}", "step", progress, start)
    for step in range(start, cfg.steps):
        t0 = time.time()
        rollout, stats = collect(step, problems, generator, tok, recipe, rewards, prompt_fn)
        gen_seconds = time.time() - t0
        if rollout is None:
            metrics.log(step + 1, {"event": "empty_batch", **_flat(stats)})
            bar.update(1)
            continue
        temperature = stats["temperature"]
        mask = completion_mask(rollout, cfg)  # (N, L)
        adv_seq = group_advantages(rollout.rewards, cfg.group_size, cfg.scale_advantages)  # (N,)
        if cfg.balance:
            mask = mask * balance_mask(adv_seq, random.Random(f"{recipe.seed}-balance-{step}")).unsqueeze(-1)
        ref_logp = None
        if cfg.beta > 0:
            ref_logp = (no_grad_logp(model, rollout, cfg.micro_batch, temperature, disable_adapter=True) if lora
                        else no_grad_logp(ref_model, rollout, cfg.micro_batch, temperature))
        old_logp = no_grad_logp(model, rollout, cfg.micro_batch, temperature) if cfg.mu > 1 else None
        adv_tok = old_values = returns = None
        if cfg.algo == "ppo":
            adv_tok, returns, old_values = ppo_targets(model, value_head, rollout, mask, cfg, temperature, ref_logp)

        totals: dict[str, float] = {}
        for _ in range(cfg.mu):
            parts = accumulate_gradients(model, rollout, mask, adv_seq, cfg, temperature, old_logp, ref_logp,
                                         value_head, adv_tok, old_values, returns)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.mu
            lr = loop.lr_at(step, cfg.steps, cfg.lr, warmup, cfg.min_lr_ratio)
            if value_head is not None and not cfg.value_trunk:  # the head's own clip: its gradient does not scale the policy's
                norm = torch.nn.utils.clip_grad_norm_(value_head.parameters(), cfg.clip).item()
                totals["value_grad_norm"] = totals.get("value_grad_norm", 0.0) + norm / cfg.mu
            grad_norm = loop.apply_update(clipped, optimizer, cfg.clip, lr)
        generator.load_weights(model)  # a server backend pushes the new weights before the next rollouts

        n_kept = int((mask.sum(-1) > 0).sum())
        truncated = rollout.truncated.float().mean().item()
        group_r = rollout.rewards.view(-1, cfg.group_size)
        row = {
            "reward": rollout.rewards.mean().item(), "accuracy": rollout.correct.float().mean().item(),
            **{f"reward_{k}": v for k, v in stats["reward_parts"].items()},
            "response_tokens": stats["response_tokens"], "think_words": stats["think_words"],
            "verify_phrases": stats["verify_phrases"], "format_rate": stats["format_rate"],
            "reasoning_rate": stats["reasoning_rate"], "truncated_rate": truncated,
            "zero_variance_share": stats["zero_variance_groups"] / max(1, stats["groups_seen"]),
            "kept_groups": group_r.shape[0], "kept_samples": n_kept, "temperature": temperature,
            "lr": lr, "grad_norm": grad_norm, **totals, "gen_seconds": gen_seconds, "step_seconds": time.time() - t0,
            **{f"dropped_{k}": v for k, v in stats["dropped"].items()},
            **{k: stats[k] for k in ("generation_retries", "generation_failures") if k in stats},
        }
        metrics.log(step + 1, row)
        for event in aha.update(step + 1, row, rollout.texts):
            metrics.log(step + 1, event)
        if truncated > cfg.truncation_warn:
            bar.write(f"warning: step {step + 1}: {truncated:.0%} of responses hit max_new_tokens={cfg.max_new_tokens}; "
                      "rewards are mostly about truncation (raise rl.max_new_tokens)")
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row.get('kl', 0):.3f}", refresh=False)
        done = step + 1
        extras = {f"value_head.{k}": v for k, v in value_head.state_dict().items()} if value_head is not None else None
        if loop.end_of_step(run_dir, done, cfg.steps, cfg.save_every, cfg.keep_checkpoints, stop_after,
                            model, tok, optimizer, "rl", extras):
            return loop.finish(bar, metrics)
    return loop.finish(bar, metrics, model, tok, run_dir / "final")


def accumulate_gradients(model, rollout: Rollout, mask: torch.Tensor, adv_seq: torch.Tensor, cfg: RLConfig,
                         temperature: float, old_logp=None, ref_logp=None, value_head=None, adv_tok=None,
                         old_values=None, returns=None) -> dict[str, float]:
    """One pass of backward over the rollout in micro-batches; the gradient equals one full-batch pass.

    Normalisation is decided once: per-sample means for "sequence" (scaled by the micro-batch's share of
    kept samples), and a single constant for "token" (all masked tokens of the batch) and "constant"
    (Dr. GRPO: kept samples x max new tokens). Returns the step's loss statistics.
    """
    n = len(rollout.texts)
    device = str(model.device)
    n_kept = int((mask.sum(-1) > 0).sum().item())
    total_tokens = float(mask.sum())
    constant = {"sequence": None, "token": total_tokens, "constant": float(max(1, n_kept) * cfg.max_new_tokens)}[cfg.loss_agg]
    totals: dict[str, float] = {}
    for i in range(0, n, cfg.micro_batch):
        rows = slice(i, i + cfg.micro_batch)
        mb_mask = mask[rows].to(model.device)
        if mb_mask.sum() == 0:
            continue
        with loop.autocast(device, cfg.mixed_precision):
            logp, logits, values = forward_logp(model, rollout, rows, temperature, value_head, value_trunk=cfg.value_trunk)
        old = old_logp[rows].to(logp.device) if old_logp is not None else logp.detach()
        ref = ref_logp[rows].to(logp.device) if ref_logp is not None else None
        if cfg.algo == "ppo":  # per-token advantages; the KL is in the PPO reward, not the loss
            adv, agg, kl_beta, c = adv_tok[rows].to(logp.device), "constant", 0.0, total_tokens
            share = 1.0
        elif cfg.loss_agg == "sequence":
            adv, agg, kl_beta, c = adv_seq[rows].to(logp.device), "sequence", cfg.beta, None
            share = float((mb_mask.sum(-1) > 0).sum()) / max(1, n_kept)
        else:
            adv, agg, kl_beta, c = adv_seq[rows].to(logp.device), "constant", cfg.beta, constant
            share = 1.0
        loss, parts = policy_loss(logp, old, adv, mb_mask, cfg.clip_low, cfg.clip_high, ref, kl_beta, agg, c)
        loss = loss * share
        if cfg.algo == "ppo":
            vl = value_loss(values, old_values[rows].to(values.device), returns[rows].to(values.device), mb_mask, cfg.value_clip)
            loss = loss + cfg.vf_coef * vl * float(mb_mask.sum()) / total_tokens
            parts["value_loss"] = vl.item()
        loss.backward()
        # Scaled micro-batch losses add up to the full batch's; per-token statistics are token-weighted.
        w = float(mb_mask.sum()) / total_tokens
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        totals["pg_loss"] = totals.get("pg_loss", 0.0) + parts.pop("pg_loss") * share
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v * w
        if "entropy" not in totals:
            with torch.no_grad():
                totals["entropy"] = entropy(logits, mb_mask).item()
    return totals


@torch.no_grad()
def ppo_targets(model, value_head, rollout: Rollout, mask, cfg: RLConfig, temperature: float, ref_logp):
    """Per-token advantages (whitened over the batch), returns and old values for PPO.

    Per-token reward: the sequence reward on its last completion token, minus beta * KL_k3 per token when a
    reference is used (the classic RLHF shaping; the policy loss then carries no KL term).
    """
    was = model.training
    model.eval()
    values, logps = [], []
    for i in range(0, len(rollout.texts), cfg.micro_batch):
        lp, _, v = forward_logp(model, rollout, slice(i, i + cfg.micro_batch), temperature, value_head)
        values.append(v.float().cpu())
        logps.append(lp.float().cpu())
    model.train(was)
    values = torch.cat(values) * mask  # (N, L)
    token_rewards = torch.zeros_like(mask)
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)  # index of the last completion token
    token_rewards[torch.arange(len(last)), last] = rollout.rewards.float() * (mask.sum(-1) > 0).float()
    if ref_logp is not None and cfg.beta > 0:
        from thinkforge.losses import kl_k3

        token_rewards = token_rewards - cfg.beta * kl_k3(torch.cat(logps), ref_logp) * mask
    adv, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
    n = mask.sum().clamp(min=1)
    mean = (adv * mask).sum() / n
    std = (((adv - mean) ** 2 * mask).sum() / n).sqrt()
    return (adv - mean) / (std + 1e-8) * mask, returns, values


def _flat(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    out.update({f"dropped_{k}": v for k, v in stats.get("dropped", {}).items()})
    return out


def _past_rows(run_dir: Path, upto: int) -> list[dict]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists() or upto == 0:
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "think_words" in r and r.get("event") is None and r["step"] <= upto]



