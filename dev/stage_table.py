"""One table over seeds from `thinkforge run` folders: each stage's accuracy, its change over the stage above
with the 95% interval (paired by problem), format compliance and thinking length, and the wall time. Runs that
evaluated several benchmarks get one more table per benchmark (its accuracy and paired change per stage).

    python dev/stage_table.py runs/smollm2-infused-s0 runs/smollm2-infused-s1 runs/smollm2-infused-s2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folders: list[str]) -> None:
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


if __name__ == "__main__":
    main(sys.argv[1:])
