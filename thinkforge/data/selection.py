"""Rejection sampling and selection over graded rollouts (the output of `distill`).

- accepted: correct rollouts that ended by themselves, duplicates dropped (same problem, same text after
  whitespace folding); a correct rollout cut off at the token limit (finish_reason "length") is not SFT data:
  training on it teaches the model not to stop;
- rejected: incorrect rollouts, kept for the DPO pairs of stage 3;
- per-problem teacher pass rate (its difficulty signal);
- hard: the stage-2 subset of accepted rollouts whose problem passes the filters (pass rate at most
  `max_pass_rate`, difficulty at least `min_difficulty`, at least `min_words` words).
"""

from __future__ import annotations

from pathlib import Path

from thinkforge.io import read_jsonl, write_json, write_jsonl

REQUIRED = ["problem_id", "question", "completion", "correct"]


def _key(row: dict) -> tuple[str, str]:
    return row["problem_id"], " ".join(row["completion"].split())


def main(in_path: str | Path, out_dir: str | Path, max_pass_rate: float = 1.0, min_difficulty: int | None = None,
         min_words: int = 0) -> dict:
    rows = read_jsonl(in_path, required=REQUIRED, nonempty=True)
    per_problem: dict[str, list[bool]] = {}
    for r in rows:
        per_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    pass_rate = {pid: sum(v) / len(v) for pid, v in per_problem.items()}

    accepted, rejected, seen, cut_off = [], [], set(), 0
    for r in rows:
        r = {**r, "pass_rate": pass_rate[r["problem_id"]]}
        if not r["correct"]:
            rejected.append(r)
        elif r.get("finish_reason") == "length":
            cut_off += 1
        elif _key(r) not in seen:
            seen.add(_key(r))
            accepted.append(r)
    hard = [r for r in accepted
            if r["pass_rate"] <= max_pass_rate
            and (min_difficulty is None or (r.get("difficulty") or 0) >= min_difficulty)
            and r.get("length", len(r["completion"].split())) >= min_words]

    out_dir = Path(out_dir)
    write_jsonl(out_dir / "accepted.jsonl", accepted)
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    write_jsonl(out_dir / "hard.jsonl", hard)
    stats = {
        "rollouts": len(rows), "problems": len(per_problem), "accepted": len(accepted), "rejected": len(rejected),
        "duplicates_dropped": sum(r["correct"] for r in rows) - len(accepted) - cut_off, "cut_off_dropped": cut_off,
        "hard": len(hard),
        "hard_problems": len({r["problem_id"] for r in hard}),
        "problems_with_both": sum(1 for v in per_problem.values() if any(v) and not all(v)),
        "mean_pass_rate": sum(pass_rate.values()) / max(1, len(pass_rate)),
        "filters": {"max_pass_rate": max_pass_rate, "min_difficulty": min_difficulty, "min_words": min_words},
    }
    write_json(out_dir / "stats.json", stats)
    write_json(out_dir / "pass_rates.json", pass_rate)
    return stats
