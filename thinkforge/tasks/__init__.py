"""Tasks: problems with their own checker, difficulty levels and worked solutions (tasks/base.py says what a
task is). A new task is one file here with a `Task` subclass, and one line in TASKS.

Names, the same everywhere (`eval.benchmarks`, `rl.source`, `distill.source`, `thinkforge eval -b`,
`thinkforge rl --task`, `thinkforge data distill --task`): a registry name (`synthetic`, `gsm8k`, ...), a
family with its argument (`reasoning_gym:chain_sum`), or a weighted mix the recipe defines (`tasks.mixes`).
A task's options (`tasks.options[name]`) are its own config; a reasoning-gym task's `level` picks its
curriculum's level for evaluation.
"""

from __future__ import annotations

import difflib
import importlib
import random
from typing import Any

from thinkforge.errors import UserError
from thinkforge.tasks.base import CORRECT, Problem, Task, check_errors, checked, is_correct

__all__ = ["CORRECT", "Problem", "Task", "is_correct", "TASKS", "load", "checked", "check_errors", "for_training",
           "for_evaluation", "from_recipe", "assert_disjoint", "constant_baseline"]

# name -> "module:Class" (imported when the task is named: reasoning-gym pulls matplotlib and sympy)
TASKS = {
    "synthetic": "thinkforge.tasks.synthetic:Synthetic",
    "gsm8k": "thinkforge.tasks.hub:GSM8K",
    "math500": "thinkforge.tasks.hub:MATH500",
    "aime24": "thinkforge.tasks.hub:AIME24",
    "gpqa_diamond": "thinkforge.tasks.hub:GPQADiamond",
    "local": "thinkforge.tasks.local:Local",
    "reasoning_gym": "thinkforge.tasks.reasoning_gym:ReasoningGym",
}


def task_class(family: str) -> type[Task]:
    module, _, attr = TASKS[family].partition(":")
    return getattr(importlib.import_module(module), attr)


def load(name: str, options: dict[str, dict] | None = None, mixes: dict[str, dict[str, float]] | None = None,
         data_path: str | None = None, columns: dict[str, str] | None = None) -> Task:
    """The task a name names. `options`: task name -> its options; `mixes`: mix name -> {task name: weight}."""
    options, mixes = options or {}, mixes or {}
    if name in mixes:
        return Mix(name, {load(part, options, None, data_path, columns): w for part, w in mixes[name].items()})
    family, _, argument = name.partition(":")
    if family not in TASKS:
        known = [*TASKS, *mixes]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown task {name!r}; {hint}choose one of {', '.join(known)} "
                        "(reasoning_gym:<task> for reasoning-gym's, or a mix defined in tasks.mixes)")
    return task_class(family)(argument or None, options.get(name), data_path=data_path, columns=columns)


class Mix(Task):
    """A weighted mix of tasks (reasoning-gym's composite, for any tasks): n problems in shares by weight, each
    problem checked by its own task."""

    family = "mix"

    def __init__(self, name: str, parts: dict[Task, float]):
        super().__init__()
        if not parts or any(w <= 0 for w in parts.values()):
            raise UserError(f"tasks.mixes[{name!r}]: give each task a weight > 0")
        self.name, self.parts = name, parts
        self.procedural = all(t.procedural for t in parts)
        levelled = [t.levels for t in parts if t.levels is not None]
        self.levels = tuple(sorted(set().union(*levelled))) if levelled else None
        self.notes = "; ".join(f"{t.name}: {t.notes}" for t in parts if t.notes)

    def train_levels(self, levels: list[int] | None, where: str) -> list[int] | None:
        """Levels set: each part draws at its nearest own levels; unset: each part its own configuration."""
        return None if levels is None else super().train_levels(levels, where)

    def problems(self, split: str, n: int | None, seed: int, levels: list[int] | None = None,
                 stream: str = "") -> list[Problem]:
        """n problems in shares by weight (n None: each part's own default size, weights aside). At `levels`, a
        part draws at its own levels nearest to them (synthetic's 4 for a 6: a harder level never gets easier)."""
        if n is None:
            counts = [None] * len(self.parts)
        else:
            total = sum(self.parts.values())
            exact = [n * w / total for w in self.parts.values()]  # largest remainder: the shares sum to n
            counts = [int(x) for x in exact]
            for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
                counts[i] += 1
        out = []
        for task, k in zip(self.parts, counts, strict=True):
            if k != 0:
                own = sorted({min(task.levels, key=lambda x: (abs(x - want), -x)) for want in levels}) \
                    if levels and task.levels else None
                out += task.problems(split, k, seed, own, stream)
        random.Random(f"{seed}-{split}-{stream}-{self.name}").shuffle(out)  # interleaved, the same every run
        return out


# ---------------------------------------------------------------- what a recipe trains and evaluates on


def from_recipe(recipe, name: str, data_path: str | None = None, columns: dict[str, str] | None = None) -> Task:
    """The task a name names with the recipe's task settings (tasks.options, tasks.mixes, synthetic.difficulty)."""
    options = dict(recipe.tasks.options)  # the synthetic task's evaluation level lives in its own section
    options["synthetic"] = {"level": recipe.synthetic.difficulty, **options.get("synthetic", {})}
    return load(name, options, recipe.tasks.mixes, data_path, columns)


def for_evaluation(recipe, name: str) -> tuple[Task, list[Problem]]:
    """A benchmark's task and its evaluation problems: the test split (a procedural task's size: eval.limit, else
    synthetic.n_test for the synthetic task and tasks.n_test for others)."""
    ev = recipe.eval
    task = from_recipe(recipe, name, ev.data_path, ev.columns)
    n = ev.limit or (None if not task.procedural else recipe.synthetic.n_test if name == "synthetic" else recipe.tasks.n_test)
    problems = task.problems("test", n, recipe.seed)
    if not problems:
        raise UserError(f"benchmark {name!r} has no problems")
    return task, problems


def for_training(recipe, section: str, n: int, levels: list[int] | None, *, source: str | None = None,
                 data_path: str | None = None, columns: dict[str, str] | None = None, stream: str = "") -> list[Problem]:
    """Training problems of a recipe section (its source, levels, file), checked against the recipe's evaluation
    problems: a training problem that is also an evaluation problem is an error naming the count (procedural
    and local evaluation sets are compared; hub ones are not fetched for it)."""
    cfg = getattr(recipe, section)
    task = from_recipe(recipe, source or cfg.source, data_path, columns or {})
    problems = task.problems("train", n, recipe.seed, task.train_levels(levels, f"{section}.difficulties"), stream)
    if not problems:
        raise UserError(f"{section}: task {task.name} gave no training problems")
    for name in recipe.eval.benchmarks:
        other = from_recipe(recipe, name, recipe.eval.data_path, recipe.eval.columns)
        if other.procedural or recipe.eval.data_path:
            assert_disjoint(problems, for_evaluation(recipe, name)[1], f"{section} ({task.name}) and eval {name}")
    return problems


def _text(q: str) -> str:
    return " ".join(q.lower().split())


def _keys(p: Problem) -> set[str]:
    """What makes two problems the same: their text (case and spacing aside), and their twin key where their task
    has one (`Task.twin_key`: the arithmetic they ask for, in any order or wording)."""
    key = p.task.twin_key(p.question) if p.task is not None else None
    return {_text(p.question)} | ({key} if key else set())


def assert_disjoint(train: list[Problem], evaluation: list[Problem], where: str) -> None:
    """No training problem is an evaluation problem: the same question text (case and spacing aside), or the same
    twin key ("8 * 5" against "5 * 8", one task's wording against another's)."""
    seen = set().union(*(_keys(p) for p in evaluation)) if evaluation else set()
    overlap = [p for p in train if _keys(p) & seen]
    if overlap:
        raise UserError(f"{where}: {len(overlap)} of {len(train)} training problems are evaluation problems (e.g. "
                        f"{overlap[0].id}): training on them inflates the evaluation; draw training problems from "
                        "another split or file")


def constant_baseline(problems: list[Problem]) -> dict[str, Any] | None:
    """The accuracy of always giving the most common reference (scored by each problem's checker): what a model
    that ignores the question gets. None where the references are all empty (a task checked without one)."""
    refs = [p.reference for p in problems if p.reference]
    if not refs:
        return None
    answer = max(set(refs), key=lambda r: (refs.count(r), r))
    share = sum(is_correct(p.score(answer)) for p in problems) / len(problems)
    return {"answer": answer, "accuracy": share}

