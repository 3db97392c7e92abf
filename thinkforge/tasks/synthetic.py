"""The built-in task: templated arithmetic word problems (thinkforge/data/synthetic.py), levels 1-4, a worked
solution per problem, test and train splits disjoint by their arithmetic."""

from __future__ import annotations

from thinkforge.errors import UserError
from thinkforge.tasks.base import Problem, Task, shares


class Synthetic(Task):
    family = "synthetic"
    accepts = frozenset({"level"})
    procedural = True
    levels = (1, 2, 3, 4)
    default_levels = (1, 2)  # trained on 1 and 2 (the facts of 1 recur in 2's steps), evaluated at its option `level`

    def problems(self, split: str, n: int | None, seed: int, levels: list[int] | None = None,
                 stream: str = "") -> list[Problem]:
        from thinkforge.data import synthetic as gen

        levels = levels or [int(self.options.get("level", 2))]
        n = 200 if n is None else n
        out = []
        for level, share in zip(levels, shares(n, len(levels)), strict=True):
            if not share:
                continue
            try:
                rows = gen.generate(share, split, level, seed, stream)
            except ValueError as e:
                raise UserError(f"task synthetic ({split}, level {level}, {share} problems): {e}") from None
            out += [self.make(r["id"], r["question"], r["final"], solution=r["answer"], difficulty=r["difficulty"])
                    for r in rows]
        return out
