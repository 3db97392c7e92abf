"""Which tasks can a model learn? Its accuracy on held-out items of each task at one level: greedy (pass@1), and
with k samples at the RL temperature (rl.temperature, rl.group_size samples, rl.max_new_tokens: RL's own groups)
the share of items with at least one right answer (pass@k: where GRPO's groups have a reward to learn from),
beside the constant-answer baseline, and the greedy answers' format and truncation rates.

    python dev/task_baselines.py --model models/smollm2-135m-instruct --config recipes/smollm2-infused.yaml \\
        --task reasoning_gym:chain_sum --task reasoning_gym:leg_counting --level 1 --items 40 --k 4

Every task is scored by its own checker on the extracted answer (thinkforge/tasks). Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", default=None, help="A recipe: its prompt format, system prompt and generation settings")
    ap.add_argument("--task", dest="tasks", action="append", required=True, help="A task name (repeatable)")
    ap.add_argument("--level", type=int, default=None, help="The difficulty level of tasks that have levels")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--k", type=int, default=None, help="Samples per item (default: rl.group_size)")
    ap.add_argument("--temperature", type=float, default=None, help="Their temperature (default: rl.temperature)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="New tokens (default: rl.max_new_tokens)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="A recipe setting, key=value (repeatable), e.g. model.system_prompt=...")
    a = ap.parse_args()

    from thinkforge import evaluate, rollout, tasks
    from thinkforge.config import load_config
    from thinkforge.formats import prompt_renderer

    recipe = load_config(a.config, [f"model.name_or_path={a.model}", f"eval.benchmarks={json.dumps(a.tasks)}",
                                    *a.overrides])
    k = a.k or recipe.rl.group_size
    temperature = recipe.rl.temperature if a.temperature is None else a.temperature
    new_tokens = a.max_new_tokens or recipe.rl.max_new_tokens
    chosen, levels = {}, {}
    for name in a.tasks:
        task = tasks.from_recipe(recipe, name)  # the recipe's options (synthetic.difficulty too)
        level = [a.level] if a.level is not None and task.levels else None
        chosen[name] = task.problems("test", a.items, recipe.seed, task.level_list(level, "--level"))
        levels[name] = sorted({p.meta.get("difficulty") for p in chosen[name]} - {None}) or "none"
    generator, tok = rollout.load_generator(recipe.model, a.model, recipe.generation.batch_size, recipe.rollout,
                                            tempfile.mkdtemp(), new_tokens)
    prompt_fn, greedy = prompt_renderer(recipe.model, tok), evaluate.sampling_params(recipe)
    greedy = dataclasses.replace(greedy, max_new_tokens=new_tokens, temperature=0.0)
    sampled = dataclasses.replace(greedy, temperature=temperature, top_p=recipe.rl.top_p, top_k=0)  # as RL samples
    out, start = {}, time.time()
    with contextlib.closing(generator):
        for name, probs in chosen.items():
            chunk = max(1, recipe.generation.batch_size // k)
            _, g = evaluate.evaluate(generator, probs, prompt_fn, greedy, chunk=recipe.generation.batch_size, progress=False,
                                     benchmark=name)
            rows, s = evaluate.evaluate(generator, probs, prompt_fn, sampled, samples=k, chunk=chunk, progress=False, benchmark=name)
            shares = evaluate.problem_shares(rows)
            base = tasks.constant_baseline(probs)
            out[name] = {"greedy": g["accuracy"], "sampled": s["accuracy"],
                         "pass_at_k": sum(v > 0 for v in shares.values()) / len(shares),
                         "mixed_groups": sum(0 < v < 1 for v in shares.values()) / len(shares),
                         "constant": base["accuracy"] if base else None, "format": g["format_rate"],
                         "truncated": g["truncated_rate"], "items": len(probs), "levels": levels[name]}
    print(f"{a.model}, up to {a.items} held-out items per task, greedy and {k} samples at temperature {temperature} "
          f"(top-p {recipe.rl.top_p}), {new_tokens} new tokens, {time.time() - start:.0f} s")
    print("| task | levels | items | greedy | sampled pass@1 | pass@k | items with mixed samples | constant answer | "
          "format (greedy) | truncated (greedy) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in out.items():
        const = "-" if r["constant"] is None else f"{100 * r['constant']:.1f}"
        print(f"| {name} | {r['levels']} | {r['items']} | {100 * r['greedy']:.1f} | {100 * r['sampled']:.1f} | "
              f"{100 * r['pass_at_k']:.1f} | {100 * r['mixed_groups']:.1f} | {const} | {100 * r['format']:.1f} | "
              f"{100 * r['truncated']:.1f} |")
    print(json.dumps({"metric": "task_baselines", "k": k, "tasks": {k: {m: (round(v, 4) if isinstance(v, float) else v)
                                                                           for m, v in r.items()} for k, r in out.items()}}))


if __name__ == "__main__":
    main()
