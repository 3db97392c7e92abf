"""Benchmark evaluation: pass@1 over k samples, and the Infused Phi-2 card's metrics.

For each problem, k completions are sampled and graded with the same grader as training (PITFALLS 9).
  accuracy        = mean over problems of (share of its k samples that are correct)   (pass@1, SPEC 5)
  format_rate     = share of samples with exactly <think>..</think><answer>..</answer>
  reasoning_rate  = share of samples whose thinking has at least REASONING_MIN_WORDS words
  avg_think_words = mean words inside <think>
  truncated_rate  = share of samples that hit max_new_tokens (PITFALLS 2)
The sampling protocol is recorded beside every number.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from thinkforge.data.sources import Problem
from thinkforge.formats import parse, words
from thinkforge.grading import grade
from thinkforge.monitor import progress_bar
from thinkforge.rollout.types import Generator, SamplingParams

REASONING_MIN_WORDS = 5


def score_sample(problem: Problem, text: str, finish_reason: str) -> dict:
    p = parse(text)
    think_words = words(p.thinking)
    return {
        "correct": grade(text, problem.reference, problem.kind, list(problem.choices) if problem.choices else None),
        "format_ok": p.format_ok,
        "has_reasoning": think_words >= REASONING_MIN_WORDS,
        "think_words": think_words,
        "answer": p.answer,
        "truncated": finish_reason == "length",
    }


def problem_shares(rows: list[dict]) -> dict[str, float]:
    """problem_id -> the share of its samples that are correct (its pass@1)."""
    by: dict[str, list[bool]] = {}
    for r in rows:
        by.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in by.items()}


def summarize(rows: list[dict], n_problems: int) -> dict:
    shares = problem_shares(rows)
    n = max(1, len(rows))
    return {
        "accuracy": sum(shares.values()) / max(1, len(shares)),
        "format_rate": sum(r["format_ok"] for r in rows) / n,
        "reasoning_rate": sum(r["has_reasoning"] for r in rows) / n,
        "avg_think_words": sum(r["think_words"] for r in rows) / n,
        "truncated_rate": sum(r["truncated"] for r in rows) / n,
        "n": n_problems,
        "samples": len(rows),
    }


def accuracy_interval(rows: list[dict]) -> list[float]:
    """The 95% interval of pass@1 over problems: mean of the problems' shares -+ 1.96 sd / sqrt(n)."""
    shares = list(problem_shares(rows).values())
    n = len(shares)
    mean = sum(shares) / n
    se = (sum((x - mean) ** 2 for x in shares) / (n - 1)) ** 0.5 / n**0.5 if n > 1 else float("nan")
    return [mean - 1.96 * se, mean + 1.96 * se]


def paired_change(before: list[dict], after: list[dict]) -> dict:
    """The change of pass@1 from `before` to `after` (per-sample rows of two evaluations of the same problems),
    paired by problem: d_i = after_i - before_i, each the share of problem i's samples that are correct.

      change = mean(d),  se = sd(d) / sqrt(n),  95% interval = change -+ 1.96 se  (n problems in both)

    Pairing removes the problems' difficulty from the noise; with the per-sample random streams the two
    models also meet the same draws, so d_i is non-zero only where the models differ. `gained` / `lost`:
    problems whose share rose / fell.
    """
    a, b = problem_shares(before), problem_shares(after)
    common = [k for k in a if k in b]
    if not common:
        raise ValueError("the two evaluations share no problem (problem_id)")
    d = [b[k] - a[k] for k in common]
    n = len(d)
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 / n**0.5 if n > 1 else float("nan")
    return {"change": mean, "se": se, "ci95": [mean - 1.96 * se, mean + 1.96 * se], "n": n,
            "before": sum(a[k] for k in common) / n, "after": sum(b[k] for k in common) / n,
            "gained": sum(x > 0 for x in d), "lost": sum(x < 0 for x in d)}


def evaluate(
    generator: Generator,
    problems: list[Problem],
    prompt_fn: Callable[[str], str],
    params: SamplingParams,
    samples: int = 1,
    chunk: int = 8,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """(per-sample rows, summary) of `samples` completions per problem, `chunk` problems per generate call.
    Each sample's seed is keyed by its problem's position, so the draws do not depend on the chunk size."""

    rows: list[dict] = []
    start = time.time()
    bar = progress_bar(len(problems), "eval", "problem", progress)
    for i in range(0, len(problems), chunk):
        batch = problems[i : i + chunk]
        params_i = SamplingParams(**{**asdict(params), "first_prompt": params.first_prompt + i})
        completions = generator.generate([prompt_fn(p.question) for p in batch], samples, params_i)
        for c in completions:
            problem = batch[c.prompt_index]
            rows.append({"problem_id": problem.id, "question": problem.question, "reference": problem.reference,
                         "completion": c.text, "finish_reason": c.finish_reason,
                         **score_sample(problem, c.text, c.finish_reason)})
        bar.update(len(batch))
        bar.set_postfix(acc=f"{summarize(rows, 0)['accuracy']:.3f}", refresh=False)
    bar.close()
    summary = summarize(rows, len(problems))
    summary["protocol"] = {**{k: v for k, v in asdict(params).items() if k != "streams"}, "samples_per_problem": samples}
    summary["seconds"] = round(time.time() - start, 2)
    return rows, summary


def table(results: dict[str, dict]) -> str:
    """A Markdown table of benchmark -> summary."""
    lines = ["| benchmark | accuracy | format | reasoning | think words | truncated | n | k |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(
            f"| {name} | {100 * s['accuracy']:.1f} | {100 * s['format_rate']:.1f} | {100 * s['reasoning_rate']:.1f} "
            f"| {s['avg_think_words']:.1f} | {100 * s['truncated_rate']:.1f} | {s['n']} | {s['protocol']['samples_per_problem']} |"
        )
    return "\n".join(lines)


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
    from thinkforge import rollout
    from thinkforge.data.sources import load_benchmark
    from thinkforge.formats import prompt_renderer

    ev = recipe.eval
    problems = {b: load_benchmark(b, ev.data_path, ev.columns, ev.limit, recipe.seed, recipe.synthetic.difficulty,
                                  recipe.synthetic.n_test) for b in ev.benchmarks}
    generator, tok = rollout.load_generator(recipe.model, model_path, recipe.generation.batch_size, recipe.rollout, out_dir)
    prompt_fn, params = prompt_renderer(recipe.model, tok), sampling_params(recipe)
    results = {}
    with contextlib.closing(generator):
        for name, probs in problems.items():
            chunk = max(1, recipe.generation.batch_size // ev.samples)  # rows per call: generation.batch_size
            rows, summary = evaluate(generator, probs, prompt_fn, params, ev.samples, chunk, progress)
            summary.update(benchmark=name, model=model_path, backend=recipe.rollout.backend)
            write(out_dir, name, rows, summary)
            results[name] = summary
    return results


def write(out_dir: str | Path, name: str, rows: list[dict], summary: dict) -> None:
    from thinkforge.io import write_json, write_jsonl

    out_dir = Path(out_dir)
    write_jsonl(out_dir / f"{name}.samples.jsonl", rows)
    write_json(out_dir / f"{name}.summary.json", summary)
