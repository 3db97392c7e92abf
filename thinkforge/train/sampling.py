"""RL's data: sample G completions per prompt at the annealed temperature, score them, filter the groups
(zero variance, easy, all wrong, uniform length) and refill (dynamic sampling), into a Rollout.

`collect(step, task, backend, cfg, seed)` is the first line of each RL step (rl.main). Prompt draws and
random streams are pure functions of (seed, step, round, position, problem): a resumed run samples what the
uninterrupted one did, whatever batch size its generator runs at.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any

import torch

from thinkforge import grading
from thinkforge.config import RLConfig
from thinkforge.formats import parse, response
from thinkforge.losses import overlong_penalty
from thinkforge.monitor import sample_stats
from thinkforge.rewards import WeightedRewards
from thinkforge.rollout.types import (
    Completion,
    Rollout,
    Sampler,
    SamplingParams,
    is_out_of_memory,
    pad_id,
    stream_key,
)
from thinkforge.tasks import Problem, check_errors, is_correct
from thinkforge.train.backend import Backend
from thinkforge.train.dist import Dist


def temperature_at(step: int, cfg: RLConfig) -> float:
    """Linear annealing temperature_start -> temperature over anneal_steps, then fixed (Phi-4 recipe)."""
    if cfg.temperature_start is None or cfg.anneal_steps == 0 or step >= cfg.anneal_steps:
        return cfg.temperature
    return cfg.temperature_start + (cfg.temperature - cfg.temperature_start) * step / cfg.anneal_steps


@dataclasses.dataclass
class Task:
    """What the policy is asked and how it is scored. rewards None: the verifiable +1/-1."""

    problems: list[Problem]
    prompt_fn: Callable[[str], str]
    tokenizer: Any
    rewards: WeightedRewards | None = None


def generate_groups(generator: Sampler, prompts: list[str], n: int, params: SamplingParams,
                    stats: dict, *, sharded: bool = False) -> list[list[Completion] | None]:
    """n completions per prompt (None for a prompt whose chunk ran out of memory even after the backend
    halved its batch: skipped and counted). Any other error is a bug and propagates; so does out of memory on
    sharded ranks, where the other ranks wait in the forward this rank left (the run stops with one line).

    params.streams names each prompt's random stream, so the chunks the prompts are asked for in (the
    backend's batch size, halved after an out-of-memory) change nothing that is sampled.
    """
    out: list = [None] * len(prompts)
    i = 0
    while i < len(prompts):
        size = max(1, generator.batch_size // n)
        chunk = prompts[i : i + size]
        try:
            comps = generator.generate(chunk, n, dataclasses.replace(params, streams=params.streams[i : i + size]))
        except RuntimeError as e:
            if not is_out_of_memory(e) or sharded:
                raise
            stats["generation_failures"] = stats.get("generation_failures", 0) + len(chunk)
            stats["last_generation_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            for j in range(len(chunk)):
                out[i + j] = [c for c in comps if c.prompt_index == j]
        i += len(chunk)
    return out


def score(text: str, finish: str, problem: Problem, cfg: RLConfig, rewards: WeightedRewards | None) -> tuple[float, dict, bool]:
    """(reward, reward per function, correct) of one completion: scored once by its problem's own checker (on the
    extracted answer only), the score shared by the accuracy and every reward that grades."""
    answer = parse(text).answer
    task_score = problem.score(answer)
    correct = is_correct(task_score)
    if not correct and problem.task is not None:  # a near miss earns what its task says a reward should pay
        task_score = problem.task.reward_credit(problem, answer, task_score)
    total, parts = _reward(text, problem, task_score, rewards)
    if finish == "length" and cfg.truncation == "penalize":  # one rule: a cut-off response earns at most what saying
        total = min(total, _reward("", problem, 0.0, rewards)[0])  # nothing does (-1 verifiable, 0 weighted)
    return total, parts, correct


def _reward(text: str, problem: Problem, task_score: float, rewards: WeightedRewards | None) -> tuple[float, dict]:
    if rewards is None:
        value = 1.0 if is_correct(task_score) else -1.0
        return value, {"verifiable": value}
    return rewards.score(text, problem.reference, problem.kind, task_score)


DROP_REASONS = ("easy", "all_wrong", "zero_variance", "length_spread")  # what keep_group may answer


def keep_group(rewards: list[float], correct: list[bool], lengths: list[int], cfg: RLConfig) -> str | None:
    """None to keep the group, else the reason it is dropped (one of DROP_REASONS)."""
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


def collect(step: int, task: Task, backend: Backend, cfg: RLConfig, seed: int, dist: Dist = Dist()) -> tuple[Rollout | None, dict]:
    """Sample, score and filter until prompts_per_step groups are kept (or refills run out). None: no group
    was kept; the stats say why (counts over every rank).

    On N ranks the step keeps the groups one process keeps (PITFALLS 23): each round every rank draws the same
    prompts and samples its contiguous share of them (a sample's seed follows its global position in the
    draw), and the first groups of the draw that pass the filters, on whichever rank, are kept. Each rank then
    trains on its contiguous share of the kept groups, moved between ranks where the filters kept them
    unevenly; a rank left with none (fewer kept groups than ranks) trains on a stand-in copy of the last
    (Rollout.stand_in).
    """
    g, tok = cfg.group_size, task.tokenizer
    temperature = temperature_at(step, cfg)
    params = SamplingParams(cfg.max_new_tokens, temperature, cfg.top_p, 0, seed)
    rng = random.Random(f"{seed}-{step}")  # prompt draws are a pure function of the step: exact resume
    stats: dict = {"dropped": {}, "groups_seen": 0, "zero_variance_groups": 0, "graded": 0, "correct_seen": 0}
    timeouts = grading.timeouts()  # answers graded wrong for running over the grading budget, before this step
    errors = check_errors()  # answers scored 0 because their task's checker raised
    held: dict[int, tuple] = {}  # the kept groups this rank sampled, by their place among the step's kept groups
    holders: list[int] = []  # the rank that sampled each kept group
    for round_ in range(cfg.max_refills + 1):
        need = cfg.prompts_per_step - len(holders)
        if need <= 0:
            break
        draw = [task.problems[rng.randrange(len(task.problems))] for _ in range(math.ceil(need * cfg.oversample))]
        start, end = dist.bounds(len(draw))
        # Each prompt's stream: its full identity (seed, step, refill round, position in the draw, problem), so no
        # two samples of a run share uniforms, whatever the counts, the chunking or the number of ranks.
        streams = tuple(stream_key("rl", seed, step, round_, start + k, p.id) for k, p in enumerate(draw[start:end]))
        prompts = [task.prompt_fn(p.question) for p in draw[start:end]]
        groups = generate_groups(backend.sampler, prompts, g, dataclasses.replace(params, streams=streams), stats,
                                 sharded=dist.sharded)
        if backend.finish is not None:  # a sharded model's forwards are collectives: every rank ends the round together
            backend.finish()
        passed = {}  # position in the draw -> the group, for this rank's groups that pass the filters
        for k, (p, prompt, comps) in enumerate(zip(draw[start:end], prompts, groups, strict=True)):
            if comps is None:
                continue
            stats["groups_seen"] += 1
            comps = [dataclasses.replace(c, text=response(prompt, c.text)) for c in comps]  # a pre-filled <think>
            scored = [score(c.text, c.finish_reason, p, cfg, task.rewards) for c in comps]
            stats["graded"] += len(scored)
            stats["correct_seen"] += sum(s[2] for s in scored)  # every group, before the filters (the curriculum's)
            r, corr = [s[0] for s in scored], [s[2] for s in scored]
            if max(r) - min(r) < 1e-9:
                stats["zero_variance_groups"] += 1
            reason = keep_group(r, corr, [len(c.token_ids) for c in comps], cfg)
            if reason:
                stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
            else:
                passed[start + k] = (p, comps, r, [s[1] for s in scored], corr)
        flags = dist.all_sum([float(i in passed) for i in range(len(draw))])  # which passed, on any rank
        for i in [i for i, f in enumerate(flags) if f][:need]:  # in draw order, up to the step's need
            if i in passed:
                held[len(holders)] = passed[i]
            holders.append(dist.holder(i, len(draw)))
        if not (cfg.dynamic_sampling or cfg.drop_easy or cfg.drop_all_wrong or cfg.uniform_length):
            break
    stats["grading_timeouts"] = grading.timeouts() - timeouts
    stats["check_errors"] = check_errors() - errors
    stats = _summed(stats, dist)
    if not holders:
        return None, stats
    kept = _shared(held, holders, dist)

    prompts, completions, rewards, correct, group, texts, truncated, parts = [], [], [], [], [], [], [], []
    for gi, (p, comps, r, pr, corr) in enumerate(kept):
        prompts.append(tok(task.prompt_fn(p.question), add_special_tokens=False).input_ids)
        for c, ri, pi, ci in zip(comps, r, pr, corr, strict=True):
            if not c.token_ids and c.text:
                raise RuntimeError("the rollout backend returned text without token ids: the RL loss needs the "
                                   "sampled ids (re-tokenised text can differ from what was sampled)")
            completions.append(list(c.token_ids) or [tok.eos_token_id])
            rewards.append(ri)
            parts.append(pi)
            correct.append(ci)
            group.append(gi)
            texts.append(c.text)
            truncated.append(c.finish_reason == "length")
    lengths = torch.tensor([len(c) for c in completions])
    r = torch.tensor(rewards)
    if cfg.overlong_cache:
        r = r + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_cache)
    batch = Rollout.build(prompts, completions, group, pad_id(tok), rewards=r, correct=correct, truncated=truncated,
                          texts=texts, temperature=temperature)
    start, end = dist.bounds(len(holders))
    batch.stand_in = start == end
    served = [c.logprobs for _, comps, *_ in kept for c in comps]
    if all(s is not None and len(s) == len(c) for s, c in zip(served, completions, strict=True)):  # a server's
        batch.sampler_logp = torch.zeros(batch.completion_ids.shape)  # (N, C)
        for i, s in enumerate(served):
            batch.sampler_logp[i, : len(s)] = torch.tensor(s)
    stats.update(sample_stats(texts))
    stats["versions"] = sorted({c.version for _, comps, *_ in kept for c in comps if c.version is not None})
    stats["reward_parts"] = {k: sum(d[k] for d in parts) / len(parts) for k in parts[0]}
    stats["response_tokens"] = lengths.float().mean().item()
    stats["kept_groups"] = len(holders)
    return batch, stats


def _trained(kept: int, rank: int, dist: Dist) -> list[int]:
    """The kept groups (by place) `rank` trains on: its contiguous share, or a stand-in copy of the last."""
    start, end = dist.bounds(kept, rank)
    return list(range(start, end)) or [kept - 1]


def _shared(held: dict[int, tuple], holders: list[int], dist: Dist) -> list[tuple]:
    """This rank's share of the step's kept groups, from the groups each rank sampled (held here, holders:
    who sampled each): those sampled elsewhere travel (one all-gather, only when any must)."""
    wanted = {r: _trained(len(holders), r, dist) for r in range(dist.world)}
    away = {i for r, places in wanted.items() for i in places if holders[i] != r}  # the same set on every rank
    if away:
        held = held | dist.exchange({i: held[i] for i in away if i in held})
    return [held[i] for i in wanted[dist.rank]]


def _summed(stats: dict, dist: Dist) -> dict:
    """The sampling counts over every rank (one all-reduce): what one process counts."""
    counts = ["groups_seen", "zero_variance_groups", "graded", "correct_seen", "grading_timeouts", "check_errors",
              "generation_failures"]
    got = [int(x) for x in dist.all_sum([stats.get(k, 0) for k in counts] + [stats["dropped"].get(k, 0) for k in DROP_REASONS])]
    out = stats | dict(zip(counts, got[: len(counts)], strict=True))
    out["dropped"] = {k: n for k, n in zip(DROP_REASONS, got[len(counts) :], strict=True) if n}
    if not out["generation_failures"]:  # logged only where a prompt failed
        del out["generation_failures"]
    return out


def preflight(task: Task, backend: Backend, cfg: RLConfig, seed: int, dist: Dist = Dist()) -> dict:
    """Can RL learn from this policy? A few groups (rl.preflight_groups) sampled at the first step's temperature
    on their own random streams (training samples what it would have without it) and scored as training
    scores them: format rate, reward mean and spread, the share of groups without reward variance (they give
    no gradient), the truncation rate. Summed over ranks."""
    rng = random.Random(f"{seed}-preflight")
    draw = [task.problems[rng.randrange(len(task.problems))] for _ in range(cfg.preflight_groups)]
    start, end = dist.bounds(len(draw))
    draw = draw[start:end]
    streams = tuple(stream_key("rl-preflight", seed, start + k, p.id) for k, p in enumerate(draw))
    params = SamplingParams(cfg.max_new_tokens, temperature_at(0, cfg), cfg.top_p, 0, seed, streams=streams)
    prompts = [task.prompt_fn(p.question) for p in draw]
    stats: dict = {}
    n = groups = flat = formatted = truncated = correct = 0
    total = squares = format_reward = 0.0
    sampled = generate_groups(backend.sampler, prompts, cfg.group_size, params, stats, sharded=dist.sharded)
    if backend.finish is not None:
        backend.finish()
    for p, prompt, comps in zip(draw, prompts, sampled, strict=True):
        if comps is None:
            continue
        texts = [response(prompt, c.text) for c in comps]
        scored = [score(t, c.finish_reason, p, cfg, task.rewards) for t, c in zip(texts, comps, strict=True)]
        r = [s[0] for s in scored]
        groups, n = groups + 1, n + len(r)
        flat += max(r) - min(r) < 1e-9
        formatted += round(sample_stats(texts)["format_rate"] * len(texts))
        truncated += sum(c.finish_reason == "length" for c in comps)
        correct += sum(s[2] for s in scored)
        total, squares = total + sum(r), squares + sum(x * x for x in r)
        format_reward += sum(abs(s[1].get("format", 0.0)) + abs(s[1].get("reasoning", 0.0)) for s in scored)
    n, groups, flat, formatted, truncated, correct, total, squares, format_reward = dist.all_sum(
        [n, groups, flat, formatted, truncated, correct, total, squares, format_reward])
    mean = total / max(n, 1)
    return {"groups": int(groups), "samples": int(n), "format_rate": formatted / max(n, 1), "accuracy": correct / max(n, 1),
            "reward_mean": mean, "reward_std": max(squares / max(n, 1) - mean * mean, 0.0) ** 0.5,
            "flat_group_share": flat / max(groups, 1), "truncated_rate": truncated / max(n, 1),
            "format_reward_mean": format_reward / max(n, 1)}


def unlearnable(report: dict, cfg: RLConfig, rewards: WeightedRewards | None) -> str | None:
    """Why RL from this policy would learn nothing (and what to do), or None. In order: samples cut before they
    finish (they cannot be graded), a format that is rewarded but earns nothing, no reward variance at all."""
    n, groups = report["samples"], report["groups"]
    if groups == 0:
        return "no preflight group could be sampled (out of memory): lower rl.gen_batch"
    if report["truncated_rate"] > 0.5:
        return (f"{report['truncated_rate']:.0%} of {n} samples hit rl.max_new_tokens={cfg.max_new_tokens} unfinished (a cut "
                f"response earns no answer): raise rl.max_new_tokens, or cold-start SFT on shorter reasoning")
    shaped = rewards is not None and any(rewards.weights.get(k, 0) > 0 for k in ("format", "reasoning"))
    if shaped and report["format_reward_mean"] == 0:
        return (f"the format and reasoning rewards are 0 for all {n} samples (format rate {report['format_rate']:.0%}: the "
                f"<think>/<answer> tags are not used): cold-start SFT on formatted rollouts first (thinkforge sft), or "
                f"check model.prompt_format")
    if report["flat_group_share"] == 1.0:
        which = ("every sample right: harder prompts" if report["accuracy"] == 1.0 else
                 "easier prompts (rl.difficulties, rl.source), a cold-start SFT, a larger rl.group_size, or more "
                 "rl.preflight_groups if the set is merely hard")
        signal = "every advantage is 0" if cfg.algo == "grpo" else "the rewards carry no signal"
        return (f"none of {groups} groups has reward variance (accuracy {report['accuracy']:.0%}, format "
                f"{report['format_rate']:.0%}), so {signal}: {which}")
    return None
