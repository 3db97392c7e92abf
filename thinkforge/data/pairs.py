"""Stage-3 data: preference pairs of a verified-correct (chosen) and an incorrect (rejected) rollout.

Input: graded rollouts (rows of `distill`: problem_id, question, completion, correct, teacher), from the
teacher, from the current model's own samples, or both. Per problem, up to `per_problem` pairs, each rollout
used at most once; with `similar_length`, pairs whose lengths are closest come first (so DPO learns
correctness, not length). Problems without both a correct and an incorrect rollout are skipped and counted.
"""

from __future__ import annotations

import random
from pathlib import Path

from thinkforge.io import read_jsonl, write_jsonl

REQUIRED = ["problem_id", "question", "completion", "correct"]


def build(rows: list[dict], per_problem: int = 1, similar_length: bool = True, seed: int = 0) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    by_problem: dict[str, dict[str, list[dict]]] = {}
    cut_off = 0
    for r in rows:
        if r["correct"] and r.get("finish_reason") == "length":  # right but unfinished: chosen, it teaches not to stop
            cut_off += 1
            continue
        side = "chosen" if r["correct"] else "rejected"
        group = by_problem.setdefault(r["problem_id"], {"chosen": [], "rejected": [], "seen": set()})
        key = " ".join(r["completion"].split())
        if key not in group["seen"]:
            group["seen"].add(key)
            group[side].append(r)
    pairs, skipped = [], 0
    for pid, g in by_problem.items():
        if not g["chosen"] or not g["rejected"]:
            skipped += 1
            continue
        candidates = [(c, r) for c in g["chosen"] for r in g["rejected"]]
        rng.shuffle(candidates)
        if similar_length:
            candidates.sort(key=lambda cr: abs(len(cr[0]["completion"]) - len(cr[1]["completion"])))
        used_c, used_r = set(), set()
        for c, r in candidates:
            if len([p for p in pairs if p["problem_id"] == pid]) >= per_problem:
                break
            if id(c) in used_c or id(r) in used_r:
                continue
            used_c.add(id(c))
            used_r.add(id(r))
            pairs.append({"problem_id": pid, "question": c["question"], "chosen": c["completion"],
                          "rejected": r["completion"], "chosen_source": c.get("teacher", "unknown"),
                          "rejected_source": r.get("teacher", "unknown")})
    stats = {"problems": len(by_problem), "problems_with_both": len(by_problem) - skipped,
             "skipped_missing_side": skipped, "pairs": len(pairs), "cut_off_correct_dropped": cut_off}
    return pairs, stats


def make(recipe, out_path: str | Path, rollout_files: list[str | Path], model_path: str | None = None,
         progress: bool = True) -> dict:
    """DPO pairs into out_path from the policy's own graded samples (model_path: sampled on
    distill.policy_problems(recipe) into <out>.policy-rollouts.jsonl) and the graded rollouts of rollout_files
    (the teacher's). The one builder of `thinkforge data pairs` and `thinkforge run`."""
    from thinkforge.data import distill

    files = []
    if model_path:
        own = Path(out_path).with_suffix(".policy-rollouts.jsonl")
        distill.sample_policy(recipe, model_path, distill.policy_problems(recipe), own, progress)
        files.append(own)
    files += list(rollout_files)
    return main(files, out_path, recipe.pairs.per_problem, recipe.pairs.similar_length, recipe.seed)


def main(rollout_files: list[str | Path], out_path: str | Path, per_problem: int = 1, similar_length: bool = True,
         seed: int = 0) -> dict:
    rows = [r for f in rollout_files for r in read_jsonl(f, required=REQUIRED, nonempty=True)]
    pairs, stats = build(rows, per_problem, similar_length, seed)
    write_jsonl(out_path, pairs)
    return stats
