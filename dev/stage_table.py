"""One table over seeds from `thinkforge run` folders: each stage's accuracy, its change over the stage above
with the 95% interval (paired by problem), format compliance and thinking length, and the wall time. Runs that
evaluated several benchmarks get one more table per benchmark (its accuracy and paired change per stage).

    python dev/stage_table.py runs/smollm2-infused-s0 runs/smollm2-infused-s1 runs/smollm2-infused-s2
    python dev/stage_table.py --pool reasoning_gym:chain_sum --pool reasoning_gym:products runs/rg-four-stage/s*

--pool: one more table over those benchmarks' items together (each stage's paired change over all of them:
the tasks a recipe trained on, as one held-out set).
"""

from __future__ import annotations

import json
from pathlib import Path


def pooled(folder: Path, stage: str, benchmarks: list[str]) -> list[dict] | None:
    """The per-sample rows of one stage's evaluations of `benchmarks`, their problem ids made unique."""
    from thinkforge.evaluate import file_stem

    rows = []
    for bench in benchmarks:
        path = folder / stage / "eval" / f"{file_stem(bench)}.samples.jsonl"
        if not path.is_file():
            return None
        rows += [{**r, "problem_id": f"{bench}/{r['problem_id']}"} for r in map(json.loads, path.read_text().splitlines())]
    return rows


def pool_table(runs: list, names: list[str], benchmarks: list[str]) -> None:
    from thinkforge.evaluate import paired_change

    print(f"\n{' + '.join(benchmarks)}, pooled: accuracy % (change over the stage above; 95% interval, paired by "
          "problem)\n")
    print("| stage | " + " | ".join(f.name for f, _ in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for k, name in enumerate(names):
        cells = []
        for folder, summary in runs:
            rows = pooled(folder, summary["stages"][k]["name"], benchmarks)
            above = pooled(folder, summary["stages"][k - 1]["name"], benchmarks) if k else None
            if rows is None:
                cells.append("-")
                continue
            acc = sum(r["correct"] for r in rows) / len(rows)
            c = paired_change(above, rows) if above else None
            change = f" ({100 * c['change']:+.1f}; {100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f})" if c else ""
            cells.append(f"{100 * acc:.1f}{change}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(folders: list[str], pool: list[str] | None = None) -> None:
    runs = [(Path(f), json.loads((Path(f) / "summary.json").read_text())) for f in folders]
    names = [s["label"] for s in runs[0][1]["stages"]]
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
    benchmarks = list(runs[0][1]["stages"][0].get("benchmarks", {}))
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


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="thinkforge run folders (one per seed)")
    ap.add_argument("--pool", action="append", default=None, help="a benchmark to pool with the other --pool ones")
    a = ap.parse_args()
    main(a.folders, a.pool)
