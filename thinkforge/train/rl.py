"""Stage 4: RL with verifiable reward (SPEC 4): the GRPO family or PPO, with the Phi-4 stability recipe.

Each step of `main` reads as the algorithm:
    batch = collect(...)          sample G completions per prompt at the annealed temperature, score them
                                  (+1/-1, or the weighted Infused Phi-2 set), filter groups (zero variance,
                                  easy, all wrong, uniform length), refill (dynamic sampling): sampling.py
    batch.advantages              ADVANTAGES[rl.advantage] over each group (GRPO, Dr. GRPO, RLOO, REINFORCE++),
                                  then balance's mask; every statistic over several samples is the step's
                                  (all ranks, PITFALLS 23). A step with no loss token is skipped
    batch.ref_logp                the reference's log-probs (LoRA: the adapter disabled) when beta > 0
                                  (PPO's critic, ppo.py: then advantages by GAE over its value head)
    norm = normaliser(...)        the step's one loss normaliser (token / sequence / constant)
    backward(...)                 -norm(POLICY_LOSSES[rl.policy_loss] - beta KL) per micro-batch (+ vf_coef x
                                  the value loss where there is a critic)
    update -> sync the rollout backend -> log -> aha moments -> checkpoint

With mu = 1 the old log-probs are the detached training log-probs (no pass for them); the reference log-probs
come from one no-grad pass (with LoRA: the adapter disabled, no second model); PPO runs one more no-grad pass,
the critic's values and log-probs before the update (its targets).
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch

from thinkforge import grading, models, tasks
from thinkforge.config import Recipe, RLConfig
from thinkforge.errors import UserError
from thinkforge.formats import prompt_renderer
from thinkforge.losses import ADVANTAGES, kl_k3, masked_mean, normaliser, policy_loss
from thinkforge.monitor import AhaDetector, progress_bar
from thinkforge.rewards import WeightedRewards
from thinkforge.rollout.types import Rollout, SyncError
from thinkforge.train import dist as distributed
from thinkforge.train import loop, ppo
from thinkforge.train.attention import use_document_attention
from thinkforge.train.backend import make_backend as rollout_backend
from thinkforge.train.curriculum import Curriculum
from thinkforge.train.dist import Dist
from thinkforge.train.forward import forward_logp, logp_no_grad
from thinkforge.train.sampling import Task, collect, preflight, unlearnable

MAX_EMPTY_STEPS = 3  # consecutive steps with nothing to learn from (no group kept, no loss token) before the run stops


# ---------------------------------------------------------------- the loss mask, advantages and the update


def loss_mask(batch: Rollout, cfg: RLConfig) -> torch.Tensor:
    """(N, C) the completion tokens that carry loss: a truncated sample carries none under truncation=mask, a
    stand-in (Rollout.stand_in) none at all."""
    mask = batch.completion_mask.float() * counted(batch).unsqueeze(-1)
    if cfg.truncation == "mask":
        mask = mask * (~batch.truncated).float().unsqueeze(-1)
    return mask


def balance_mask(adv: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Reward re-balancing: every positive-advantage sample and an equal number of negative ones. (N,) -> (N,)"""
    pos = [i for i, a in enumerate(adv.tolist()) if a > 0]
    neg = [i for i, a in enumerate(adv.tolist()) if a < 0]
    rng.shuffle(neg)
    keep = torch.zeros_like(adv)
    keep[pos + neg[: max(len(pos), 1)]] = 1.0
    return keep


def counted(batch: Rollout) -> torch.Tensor:
    """(N,) 1.0 on the samples the step counts: all of them, none of a stand-in (Rollout.stand_in)."""
    return torch.full((len(batch.texts),), 0.0 if batch.stand_in else 1.0)


def advantages(batch: Rollout, name: str, dist: Dist = Dist()) -> torch.Tensor:
    """(N,) ADVANTAGES[name]: each sample against its group, and a statistic beyond the group (REINFORCE++'s
    whitening) over the whole step, every rank's samples (PITFALLS 23)."""
    return ADVANTAGES[name](batch.rewards, batch.group_size, counted(batch), dist.all_sum)


def balance(batch: Rollout, rng: random.Random, dist: Dist = Dist()) -> torch.Tensor:
    """(N,) this rank's part of the step's re-balancing mask: balance_mask over every rank's advantages in the
    step's order, drawn from the same rng on each rank, so N ranks keep the samples one process keeps."""
    mine = [] if batch.stand_in else batch.advantages.tolist()
    parts = dist.all_gather(mine)
    keep = balance_mask(torch.tensor([a for part in parts for a in part]), rng)  # (every rank's N,)
    start = sum(len(part) for part in parts[: dist.rank])
    return keep[start : start + len(mine)] if mine else counted(batch)


def backward(model, batch: Rollout, norm, cfg: RLConfig, critic: ppo.Critic | None = None,
             dist: Dist = Dist(), *, entropy: bool = True) -> dict[str, float]:
    """One backward pass over the batch, micro-batch by micro-batch (those with loss tokens). Each divides by
    the step's normaliser, so their gradients add up to the full batch's; on N ranks every rank joins as many
    rounds as the busiest (zero-weight repeats). With PPO's critic the value loss joins the policy loss, once
    weighted by vf_coef, and the KL is in the reward instead. Returns the step's loss statistics (over every
    rank), with `entropy` (of the first micro-batch) where asked. The step has loss tokens: rl.main skips one
    without."""
    totals: dict[str, float] = {}
    tokens = dist.all_sum([float(batch.loss_mask.sum())])[0]
    if tokens == 0:
        raise ValueError("a step without loss tokens has no gradient: rl.main skips it before the backward")
    beta = cfg.beta if critic is None else 0.0  # PPO: the KL penalty is in the reward (ppo.Critic.targets)
    micro = [slice(i, i + cfg.micro_batch) for i in range(0, len(batch.texts), cfg.micro_batch)
             if batch.loss_mask[i : i + cfg.micro_batch].sum() > 0]
    rounds = dist.rounds(len(micro))
    for r, (k, weight) in enumerate(rounds):
        rows, share = (micro or [slice(0, cfg.micro_batch)])[k], norm.scaled(weight)
        mask = batch.loss_mask[rows].to(model.device)
        with dist.sync(model, last=r == len(rounds) - 1):
            with loop.autocast(str(model.device), cfg.mixed_precision):
                logp, ent, values = forward_logp(model, batch, rows, critic.head if critic else None,
                                                 with_entropy=entropy and "entropy" not in totals, chunk=cfg.head_chunk)
            old = batch.old_logp[rows].to(logp.device) if batch.old_logp is not None else logp.detach()
            ref = batch.ref_logp[rows].to(logp.device) if batch.ref_logp is not None else None
            adv, mismatch = sampler_correction(old, batch, rows, mask, cfg.tis_cap)
            loss, parts = policy_loss(logp, old, adv, mask, share, kind=cfg.policy_loss, clip=(cfg.clip_low, cfg.clip_high),
                                      ref_logp=ref, beta=beta)
            parts.update(mismatch)
            if critic is not None:  # PPO: this micro-batch's share of the value loss, weighted once
                value = critic.loss(values, batch, rows, share)
                loss = loss + cfg.vf_coef * value
                parts["value_loss"] = value.item()
            loss.backward()
        # loss, pg_loss and value_loss are shares of the step's and add up; the rest are token means, weighted.
        w = weight * float(mask.sum()) / tokens
        totals["loss"] = totals.get("loss", 0.0) + loss.item() / dist.world
        for key, v in parts.items():
            totals[key] = totals.get(key, 0.0) + (v / dist.world if key in ("pg_loss", "value_loss") else v * w)
        if entropy and "entropy" not in totals:  # of the first micro-batch: another pass of the output layer
            totals["entropy"] = masked_mean(ent, mask).item()
    if not entropy:
        return dict(zip(totals, dist.all_sum(list(totals.values())), strict=True))
    # the step's first micro-batch is on the first rank that has one (the others ran zero-weight passes)
    first = next(e for e, real in dist.all_gather([totals.pop("entropy"), float(bool(micro))]) if real)
    return dict(zip(totals, dist.all_sum(list(totals.values())), strict=True)) | {"entropy": first}


def sampler_correction(old: torch.Tensor, batch: Rollout, rows: slice, mask: torch.Tensor, cap: float | None):
    """(advantages of these rows, mismatch statistics). old: the trainer's log-probs of these rows at sampling
    time (theta_old: the detached training log-probs when mu = 1). With a server's log-probs
    (batch.sampler_logp): the per-token mismatch between trainer and sampler (mean |diff|, KL k3), and with
    `cap` truncated importance sampling, each token's advantage times min(exp(old - sampler log-prob), cap)
    (the weight is >= 0, so it scales every policy loss's per-token term). The weight corrects only for the
    sampler being another implementation of theta_old; pi_theta / pi_old is the policy loss's own ratio, inside
    its clip, and must not be counted again here from the second epoch (mu > 1) on."""
    adv = batch.advantages[rows].to(old.device)
    if batch.sampler_logp is None:
        return adv, {}
    served = batch.sampler_logp[rows].to(old.device)
    with torch.no_grad():
        delta = old - served  # (n, C)
        stats = {"sampler_logp_diff": masked_mean(delta.abs(), mask).item(),
                 "sampler_kl": masked_mean(kl_k3(old, served), mask).item()}
        if cap is None:
            return adv, stats
        weight = delta.exp().clamp(max=cap)
        stats["tis_weight"] = masked_mean(weight, mask).item()
    return (adv.unsqueeze(-1) if adv.dim() == 1 else adv) * weight, stats


def reference_logp(model, reference, batch: Rollout, micro: int, chunk: int | None = None, dist: Dist = Dist()) -> torch.Tensor:
    """(N, C) the reference's log-probs: the LoRA base with the adapter disabled (reference None), else the
    frozen starting model."""
    if reference is None:
        return logp_no_grad(model, batch, micro, disable_adapter=True, chunk=chunk, dist=dist)
    return logp_no_grad(reference, batch, micro, chunk=chunk, dist=dist)


def main(recipe: Recipe, stage: str, run_dir: str | Path, data: str | None = None, progress: bool = True,
         stop_after: int | None = None, make_backend=None) -> Path | None:
    """Run the RL stage `stage` (its recipe section, "rl") into run_dir, resuming from its last checkpoint; `data`
    is a prompts file (default: the section's data_path). The signature every stage shares (thinkforge/stages.py),
    plus `make_backend(model, tokenizer, batch_size)`, the rollout backend (`train.backend.Backend`; default:
    `backend.make_backend` for the recipe's rollout settings)."""
    cfg: RLConfig = getattr(recipe, stage)
    run_dir = Path(run_dir)
    m = recipe.model
    loop.seed_everything(recipe.seed)
    dist = distributed.init(recipe.collective_timeout)
    source = cfg.source  # a prompts file given for a generated task: the prompts are the file's (a hub set's schema else)
    if data and tasks.load(source, recipe.tasks.options, recipe.tasks.mixes).procedural:
        source = "local"

    def pool(levels: list[int]) -> list:
        return tasks.for_training(recipe, stage, cfg.n_problems, levels, source=source, data_path=data or cfg.data_path,
                                  columns=cfg.columns, stream="rl" if cfg.fresh_prompts else "")

    curriculum = None  # before the model loads: a task that cannot be made fails in a second
    if cfg.curriculum:  # one pool per level; prompts from the current level's only
        levelled = tasks.load(source, recipe.tasks.options, recipe.tasks.mixes)
        levels = levelled.train_levels(cfg.difficulties, f"{stage}.difficulties") if levelled.levels else None
        if levels is None or len(set(levels)) < 2:
            raise UserError(f"{stage}.curriculum needs a task with difficulty levels and at least two of them in "
                            f"{stage}.difficulties (task {source}, difficulties {cfg.difficulties or 'unset'})")
        pools = {level: pool([level]) for level in sorted(set(levels))}
        curriculum = Curriculum(levels, cfg.curriculum_window, cfg.curriculum_up, cfg.curriculum_down)
    else:
        problems = pool(cfg.difficulties)
    model, tok, ckpt = loop.load_for_training(recipe, run_dir)
    models.disable_dropout(model)  # the sampler, reference and old log-probs are compared with the loss's pass
    model.train()
    ddp = dist.wrap(model)  # the model the loss runs through (DDP over the ranks; FSDP2 shards it in place, before
    # the reference is loaded: no rank holds two whole models)
    reference = None  # LoRA: the adapter disabled (no second model; the start is never an adapter); else a frozen copy
    if cfg.beta > 0 and not models.is_adapter(model):
        reference, _ = models.load(loop.start_model(recipe, run_dir), loop.weights_dtype(recipe, str(model.device)), m.device,
                                   m.trust_remote_code, False, gradient_checkpointing=m.gradient_checkpointing,
                                   attn_implementation=m.attn_implementation)  # the policy's layout: KL 0 at the start
        reference.eval().requires_grad_(False)
        use_document_attention(reference)
        reference = dist.shard_frozen(reference)  # FSDP2: sharded as the policy is, no rank holds it whole
    extras = loop.load_extras(ckpt) if ckpt else None
    critic = ppo.Critic.create(model, cfg, extras) if cfg.algo == "ppo" else None  # GRPO: the group is the baseline
    optimizer = loop.make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay)
    clipped = list(model.parameters())  # clipped together: the policy's (and a value head that trains the trunk)
    if critic is not None:
        critic.attach(optimizer, cfg.optim.lr, cfg.value_lr_scale)
        clipped += list(critic.head.parameters()) if critic.head.trunk else []
    start = loop.restore(ckpt, optimizer, model, dist)["step"] if ckpt else 0

    if curriculum is not None:
        curriculum.replay(_past_rows(run_dir, start, events=("empty_batch",)))
        problems = pools[curriculum.level]
    task = Task(problems, prompt_renderer(m, tok), tok,
                WeightedRewards(recipe.rewards.weights) if cfg.reward == "weighted" else None)
    metrics = loop.Metrics(run_dir, resume_step=start, write=dist.main)
    # at most: every completion at max_new_tokens (the prompts, run once a group, left out)
    compiled = loop.start_entries(recipe, model, "rl", cfg.steps * cfg.prompts_per_step * cfg.group_size * cfg.max_new_tokens,
                                   cfg.mixed_precision, run_dir, resumed=start > 0)
    if start == 0:
        metrics.log(0, {"event": "start", "algo": cfg.algo, **compiled, "note": "with mu=1 and beta=0 the loss can read 0 "
                        "while gradients flow: watch pg_loss, kl, clip_fraction (PITFALLS 1)"
                        + (f"; entropy logged every {cfg.entropy_every} steps (rl.entropy_every)" if cfg.entropy_every > 1 else "")})
    aha = AhaDetector(cfg.aha_window, cfg.aha_rise)
    for row in _past_rows(run_dir, start):  # rebuild the detector's history on resume
        aha.update(row["step"], row, [])
    warmup = int(cfg.optim.warmup_ratio * cfg.steps)
    checkpoints = loop.Checkpoints(run_dir, stage, cfg.steps, cfg.checkpoints.every, cfg.checkpoints.keep, stop_after, dist)
    empty = 0
    # Built last: from here on a server started for this run stops with it, whatever happens.
    if make_backend is not None:
        backend = make_backend(model, tok, cfg.gen_batch)
    else:
        backend = rollout_backend(model, tok, cfg.gen_batch, recipe.rollout, run_dir, dist, max_new_tokens=cfg.max_new_tokens,
                                  dtype=loop.compute_dtype(str(model.device), cfg.mixed_precision, model))
    sync = backend.sync  # None: the sampler runs the training model itself (its weights always the current ones)
    with contextlib.closing(backend):
        if start == 0 and cfg.preflight:  # can this policy learn at all? (before the budget is spent)
            with loop.autocast(str(model.device), cfg.mixed_precision):
                report = preflight(task, backend, cfg, recipe.seed, dist)
            metrics.log(0, {"event": "preflight", **report})
            if why := unlearnable(report, cfg, task.rewards):
                metrics.close()  # its writer's thread would outlive a folder removed for a failed start
                raise UserError(f"{stage} preflight: {why} (or set {stage}.preflight=false to train anyway)")
        bar = progress_bar(cfg.steps, f"{stage}/{cfg.algo}", "step", progress and dist.main, start)
        pushed = sync.version if sync is not None else None  # the version every sample must carry (one more per push)
        # Seconds of steps so far: a resumed run's from the row of the step it resumes at (every row carries them,
        # empty steps' too), plus this process's since its first step.
        past = [r["elapsed_seconds"] for r in _past_rows(run_dir, start, events=("empty_batch",))
                if r["step"] == start and "elapsed_seconds" in r]
        clock = time.time() - (past[-1] if past else 0.0)  # elapsed = time.time() - clock
        for step in range(start, cfg.steps):
            if cfg.time_budget is not None and dist.all_sum([float(time.time() - clock >= 60 * cfg.time_budget)])[0]:
                metrics.log(step, {"event": "time_budget", "seconds": round(time.time() - clock, 3),
                                   "note": f"rl.time_budget={cfg.time_budget} min spent: no step starts past it"})
                if step > start:  # a rerun resumes here and stops at once: the same final model, nothing retrained
                    checkpoints.save(step, (model, tok), optimizer, critic.state() if critic else None)
                break  # (every rank alike: the one reduce above)
            t0 = time.time()
            with loop.autocast(str(model.device), cfg.mixed_precision):  # samples drawn in the loss pass's precision
                proof = {}
                if sync is not None:  # the server holds this policy: its weights, proven
                    proof = sync.prove()
                    dist.barrier()  # no rank samples while rank 0 proves: vLLM's CPU engine fails a batch mixing the
                    # proof's prompt log-probs with LoRA generation (an einsum error)
                if curriculum is not None:
                    task.problems = pools[curriculum.level]
                batch, stats = collect(step, task, backend, cfg, recipe.seed, dist)  # sample -> score -> filter
            level = {}  # the curriculum's level of this step's prompts, and its move on their pass rate
            if curriculum is not None:
                level = {"curriculum_level": curriculum.level}
                if move := curriculum.update(stats["correct_seen"], stats["graded"], stats["groups_seen"]):
                    metrics.log(step + 1, {"event": "curriculum", **move})
                    bar.write(f"step {step + 1}: curriculum level {move['from']} -> {move['level']} (pass rate "
                              f"{move['pass_rate']:.2f})")
            if batch is not None and stats["versions"] not in ([], [pushed]):  # on-policy: no other version's samples
                raise SyncError(f"step {step + 1}'s samples came from policy version(s) {stats['versions']}, the trainer "
                                f"is at version {pushed}: the rollout backend did not sample the current policy")
            gen_seconds = time.time() - t0
            if batch is not None:  # (None on every rank alike: the kept groups are the step's, see collect)
                batch.loss_mask = loss_mask(batch, cfg)  # (N, C)
                if critic is None:  # the GRPO family: each sample against its group
                    batch.advantages = advantages(batch, cfg.advantage, dist)  # (N,)
                    if cfg.balance:
                        keep = balance(batch, random.Random(f"{recipe.seed}-balance-{step}"), dist)  # (N,)
                        batch.loss_mask = batch.loss_mask * keep.unsqueeze(-1)
            if empty_why := _empty(batch, dist):  # decided from counts over the ranks: every rank skips alike
                empty += 1
                metrics.log(step + 1, {"event": "empty_batch", "why": empty_why, **_flat(stats), **level,
                                       "elapsed_seconds": time.time() - clock})
                if empty >= MAX_EMPTY_STEPS:
                    raise UserError(_stop_line(empty, empty_why, stats, cfg))
                bar.update(1)
                continue
            empty = 0
            with loop.autocast(str(model.device), cfg.mixed_precision):  # the precision of the loss's own pass:
                if cfg.beta > 0:  # at the start policy and reference then agree exactly (KL 0, ratio 1; with
                    # model.compile the training pass is compiled and the reference's eager: bf16 rounding apart)
                    batch.ref_logp = reference_logp(model, reference, batch, cfg.micro_batch, cfg.head_chunk, dist)
                    if dist.sharded and reference is not None:  # FSDP2 keeps a root gathered after a no-grad
                        reference.reshard()  # forward (only a backward reshards it): the reference has none
                if cfg.mu > 1:
                    batch.old_logp = logp_no_grad(model, batch, cfg.micro_batch, chunk=cfg.head_chunk, dist=dist)
                if critic is not None:  # PPO: GAE over the value head, the KL in the reward
                    critic.targets(model, batch, cfg.micro_batch, cfg.head_chunk, dist)  # (N, C)
            norm = dist.normaliser(normaliser(batch.loss_mask, cfg.loss_agg, cfg.max_new_tokens))  # one all-reduce

            totals: dict[str, float] = {}
            for epoch in range(cfg.mu):  # the entropy of the first epoch's pass, at every entropy_every-th step
                parts = backward(ddp, batch, norm, cfg, critic, dist, entropy=epoch == 0 and step % cfg.entropy_every == 0)
                if critic is not None:  # its head is outside the wrapped model: averaged over the ranks here
                    dist.average(critic.head.parameters())
                if critic is not None and not critic.head.trunk:  # a detached head is clipped alone
                    parts["value_grad_norm"] = torch.nn.utils.clip_grad_norm_(critic.head.parameters(), cfg.optim.clip).item()
                for k, v in parts.items():  # epoch means; the entropy is the first epoch's alone
                    totals[k] = totals.get(k, 0.0) + (v if k == "entropy" else v / cfg.mu)
                lr = loop.lr_at(step, cfg.steps, cfg.optim.lr, warmup, cfg.optim.min_lr_ratio)
                grad_norm = loop.apply_update(clipped, optimizer, cfg.optim.clip, lr)
            push_log = {}
            if sync is not None:  # a server backend gets the new weights (proven before sampling)
                push_log = sync.push()
                pushed += 1
                dist.barrier()  # no rank samples before the push is done

            row = _row(batch, stats, dist) | totals | proof | push_log | level | {"lr": lr, "grad_norm": grad_norm,
                                                              "gen_seconds": gen_seconds, "step_seconds": time.time() - t0,
                                                              "elapsed_seconds": time.time() - clock}
            metrics.log(step + 1, row)
            for event in aha.update(step + 1, row, batch.texts):
                metrics.log(step + 1, event)
            if line := grading.timeout_warning(row["grading_timeouts"], row["graded"], f"warning: step {step + 1}"):
                bar.write(line)
            if row["truncated_rate"] > cfg.truncation_warn:
                bar.write(f"warning: step {step + 1}: {row['truncated_rate']:.0%} of responses hit max_new_tokens="
                          f"{cfg.max_new_tokens}; rewards are mostly about truncation (raise rl.max_new_tokens)")
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row.get('kl', 0):.3f}",
                            refresh=False)
            if checkpoints.end_of_step(step + 1, model, tok, optimizer, critic.state() if critic else None):
                return loop.finish(bar, metrics)
    return loop.finish(bar, metrics, model, tok, run_dir / "final", dist)


def _row(batch: Rollout, stats: dict, dist: Dist) -> dict:
    """The step's sampling metrics (rewards per function, accuracy, lengths, format, truncation, filters),
    over every rank (collect's counts already are)."""
    row = {
        "reward": batch.rewards.mean().item(), "accuracy": batch.correct.float().mean().item(),
        **{f"reward_{k}": v for k, v in stats["reward_parts"].items()},
        "response_tokens": stats["response_tokens"], "think_words": stats["think_words"],
        "verify_phrases": stats["verify_phrases"], "format_rate": stats["format_rate"],
        "reasoning_rate": stats["reasoning_rate"], "truncated_rate": batch.truncated.float().mean().item(),
        "zero_variance_share": stats["zero_variance_groups"] / max(1, stats["groups_seen"]),
        "kept_groups": stats["kept_groups"], "kept_samples": int((batch.loss_mask.sum(-1) > 0).sum()),
        "temperature": batch.temperature,
        **{f"dropped_{k}": v for k, v in stats["dropped"].items()},
        "graded": stats["graded"], "grading_timeouts": stats["grading_timeouts"], "check_errors": stats["check_errors"],
        "correct_seen": stats["correct_seen"], "groups_seen": stats["groups_seen"],
        **{k: stats[k] for k in ("generation_failures",) if k in stats},
    }
    if dist.world == 1:
        return row
    # per-sample means weighted by each rank's samples (the shares may differ; a stand-in counts none), samples
    # with loss tokens summed: what one process logs
    means = [k for k in row if k.startswith(("reward", "accuracy", "response", "think", "verify", "format", "reasoning",
                                              "truncated"))]
    n = float(counted(batch).sum())
    got = dist.all_sum([row[k] * n for k in means] + [row["kept_samples"], n])
    out = {k: v / got[-1] for k, v in zip(means, got, strict=False)}
    return row | out | {"kept_samples": round(got[-2])}


def _flat(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    out.update({f"dropped_{k}": v for k, v in stats.get("dropped", {}).items()})
    return out


def _empty(batch: Rollout | None, dist: Dist) -> str | None:
    """Why the step has nothing to learn from, or None: no group kept, or no loss token in the kept ones
    (every sample cut under truncation=mask, or every group flat under balance), counted over every rank."""
    if batch is None:
        return "no group kept"
    if dist.all_sum([float(batch.loss_mask.sum())])[0] == 0:
        return "no loss token"
    return None


def _stop_line(steps: int, why: str, stats: dict, cfg: RLConfig) -> str:
    """The run's last line after MAX_EMPTY_STEPS empty steps in a row: what happened, and what to change."""
    if why == "no loss token":  # only these two switches take a kept sample's loss away
        causes = []
        if cfg.truncation == "mask":
            causes.append(f"every sample cut at rl.max_new_tokens={cfg.max_new_tokens} under rl.truncation=mask "
                          "(raise rl.max_new_tokens)")
        if cfg.balance:
            causes.append("every group's rewards equal under rl.balance (set rl.dynamic_sampling=true to refill flat "
                          "groups, or turn rl.balance off)")
        return f"rl: {steps} steps in a row had no token to learn from ({stats['kept_groups']} groups kept): {', or '.join(causes)}"
    counts = [f"{stats['groups_seen']} groups sampled"] + [f"{n} dropped as {k}" for k, n in stats["dropped"].items()]
    if stats.get("generation_failures"):
        counts.append(f"{stats['generation_failures']} prompts out of memory ({stats['last_generation_error']})")
    return (f"rl: {steps} steps in a row kept no group ({', '.join(counts)}); loosen rl.drop_easy, rl.drop_all_wrong, "
            "rl.dynamic_sampling or rl.uniform_length, or lower rl.gen_batch")


def _past_rows(run_dir: Path, upto: int, events: tuple[str, ...] = ()) -> list[dict]:
    """The logged steps up to `upto` (a resumed run's history): the training rows, and the `events` rows named."""
    if upto == 0:
        return []
    rows = loop.metrics_rows(run_dir / "metrics.jsonl")  # a cut run's half line, another rank's rewrite: skipped
    return [r for r in rows if r.get("step", upto + 1) <= upto and (("think_words" in r and r.get("event") is None)
                                                     or r.get("event") in events)]
