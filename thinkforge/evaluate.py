"""Benchmark evaluation: pass@1 over k samples, and the Infused Phi-2 card's metrics.

For each problem, k completions are sampled and graded with the same grader as training (PITFALLS 9).
  accuracy        = mean over problems of (share of its k samples that are correct)   (pass@1, SPEC 5)
  format_rate     = share of samples with exactly <think>..</think><answer>..</answer>
  reasoning_rate  = share of samples whose thinking has at least REASONING_MIN_WORDS words
  avg_think_words = mean words inside <think>
  truncated_rate  = share of samples that hit max_new_tokens (PITFALLS 2)
  grading_timeouts = samples graded wrong for running over math-verify's budget (warned above 1%)
  check_errors    = samples scored 0 because the task's checker raised on their answer
  constant_baseline = the accuracy of always giving the most common reference (what ignoring the question earns)
Each problem is scored by its own task's checker (thinkforge/tasks) on the extracted answer only.
The sampling protocol is recorded beside every number.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from thinkforge import grading
from thinkforge.formats import parse, response, words
from thinkforge.monitor import progress_bar
from thinkforge.rollout.types import Sampler, SamplingParams, stream_key
from thinkforge.tasks import Problem, check_errors, constant_baseline, is_correct

REASONING_MIN_WORDS = 5


def score_sample(problem: Problem, text: str, finish_reason: str) -> dict:
    """One sample's row: graded, and the card's metrics, from one parse of its text."""
    p = parse(text)
    think_words = words(p.thinking)
    before, errors = grading.timeouts(), check_errors()
    score = problem.score(p.answer)  # the task's own checker, on the extracted answer only
    return {
        "correct": is_correct(score),
        "score": score,  # partial credit where the task gives it
        "grading_timeout": grading.timeouts() > before,  # graded wrong for running over the budget
        "check_error": check_errors() > errors,  # the checker raised on this answer: scored 0
        "format_ok": p.format_ok,
        "has_reasoning": think_words >= REASONING_MIN_WORDS,
        "think_words": think_words,
        "answer": p.answer,
        "truncated": finish_reason == "length",
    }


def problem_key(row: dict) -> tuple[str, str, str]:
    """A problem's identity: its id, question and reference (synthetic ids of two seeds, or duplicate ids in a
    local file, name different problems)."""
    return (str(row["problem_id"]), str(row.get("question", "")), str(row.get("reference", "")))


def problem_shares(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """problem -> the share of its samples that are correct (its pass@1)."""
    by: dict[tuple, list[bool]] = {}
    for r in rows:
        by.setdefault(problem_key(r), []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in by.items()}


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for p in (0.5, 1) and an integer df >= 1, by bisection on the exact distribution
    (Abramowitz & Stegun 26.7.3-4: P(|T| < t) as a finite series in theta = atan(t / sqrt(df))).
    t(0.975, 29) = 2.045: an AIME-sized interval is 4% wider than with z = 1.96."""
    import math

    def central(t: float) -> float:  # P(|T| < t)
        theta = math.atan(t / math.sqrt(df))
        c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:  # odd
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 1.0
    while central(hi) < 2 * p - 1:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < 2 * p - 1 else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: list[float]) -> tuple[float, float, list[float]]:
    """(mean, standard error, 95% interval mean -+ t(0.975, n - 1) se) of n values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), [float("nan"), float("nan")]
    se = (sum((x - mean) ** 2 for x in values) / (n - 1)) ** 0.5 / n**0.5
    half = t_quantile(0.975, n - 1) * se
    return mean, se, [mean - half, mean + half]


def summarize(rows: list[dict], n_problems: int) -> dict:
    shares = problem_shares(rows)
    n = max(1, len(rows))
    return {
        "accuracy": sum(shares.values()) / max(1, len(shares)),
        "format_rate": sum(r["format_ok"] for r in rows) / n,
        "reasoning_rate": sum(r["has_reasoning"] for r in rows) / n,
        "avg_think_words": sum(r["think_words"] for r in rows) / n,
        "truncated_rate": sum(r["truncated"] for r in rows) / n,
        "grading_timeouts": sum(r["grading_timeout"] for r in rows),
        "check_errors": sum(r.get("check_error", False) for r in rows),
        "n": n_problems,
        "samples": len(rows),
    }


def accuracy_interval(rows: list[dict]) -> list[float]:
    """The 95% interval of pass@1 over problems: mean of the problems' shares -+ t(0.975, n - 1) sd / sqrt(n)."""
    return mean_interval(list(problem_shares(rows).values()))[2]


def paired_change(before: list[dict], after: list[dict]) -> dict:
    """The change of pass@1 from `before` to `after` (per-sample rows of two evaluations of the same problems),
    paired by problem: d_i = after_i - before_i, each the share of problem i's samples that are correct.

      change = mean(d),  se = sd(d) / sqrt(n),  95% interval = change -+ t(0.975, n - 1) se

    Pairing removes the problems' difficulty from the noise; with the per-sample random streams the two
    models also meet the same draws, so d_i is non-zero only where the models differ. A problem is its id,
    question and reference: two evaluations of different problem sets are refused, never paired on their
    intersection. `gained` / `lost`: problems whose share rose / fell.
    """
    a, b = problem_shares(before), problem_shares(after)
    if a.keys() != b.keys():
        only_a, only_b = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        raise ValueError(f"the two evaluations are of different problems ({len(a)} and {len(b)} problems; "
                         f"{only_a} only in the first, {only_b} only in the second: ids, questions or references differ)")
    common = list(a)
    d = [b[k] - a[k] for k in common]
    n = len(d)
    mean, se, ci95 = mean_interval(d)
    return {"change": mean, "se": se, "ci95": ci95, "n": n,
            "before": sum(a[k] for k in common) / n, "after": sum(b[k] for k in common) / n,
            "gained": sum(x > 0 for x in d), "lost": sum(x < 0 for x in d)}


def evaluate(
    generator: Sampler,
    problems: list[Problem],
    prompt_fn: Callable[[str], str],
    params: SamplingParams,
    *,
    samples: int = 1,
    chunk: int = 8,
    progress: bool = True,
    benchmark: str = "",
) -> tuple[list[dict], dict]:
    """(per-sample rows, summary) of `samples` completions per problem, `chunk` problems per generate call.
    Each problem's random stream is keyed by (benchmark, seed, its position), so the draws do not depend on the
    chunk size, and two models evaluated with one seed meet the same draws (common random numbers)."""

    rows: list[dict] = []
    start = time.time()
    bar = progress_bar(len(problems), "eval", "problem", progress)
    for i in range(0, len(problems), chunk):
        batch = problems[i : i + chunk]
        streams = tuple(stream_key("eval", benchmark, params.seed, params.first_prompt + i + k) for k in range(len(batch)))
        params_i = replace(params, streams=streams)
        prompts = [prompt_fn(p.question) for p in batch]
        completions = generator.generate(prompts, samples, params_i)
        for c in completions:
            problem = batch[c.prompt_index]
            rows.append({"problem_id": problem.id, "task": problem.task_name, "question": problem.question,
                         "reference": problem.reference,
                         "completion": c.text, "finish_reason": c.finish_reason,
                         **score_sample(problem, response(prompts[c.prompt_index], c.text), c.finish_reason)})
        bar.update(len(batch))
        bar.set_postfix(acc=f"{summarize(rows, 0)['accuracy']:.3f}", refresh=False)
    bar.close()
    summary = summarize(rows, len(problems))
    summary["constant_baseline"] = constant_baseline(problems)
    if len({r["task"] for r in rows}) > 1:  # a mix: each task's own accuracy beside the whole
        summary["by_task"] = {t: summarize([r for r in rows if r["task"] == t], 0)["accuracy"]
                              for t in sorted({r["task"] for r in rows})}
    if line := grading.timeout_warning(summary["grading_timeouts"], len(rows), f"eval {benchmark}".strip()):
        warnings.warn(line, stacklevel=1)
    summary["protocol"] = {**{k: v for k, v in asdict(params).items() if k != "streams"}, "samples_per_problem": samples}
    summary["seconds"] = round(time.time() - start, 2)
    return rows, summary


def table(results: dict[str, dict]) -> str:
    """A Markdown table of benchmark -> summary."""
    lines = ["| benchmark | accuracy | constant answer | format | reasoning | think words | truncated | n | k |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, s in results.items():
        base = s.get("constant_baseline")
        const = f"{100 * base['accuracy']:.1f} ({base['answer'][:12]})" if base else "-"
        lines.append(
            f"| {name} | {100 * s['accuracy']:.1f} | {const} | {100 * s['format_rate']:.1f} | {100 * s['reasoning_rate']:.1f} "
            f"| {s['avg_think_words']:.1f} | {100 * s['truncated_rate']:.1f} | {s['n']} | {s['protocol']['samples_per_problem']} |"
        )
        if s.get("notes"):
            notes.append(f"{name}: {s['notes']}")
        if s.get("check_errors"):
            notes.append(f"{name}: {s['check_errors']} answers scored 0 because the task's checker raised on them")
    return "\n".join(lines + [f"note: {n}" for n in notes])


def sampling_params(recipe) -> SamplingParams:
    """The recipe's generation settings (generation.*, seed) as the sampler takes them."""
    g = recipe.generation
    return SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k, recipe.seed)


def run(recipe, model_path: str, out_dir: str | Path, progress: bool = True) -> dict[str, dict]:
    """Evaluate the model at model_path on every benchmark of the recipe (eval.*, generation.*, synthetic.*),
    writing <benchmark>.samples.jsonl and .summary.json into out_dir; returns benchmark -> summary.

    The one entry point of `thinkforge eval` and of the pipeline's after-stage evaluations. Every benchmark is
    loaded before the model, so a bad name or file fails in a second, not after loading.
    """
    from thinkforge import rollout, tasks
    from thinkforge.formats import prompt_renderer

    ev = recipe.eval
    problems = {b: tasks.for_evaluation(recipe, b) for b in ev.benchmarks}
    generator, tok = rollout.load_generator(recipe.model, model_path, recipe.generation.batch_size, recipe.rollout, out_dir,
                                            recipe.generation.max_new_tokens)
    prompt_fn, params = prompt_renderer(recipe.model, tok), sampling_params(recipe)
    results = {}
    with contextlib.closing(generator):
        for name, (task, probs) in problems.items():
            chunk = max(1, recipe.generation.batch_size // ev.samples)  # rows per call: generation.batch_size
            rows, summary = evaluate(generator, probs, prompt_fn, params, samples=ev.samples, chunk=chunk, progress=progress,
                                     benchmark=name)
            summary.update(benchmark=name, model=model_path, backend=recipe.rollout.backend, notes=task.notes)
            write(out_dir, name, rows, summary)
            results[name] = summary
    return results


def write(out_dir: str | Path, name: str, rows: list[dict], summary: dict) -> None:
    from thinkforge.io import write_json, write_jsonl

    out_dir = Path(out_dir)
    write_jsonl(out_dir / f"{file_stem(name)}.samples.jsonl", rows)
    write_json(out_dir / f"{file_stem(name)}.summary.json", summary)


def file_stem(benchmark: str) -> str:
    """A benchmark's name as a file name everywhere (reasoning_gym:chain_sum -> reasoning_gym-chain_sum)."""
    return benchmark.replace(":", "-").replace("/", "-")
