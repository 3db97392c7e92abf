"""One table over seeds from `thinkforge run` folders: each stage's accuracy, its change over the stage above
with the 95% interval (paired by problem), format compliance and thinking length, and the wall time. Runs that
evaluated several benchmarks get one more table per benchmark (its accuracy and paired change per stage).

    python dev/stage_table.py runs/smollm2-infused-s0 runs/smollm2-infused-s1 runs/smollm2-infused-s2
    python dev/stage_table.py --pool reasoning_gym:chain_sum --pool reasoning_gym:products runs/rg-four-stage/s*

--pool: one more table over those benchmarks' items together (each stage's paired change over all of them:
the tasks a recipe trained on, as one held-out set).

--clean: the same tables over the evaluation items that have no twin among the problems the run trained on
(the same arithmetic in any wording or order, `tasks.reasoning_gym.expression_key`: "5 * 8" is a twin of
"8 * 5", "Calculate 3 + 6." of "...: 6 + 3 ="). Training problems: every question of the run's data files
(teacher rollouts, pairs and their policy samples) and the RL stage's whole prompt pool, rebuilt from the
run's config.yaml (more than the steps drew: the count of clean items errs low). Each table says how many
items were left.
"""

from __future__ import annotations

import json
from pathlib import Path


def pooled(folder: Path, stage: str, benchmarks: list[str], seen: set | None = None) -> list[dict] | None:
    """The per-sample rows of one stage's evaluations of `benchmarks`, their problem ids made unique; with
    `seen` (training keys, `trained_keys`) only the items without a twin among them."""
    from thinkforge.evaluate import file_stem

    rows = []
    for bench in benchmarks:
        path = folder / stage / "eval" / f"{file_stem(bench)}.samples.jsonl"
        if not path.is_file():
            return None
        rows += [{**r, "problem_id": f"{bench}/{r['problem_id']}"} for r in map(json.loads, path.read_text().splitlines())
                 if seen is None or not twin(r["question"], seen)]
    return rows


def twin(question: str, seen: set) -> bool:
    from thinkforge.tasks.reasoning_gym import expression_key

    return " ".join(question.lower().split()) in seen or expression_key(question) in seen


def trained_keys(folder: Path) -> set:
    """The text and expression key of every problem the run in `folder` trained on (see --clean)."""
    from thinkforge import tasks
    from thinkforge.config import load_config
    from thinkforge.tasks.reasoning_gym import expression_key

    questions = [json.loads(x)["question"] for f in sorted((folder / "data").rglob("*.jsonl"))
                 for x in f.read_text().splitlines() if x.strip()]
    recipe = load_config(folder / "config.yaml")
    if "rl" in [s["name"] for s in json.loads((folder / "summary.json").read_text())["stages"]]:
        cfg = recipe.rl
        questions += [p.question for p in tasks.for_training(recipe, "rl", cfg.n_problems, cfg.difficulties, source=cfg.source,
                                                             stream="rl" if cfg.fresh_prompts else "")]
    return {" ".join(q.lower().split()) for q in questions} | {expression_key(q) for q in questions} - {None}


def pool_table(runs: list, names: list[str], benchmarks: list[str], clean: dict | None = None) -> None:
    """Accuracy and paired change per stage over `benchmarks`' items together; with `clean` (folder -> training
    keys) over the items without a training twin only."""
    from thinkforge.evaluate import paired_change

    what = "items without a training twin" if clean else "pooled"
    print(f"\n{' + '.join(benchmarks)}, {what}: accuracy % (change over the stage above; 95% interval, paired by "
          "problem)\n")
    print("| stage | " + " | ".join(f.name for f, _ in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for k, name in enumerate(names):
        cells = []
        for folder, summary in runs:
            seen = clean[folder] if clean else None
            rows = pooled(folder, summary["stages"][k]["name"], benchmarks, seen)
            above = pooled(folder, summary["stages"][k - 1]["name"], benchmarks, seen) if k else None
            if rows is None:
                cells.append("-")
                continue
            acc = sum(r["correct"] for r in rows) / len(rows)
            c = paired_change(above, rows) if above else None
            change = f" ({100 * c['change']:+.1f}; {100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f})" if c else ""
            cells.append(f"{100 * acc:.1f}{change}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if clean:
        counts = [len(pooled(folder, summary["stages"][0]["name"], benchmarks, clean[folder])) for folder, summary in runs]
        print("| items left | " + " | ".join(map(str, counts)) + " |")


def main(folders: list[str], pool: list[str] | None = None, clean: bool = False) -> None:
    runs = [(Path(f), json.loads((Path(f) / "summary.json").read_text())) for f in folders]
    names = [s["label"] for s in runs[0][1]["stages"]]
    benchmarks = list(runs[0][1]["stages"][0].get("benchmarks", {}))
    if clean:  # first: the last line is the wall time
        keys = {folder: trained_keys(folder) for folder, _ in runs}
        for bench in benchmarks:
            pool_table(runs, names, [bench], keys)
        if pool:
            pool_table(runs, names, pool, keys)
        print()
    print("| stage | " + " | ".join(f.name for f, _ in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for k, name in enumerate(names):
        cells = []
        for _, summary in runs:
            s = summary["stages"][k]
            c = s.get("change")
            change = f" ({100 * c['change']:+.1f}; {100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f})" if c else ""
            cells.append(f"{100 * s['accuracy']:.1f}{change}; format {100 * s['format_rate']:.0f}, "
                         f"think {s['avg_think_words']:.0f} words")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| wall time | " + " | ".join(f"{summary['wall_seconds'] / 60:.1f} min" for _, summary in runs) + " |")
    for bench in benchmarks if len(benchmarks) > 1 else []:
        print(f"\n{bench}: accuracy % (change over the stage above; 95% interval, paired by problem)\n")
        print("| stage | " + " | ".join(f.name for f, _ in runs) + " |")
        print("|---" * (len(runs) + 1) + "|")
        for k, name in enumerate(names):
            cells = []
            for _, summary in runs:
                b = summary["stages"][k].get("benchmarks", {}).get(bench, {})
                c = b.get("change")
                change = f" ({100 * c['change']:+.1f}; {100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f})" if c else ""
                cells.append(f"{100 * b['accuracy']:.1f}{change}" if "accuracy" in b else "-")
            print(f"| {name} | " + " | ".join(cells) + " |")
    if pool:
        pool_table(runs, names, pool)
    print("\n| wall time | " + " | ".join(f"{summary['wall_seconds'] / 60:.1f} min" for _, summary in runs) + " |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="thinkforge run folders (one per seed)")
    ap.add_argument("--pool", action="append", default=None, help="a benchmark to pool with the other --pool ones")
    ap.add_argument("--clean", action="store_true", help="also the tables over items without a twin in training")
    a = ap.parse_args()
    main(a.folders, a.pool, a.clean)
