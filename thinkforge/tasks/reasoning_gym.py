"""reasoning-gym's procedural tasks (PyPI `reasoning-gym`, imported only when a task is named): any of its ~100
datasets by name, `reasoning_gym:<task>`, with its config (`tasks.options`), its curriculum's levels as the
difficulty levels, and its own scorer as the checker.

Its traps, each handled here:
- Seeds overlap (item i+1 of seed s is item i of seed s+1): the splits are made by content instead, an item is a
  test item when the hash of its question says so, so no seed of a training draw can reach an evaluation item.
  Small arithmetic spaces hold twins ("5 * 8" and "8 * 5"; "Calculate 3 + 6." in basic_arithmetic and "6 + 3 ="
  in chain_sum): the hash is of the arithmetic asked for (`expression_key`), so twins fall on the same side in
  every task.
- Its scorers read whatever they get (gsm_symbolic takes the first number, others give partial credit for a
  near miss): they see only the extracted answer, and only a score of 1.0 is correct.
- Scorers raise on odd answers (prime_factorization on "2 * 3"): scored 0, counted and logged (Problem.score).
- Labels known to be unreliable are named in `notes`; every evaluation prints the constant-answer baseline.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from typing import Any

from thinkforge.errors import UserError
from thinkforge.tasks.base import Problem, Task, shares

TEST_SHARE = 5  # one question in five (by its hash) is an evaluation item
CHECK_BUDGET = 2.0  # CPU seconds a scorer may spend on one answer
MAX_ANSWER_CHARS = 2000  # longer answers score 0 without a scorer
ATTEMPTS_PER_ITEM = 20  # draws per wanted item before a split is called exhausted (small tasks, few distinct items)
# Tasks whose answers are decimal quantities, and whose scorers' near-miss credit is a substring rule (0.5 for "11"
# against 1, or for "-5" against 5; gsm_symbolic 0.01 for any number): in a reward they earn the Infused card's
# partial credit instead, a number within 10% (PITFALLS 20). Other tasks keep their scorer's own.
# Tasks whose question is an expression to evaluate: their twins ("5 * 8" and "8 * 5", chain_sum's "6 + 3 =" and
# basic_arithmetic's "Calculate 3 + 6.") share a key (`expression_key`). Other tasks' questions may hold an expression
# that is not the problem (prime_factorization's example "2 × 2 × 3" in every question): their text names them.
EXPRESSIONS = frozenset({"chain_sum", "products", "basic_arithmetic", "decimal_arithmetic"})
QUANTITIES = frozenset({"chain_sum", "products", "basic_arithmetic", "decimal_arithmetic", "leg_counting", "gcd", "lcm",
                        "gsm_symbolic", "count_bits"})
UNRELIABLE = {
    "propositional_logic": "its scorer accepts any conclusion the premises entail, so a trivially true answer "
                           "(a premise restated) scores 1.0: accuracy overstates reasoning",
    "syllogism": "about 70% of its labels are 'Yes' and some labels are invalid: compare accuracy with the "
                 "constant-answer baseline printed beside it",
}


def _gym():
    try:
        import reasoning_gym
        from reasoning_gym.factory import CURRICULA, DATASETS
    except ImportError:
        raise UserError("reasoning-gym is not installed: pip install 'thinkforge[gym]' (reasoning-gym>=0.1.25)") from None
    return reasoning_gym, DATASETS, CURRICULA


def expression_key(question: str) -> str | None:
    """The arithmetic a question asks for, in a form that commuted twins share: the expression's signed terms
    sorted where it is a chain of + and - ("8 - 3 + 5" and "5 + 8 - 3" alike), its factors sorted where it is a
    product, else the expression with spaces removed; None where the question holds no expression (two numbers
    or more joined by an operator). The same key in any task's wording: "Calculate 3 + 6." and "...: 6 + 3 =".
    """
    import re

    found = [m.group().strip() for m in re.finditer(r"[-+*/×÷()\d\s.]+", question)]
    found = [f for f in found if re.search(r"\d\s*[-+*/×÷]\s*[-(\d]", f)]
    if not found:
        return None
    expr = re.sub(r"\s+", "", max(found, key=len)).replace("×", "*").replace("÷", "/").strip(".")
    if re.fullmatch(r"-?[\d.]+([-+][\d.]+)+", expr):
        return "sum:" + ",".join(sorted(re.findall(r"[-+]?[\d.]+", expr if expr[0] == "-" else "+" + expr)))
    if re.fullmatch(r"-?[\d.]+(\*-?[\d.]+)+", expr):
        return "product:" + ",".join(sorted(expr.split("*")))
    return "expr:" + expr


def is_test(question: str, key: str | None = None) -> bool:
    """Whether a question is an evaluation item: by the hash of its twin key where it has one (an expression to
    evaluate: commuted twins and the same sum in another task's wording fall on the same side), else of its text."""
    key = key or question
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % TEST_SHARE == 0


class ReasoningGym(Task):
    family = "reasoning_gym"
    procedural = True
    takes_argument = True
    accepts = None  # its dataset's config and `level`, checked against the dataset's own fields

    def __init__(self, argument: str | None = None, options: dict[str, Any] | None = None, **kw):
        super().__init__(argument, options, **kw)
        _, datasets, curricula = _gym()
        if argument not in datasets or argument == "composite":
            close = difflib.get_close_matches(argument, list(datasets), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"reasoning-gym has no task {argument!r}; {hint}(weighted mixes: tasks.mixes in the config)")
        self._config_cls = datasets[argument][1]
        self._curriculum = curricula.get(argument)
        fields = set(self._config_cls.__dataclass_fields__) - {"seed", "size"}
        self.config = {k: v for k, v in self.options.items() if k != "level"}
        if bad := sorted(set(self.config) - fields):
            raise UserError(f"task {self.name}: unknown option(s) {', '.join(bad)}; its config has "
                            f"{', '.join(sorted(fields))} (and level)")
        if self._curriculum is not None:
            depth = max(len(a.levels) for a in self._curriculum().attributes.values())
            self.levels = tuple(range(1, depth + 1))
        self.level = self.options.get("level")
        if self.level is not None and self.levels is None:
            raise UserError(f"tasks.options[{self.name!r}].level: {argument} has no curriculum, so no levels; remove it")
        self.level_list([self.level] if self.level is not None else None, f"tasks.options[{self.name!r}].level")
        self._curriculum_fields = set()
        for a in (self._curriculum().attributes.values() if self._curriculum else []):
            self._curriculum_fields |= {getattr(a, k) for k in ("field_name", "lower_field_name", "upper_field_name")
                                        if getattr(a, k, None)}
        self.notes = UNRELIABLE.get(argument, "")
        self._datasets: dict = {}

    def __getstate__(self) -> dict:  # a problem travels between ranks with its task: without the datasets it made
        return {**self.__dict__, "_datasets": {}}

    def train_levels(self, levels: list[int] | None, where: str) -> list[int] | None:
        """Levels unset in the recipe: its own configuration, the one it is evaluated at (its options, at
        their `level`). Levels set: its curriculum's, which then set the fields it controls; an option naming one
        of those fields is an error (it would be overwritten)."""
        if levels is None:
            return None
        levels = super().train_levels(levels, where)
        if clash := sorted(self._curriculum_fields & set(self.config)):
            raise UserError(f"{where}={levels}: at a level, {self.name}'s curriculum sets {', '.join(clash)}, which "
                            f"tasks.options also sets; keep one (the option, with {where} unset; or the levels)")
        return levels

    def _dataset(self, level: int | None, seed: int = 0, size: int = 1):
        """The dataset at `level` (its curriculum at that global level, the options for the rest)."""
        gym, _, _ = _gym()
        base = {**self.config, "seed": seed, "size": size}
        try:
            if level is not None:  # the curriculum's fields at that level over the options (its config validates)
                curriculum = self._curriculum()
                curriculum.set_global_level(level - 1)
                config = curriculum.generate_configuration(base)
                base = {k: getattr(config, k) for k in config.__dataclass_fields__}
            return gym.create_dataset(self.argument, **base)
        except (ValueError, AssertionError, TypeError) as e:
            raise UserError(f"task {self.name} (level {level}): reasoning-gym refuses the config: {e}") from None

    def problems(self, split: str, n: int | None, seed: int, levels: list[int] | None = None,
                 stream: str = "") -> list[Problem]:
        levels = self.level_list(levels, f"task {self.name}") or [self.level]
        n = 200 if n is None else n
        out: list[Problem] = []
        for level, share in zip(levels, shares(n, len(levels)), strict=True):
            if share:
                seen = {p.question for p in out}  # a level's ranges include the easier ones': no question twice
                out += [p for p in self._draw(split, share, seed, level, stream) if p.question not in seen]
        return out

    def twin_key(self, question: str) -> str | None:
        return expression_key(question) if self.argument in EXPRESSIONS else None

    def _draw(self, split: str, n: int, seed: int, level: int | None, stream: str) -> list[Problem]:
        tag = f"{seed}-{split}-{level}-{stream}"
        gym_seed = int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)
        cap = ATTEMPTS_PER_ITEM * n + 200
        ds = self._dataset(level, gym_seed, cap)
        self._datasets.setdefault(level, ds)
        prefix = f"rg-{self.argument}-{split}" + (f"-L{level}" if level else "")
        out, seen = [], set()
        for i in range(cap):
            item = ds[i]
            q = str(item["question"])
            if is_test(q, self.twin_key(q)) != (split == "test") or q in seen:
                continue
            seen.add(q)
            meta = item.get("metadata") or {}
            solution = meta.get("answer_cot")  # a worked solution (its `solution` fields are often the bare answer)
            extra = {"solution": solution} if isinstance(solution, str) and solution.strip() else {}
            key = hashlib.sha256(q.encode()).hexdigest()[:12]  # the id names the content: resumes and pairs match
            out.append(self.make(f"{prefix}-{key}", q, item.get("answer"), kind="exact", entry=item, difficulty=level, **extra))
            if len(out) == n:
                return out
        if not out:
            raise UserError(f"task {self.name}: no {split} problem at level {level} in {cap} draws")
        warnings.warn(f"task {self.name}: only {len(out)} distinct {split} problems at level {level} in {cap} draws, "
                      f"{n} asked; drawing those (a higher level has more)", stacklevel=2)
        return out

    def reward_credit(self, problem: Problem, answer: str | None, score: float) -> float:
        """The card's partial credit for the arithmetic tasks (QUANTITIES), the scorer's own for the rest."""
        from thinkforge.grading import partial_credit

        return partial_credit(answer, problem.reference) if self.argument in QUANTITIES else score

    def check(self, problem: Problem, answer: str | None) -> float:
        """Its scorer, in the scorer worker under a budget of CHECK_BUDGET CPU seconds (an answer over it scores
        0 and is counted as a check error); a scorer that raises is a check error too."""
        import base64
        import pickle

        if answer is None:
            return 0.0
        if len(answer) > MAX_ANSWER_CHARS:  # an essay is not an answer (and the cheapest way to stall a scorer)
            return 0.0
        request = (self.family, self.argument, self.options, problem.meta.get("difficulty"), problem.meta["entry"],
                   answer, CHECK_BUDGET)
        line = _worker().ask(base64.b64encode(pickle.dumps(request)).decode(), CHECK_BUDGET)
        if line is None:
            raise TimeoutError(f"its scorer ran over {CHECK_BUDGET} CPU seconds")
        status, value = json.loads(line)
        if status != "ok":
            raise RuntimeError(value)
        return float(value)

    def score_here(self, level: int | None, entry: dict, answer: str) -> float:
        """The scorer in this process (the worker's side of `check`)."""
        ds = self._datasets.get(level) or self._datasets.setdefault(level, self._dataset(level))
        return float(ds.score_answer(answer, entry))


_scorer = None


def _worker():
    global _scorer
    if _scorer is None:
        from thinkforge.grading import Worker

        _scorer = Worker("thinkforge._score_worker", "reasoning-gym scorer")
    return _scorer
