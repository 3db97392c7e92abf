"""What a task is: problems, its own checker, optional difficulty levels and worked solutions.

A task answers two questions and nothing else:
  problems(split, n, seed, levels, stream) -> list[Problem]   train and test splits disjoint by content
  check(problem, answer) -> score in [0, 1]                     `answer` is the extracted answer, never the
                                                                 whole completion; correct means 1.0
Every consumer (evaluation, RL rewards, the preflight, distillation, preference pairs, `data select`) reaches a
task through its problems: each `Problem` carries the task that made it (`problem.score(answer)`), so a mix of
tasks is graded by each problem's own checker.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from thinkforge.errors import UserError

CORRECT = 1.0  # the score of a correct answer; anything less is wrong (partial credit feeds the correctness reward)


def is_correct(score: float) -> bool:
    return score >= CORRECT


@dataclass(frozen=True)
class Problem:
    """One question. `reference` is what a checker compares with (shown in rows and reports); `kind` is how the
    built-in grader reads it (math or mcq); `meta` holds what the task's checker needs (its own entry), a worked
    `solution` where the task has one, and the `difficulty` level it was drawn at; `task` checks it."""

    id: str
    question: str
    reference: str
    kind: str = "math"
    choices: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False)
    task: Task | None = field(default=None, compare=False, repr=False)

    def score(self, answer: str | None) -> float:
        """The task's score of an extracted answer, in [0, 1]: a checker that raises or returns something else
        scores 0, is counted (`tasks.check_errors()`) and logged once per task, never a crash."""
        return checked(self, answer)

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else "math"


class Task:
    """The interface. A subclass sets `family` (its registry name), implements `problems` and, unless the
    built-in grader suits it, `check`; `levels` lists its difficulty levels (None: it has none)."""

    family: ClassVar[str] = ""
    procedural: ClassVar[bool] = False  # problems are generated (cheap, any number): evaluation sets are checked
    # against training sets by content before a run trains
    takes_argument: ClassVar[bool] = False  # named `family:argument` (reasoning_gym:chain_sum)
    notes: ClassVar[str] = ""  # known caveats, printed with an evaluation (labels known to be unreliable, ...)
    accepts: ClassVar[frozenset[str]] = frozenset()  # the options it reads (tasks.options[name]); others are errors

    def __init__(self, argument: str | None = None, options: dict[str, Any] | None = None,
                 data_path: str | None = None, columns: dict[str, str] | None = None):
        if argument is not None and not self.takes_argument:
            raise UserError(f"task {self.family!r} takes no ':{argument}'; name it {self.family}")
        if argument is None and self.takes_argument:
            raise UserError(f"task {self.family!r} needs a name after the colon, e.g. {self.family}:<task>")
        self.argument, self.options = argument, dict(options or {})
        if self.accepts is not None and (bad := sorted(set(self.options) - self.accepts)):
            raise UserError(f"task {self.family}: option(s) {', '.join(bad)} do nothing here; it reads "
                            f"{', '.join(sorted(self.accepts)) or 'no options'}")
        self.data_path, self.columns = data_path, dict(columns or {})
        self.name = f"{self.family}:{argument}" if argument else self.family

    levels: tuple[int, ...] | None = None  # difficulty levels, easiest first (instances may set their own)
    default_levels: tuple[int, ...] | None = None  # the training levels where a recipe sets none (None: its own config)

    def problems(self, split: str, n: int | None, seed: int, levels: list[int] | None = None,
                 stream: str = "") -> list[Problem]:
        """Up to `n` problems (None: all a fixed set has) of `split` (train or test). `levels`: the difficulty
        levels to draw from in equal shares (None: the task's default); `stream` names an independent draw."""
        raise NotImplementedError

    def check(self, problem: Problem, answer: str | None) -> float:
        """The built-in grader (math-verify behind exact rationals; one option letter for multiple choice), with
        partial credit for a number within 10% of a numeric reference."""
        from thinkforge.grading import grade_answer, partial_credit

        if grade_answer(answer, problem.reference, problem.kind, list(problem.choices) if problem.choices else None):
            return CORRECT
        return 0.0 if problem.kind == "mcq" else partial_credit(answer, problem.reference)

    def twin_key(self, question: str) -> str | None:
        """What a question shares with its twins in this task and others (the same arithmetic in another order or
        wording), where the task has twins: its train/test split and the training check use it; None: the text
        alone names a problem."""
        return None

    def reward_credit(self, problem: Problem, answer: str | None, score: float) -> float:
        """What a wrong answer (`score` < 1, the checker's) earns in a reward that pays partial credit (the Infused
        card's correctness): the checker's score, unless the task says its near-miss credit pays for what is not
        near."""
        return score

    def train_levels(self, levels: list[int] | None, where: str) -> list[int] | None:
        """The levels a training draw uses: the recipe's `levels` checked against the task's own, or where the
        recipe sets none the task's `default_levels`; a task without levels refuses levels that were set
        (PITFALLS 19)."""
        if self.levels is None:
            if levels is not None:
                raise UserError(f"{where}={levels} does nothing here: task {self.name} has no difficulty levels; remove it")
            return None
        if levels is None:
            return list(self.default_levels) if self.default_levels else None
        return self.level_list(levels, where)

    def level_list(self, levels: list[int] | None, where: str) -> list[int] | None:
        """`levels` checked against the task's own (None where the task has none: the setting does not apply)."""
        if self.levels is None or levels is None:
            return None
        bad = [x for x in levels if x not in self.levels]
        if bad:
            raise UserError(f"{where}: task {self.name} has difficulty levels {min(self.levels)}-{max(self.levels)}, "
                            f"got {bad}")
        return list(levels)

    def make(self, pid: str, question: str, reference: Any, *, kind: str = "math", choices=None, **meta) -> Problem:
        """A problem of this task (meta: the checker's entry, `solution`, `difficulty`, ...)."""
        ref = "" if reference is None or (isinstance(reference, float) and math.isnan(reference)) else str(reference)
        return Problem(pid, question, ref, kind, tuple(choices) if choices else None, meta, self)


_errors = {"count": 0, "told": set()}
_lock = threading.Lock()


def check_errors() -> int:
    """How many answers this process scored 0 because their task's checker raised or returned no score."""
    return _errors["count"]


def checked(problem: Problem, answer: str | None) -> float:
    task = problem.task
    try:
        score = task.check(problem, answer) if task is not None else Task.check(Task(), problem, answer)
        score = float(score)
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score {score!r} outside [0, 1]")
        return score
    except UserError:
        raise
    except Exception as e:  # a scorer that raises on an odd answer: wrong, counted, said once per task
        name = problem.task_name
        with _lock:
            _errors["count"] += 1
            first = name not in _errors["told"]
            _errors["told"].add(name)
        if first:
            warnings.warn(f"task {name}: its checker failed on answer {str(answer)[:60]!r} of {problem.id} "
                          f"({type(e).__name__}: {str(e)[:120]}); such answers score 0 and are counted as "
                          "check_errors", stacklevel=2)
        return 0.0


def shares(n: int, k: int) -> list[int]:
    """n split into k near-equal shares, the first ones one more where k does not divide n."""
    return [n // k + (i < n % k) for i in range(k)]
