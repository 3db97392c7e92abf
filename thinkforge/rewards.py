"""Reward functions: plain `(completion, reference, kind) -> float`, found in the REWARDS dict.

- verifiable: the Phi-4-mini-reasoning RLVR reward, +1 if the task's checker says correct (1.0), -1 otherwise.
- the Infused Phi-2 set, weighted in the recipe (card: correctness 1.0, reasoning 0.7, format 0.3):
  correctness (the task's score: 1 correct, its partial credit otherwise; the built-in checker gives up to 0.5
  for a number within 10%, as the card, and so do reasoning-gym's arithmetic tasks, `Task.reward_credit`), reasoning (thinking present, steps, calculations, a length bonus), format (tags
  present, ordered, balanced, not repeated).
A user reward is any function of that signature, named by import path `package.module:function`. With
rl.truncation=penalize each reward is also called on the empty response "" (a cut-off response earns at most
what saying nothing does), so it must accept one.
Training and evaluation score a completion with the same checker, its problem's task (thinkforge/tasks); the
rewards that grade take that score (`score=`) rather than grading again.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable

from thinkforge.errors import UserError
from thinkforge.formats import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, parse
from thinkforge.grading import grade, gsm8k_reference, partial_credit

RewardFn = Callable[..., float]

LENGTH_BONUS_WORDS = 60  # thinking of this many words earns the full length bonus


def verifiable(completion: str, reference: str, kind: str = "math", score: float | None = None) -> float:
    """+1 for a verified correct final answer, -1 otherwise (SPEC 2, stage 4); partial credit is wrong. `score`:
    the task's score of this completion when the caller has it (training scores each completion once, with its
    problem's own checker), else graded here with the built-in grader.

    >>> verifiable("<think>2+2=4</think><answer>4</answer>", "4"), verifiable("<think>2+2", "4")
    (1.0, -1.0)
    >>> verifiable("<answer>98</answer>", "100", score=0.4)
    -1.0
    """
    if score is None:
        return 1.0 if grade(completion, reference, kind) else -1.0
    return 1.0 if score >= 1.0 else -1.0


def correctness(completion: str, reference: str, kind: str = "math", score: float | None = None) -> float:
    """The task's score: 1 if right, its partial credit otherwise (the built-in checker's: up to 0.5 for a number
    within 10% of the reference; a task's own where it has one, except where a task's near-miss credit pays for
    what is not near: `Task.reward_credit`). `score` as in `verifiable`.

    >>> correctness("<answer>100</answer>", "100"), correctness("<answer>98</answer>", "100")
    (1.0, 0.4)
    """
    if score is not None:
        return float(score)
    if grade(completion, reference, kind):
        return 1.0
    if kind == "mcq":
        return 0.0
    return partial_credit(parse(completion).answer, gsm8k_reference(reference) if kind == "gsm8k" else reference)


_STEP = re.compile(r"^\s*(?:step\s*\d+|\d+[.)]|[-*•]|first|second|then|next|finally|so\b)", re.IGNORECASE | re.MULTILINE)
_CALC = re.compile(r"\d\s*[-+*/×x÷]\s*\d[\d.,]*\s*=\s*-?\d")


def reasoning(completion: str, reference: str = "", kind: str = "math") -> float:
    """Reasoning quality in [0, 1]: thinking present 0.4, steps 0.2, calculations 0.2, length bonus 0.2.

    >>> reasoning("<answer>4</answer>", "4")
    0.0
    >>> reasoning("<think>First, 2 + 2 = 4.\\nThen check.</think><answer>4</answer>", "4") > 0.8
    True
    """
    thinking = parse(completion).thinking
    if not thinking:
        return 0.0
    score = 0.4
    if len(_STEP.findall(thinking)) >= 2 or thinking.count("\n") >= 2:
        score += 0.2
    if _CALC.search(thinking):
        score += 0.2
    score += 0.2 * min(1.0, len(thinking.split()) / LENGTH_BONUS_WORDS)
    return round(score, 6)


def format_reward(completion: str, reference: str = "", kind: str = "math") -> float:
    """Format in [0, 1]: 1 for exactly `<think>..</think><answer>..</answer>`; a quarter per property otherwise.

    >>> format_reward("<think>a</think><answer>b</answer>"), format_reward("b")
    (1.0, 0.0)
    """
    p = parse(completion)
    if p.format_ok:
        return 1.0
    counts = [completion.count(t) for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)]
    score = 0.0
    if counts[0] >= 1 and counts[1] >= 1:
        score += 0.25
    if counts[2] >= 1 and counts[3] >= 1:
        score += 0.25
    if 0 <= completion.find(THINK_CLOSE) < completion.find(ANSWER_OPEN):
        score += 0.25
    if all(c == 1 for c in counts):
        score += 0.25
    return score


REWARDS: dict[str, RewardFn] = {
    "verifiable": verifiable,
    "correctness": correctness,
    "reasoning": reasoning,
    "format": format_reward,
}
# The rewards that take the task's score (`score=`): a completion is scored once, by its problem's own checker,
# and every reward and the logged accuracy share that one score.
TAKES_SCORE = {"verifiable", "correctness"}


def resolve(name: str) -> RewardFn:
    """A reward by name from REWARDS, or a user function by import path `module:function`."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise UserError(f"unknown reward {name!r}; use one of {', '.join(REWARDS)} or an import path module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward {name!r} cannot be imported ({e}); check the module is on PYTHONPATH") from None
    if not callable(fn):
        raise UserError(f"reward {name!r} is not a function")
    return fn


def _accepts_kind(fn: RewardFn) -> bool:
    """User rewards may take (completion, reference) only; ours also take kind."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


class WeightedRewards:
    """Sum of weighted rewards; `score` also returns each function's value for logging."""

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise UserError("rewards.weights is empty; name at least one reward (e.g. verifiable: 1.0)")
        self.weights = dict(weights)
        self.fns = {name: resolve(name) for name in weights}
        self._takes_kind = {name: _accepts_kind(fn) for name, fn in self.fns.items()}

    def score(self, completion: str, reference: str, kind: str = "math", score: float | None = None) -> tuple[float, dict[str, float]]:
        """(weighted sum, each reward's value). `score`: the task's score of this completion, passed to the
        rewards that grade; None lets them grade with the built-in grader."""
        parts = {}
        for name, fn in self.fns.items():
            if name in TAKES_SCORE:
                parts[name] = float(fn(completion, reference, kind, score=score))
                continue
            args = (completion, reference, kind) if self._takes_kind[name] else (completion, reference)
            parts[name] = float(fn(*args))
        return sum(self.weights[n] * v for n, v in parts.items()), parts
