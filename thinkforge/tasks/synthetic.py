"""The built-in task, `synthetic`: templated word problems in GSM8K's style, with whole-number answers, levels
1-4, a worked solution per problem (`generate`, and a teacher with slips for tests: `teacher_completion`).

A problem starts with a person holding some objects and applies 1-4 operations among + - x / (buying,
giving away, filling boxes, sharing equally). Difficulty sets the number of operations and the size of the
numbers. Generation is seeded. The test split is disjoint from training *by construction*: a problem's
arithmetic (start value and operations, names ignored) hashes to one split only, so no test problem's
arithmetic is ever seen in training under any name.

Rows follow GSM8K's schema: `question`, and `answer` = worked solution ending in `#### N`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from thinkforge.errors import UserError
from thinkforge.tasks.base import Problem, Task, shares

NAMES = ["Mia", "Leo", "Ava", "Noah", "Ivy", "Omar", "Zoe", "Ravi", "Lena", "Tom", "Nina", "Sam", "Yuki", "Ben", "Ana", "Kai"]
OBJECTS = ["apples", "stickers", "marbles", "books", "pencils", "cookies", "shells", "coins", "cards", "eggs"]
TEST_SHARE = 5  # one key in five (hash % 5 == 0) belongs to the test split
# difficulty -> (operations, largest operand)
LEVELS = {1: (1, 10), 2: (2, 20), 3: (3, 50), 4: (4, 100)}


@dataclass(frozen=True)
class Op:
    kind: str  # add | sub | mul | div
    value: int


def _key(start: int, ops: tuple[Op, ...]) -> int:
    text = f"{start}|" + "|".join(f"{o.kind}{o.value}" for o in ops)
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def is_test(start: int, ops: tuple[Op, ...]) -> bool:
    return _key(start, ops) % TEST_SHARE == 0


def _ops(rng: random.Random, n_ops: int, top: int) -> tuple[int, tuple[Op, ...]] | None:
    start = rng.randint(2, top)
    value, ops = start, []
    for _ in range(n_ops):
        kind = rng.choice(["add", "sub", "mul", "div"])
        if kind == "add":
            x = rng.randint(1, top)
            value += x
        elif kind == "sub":
            if value < 2:
                return None
            x = rng.randint(1, min(value - 1, top))
            value -= x
        elif kind == "mul":
            x = rng.randint(2, min(9, max(2, top // 5)))
            if value * x > 10 * top:
                return None
            value *= x
        else:
            divisors = [d for d in range(2, min(value, 12) + 1) if value % d == 0 and value // d >= 1]
            if not divisors:
                return None
            x = rng.choice(divisors)
            value //= x
        ops.append(Op(kind, x))
    return start, tuple(ops)


def _render(name: str, obj: str, start: int, ops: tuple[Op, ...]) -> tuple[str, list[str], int]:
    """Question text, the solution's steps, and the answer."""
    sentences = [f"{name} has {start} {obj}."]
    steps = [f"{name} starts with {start} {obj}."]
    value = start
    for op in ops:
        if op.kind == "add":
            sentences.append(f"Then {name} gets {op.value} more {obj}.")
            new = value + op.value
            steps.append(f"After getting {op.value} more: {value} + {op.value} = {new}.")
        elif op.kind == "sub":
            sentences.append(f"Then {name} gives away {op.value} {obj}.")
            new = value - op.value
            steps.append(f"After giving away {op.value}: {value} - {op.value} = {new}.")
        elif op.kind == "mul":
            sentences.append(f"Then the number of {obj} becomes {op.value} times as many.")
            new = value * op.value
            steps.append(f"{op.value} times as many: {value} * {op.value} = {new}.")
        else:
            sentences.append(f"Then {name} shares them equally among {op.value} friends and keeps one share.")
            new = value // op.value
            steps.append(f"One share of {op.value}: {value} / {op.value} = {new}.")
        value = new
    sentences.append(f"How many {obj} does {name} have now?")
    return " ".join(sentences), steps, value


def generate(n: int, split: str = "train", difficulty: int = 1, seed: int = 0, stream: str = "") -> list[dict]:
    """`n` distinct problems of one split, GSM8K schema plus `id`, `difficulty`, `final`. Test problems
    differ in their arithmetic, not only in names: a test of n problems is n independent cases (difficulty 1
    has 28 of them, difficulty 2 about 5,100), so its accuracy and paired intervals mean what they say.
    Training problems differ in their text (names and objects vary the same arithmetic). A named `stream` is
    an independent draw from the same split (ids carry its name): the RL prompts and the policy's own DPO
    rollouts use their own streams, so they are problems the distillation did not draw."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    n_ops, top = LEVELS[difficulty]
    rng = random.Random(f"{seed}-{split}-{difficulty}" + (f"-{stream}" if stream else ""))
    prefix = f"synthetic-s{seed}-{split}" + (f"-{stream}" if stream else "")  # the seed: ids name one draw
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 10000:
            hint = " (test problems differ in their arithmetic: difficulty 1 has 28)" if split == "test" else ""
            raise ValueError(f"could not make {n} distinct {split} problems at difficulty {difficulty}{hint}; "
                             "ask for fewer or a higher difficulty")
        made = _ops(rng, n_ops, top)
        if made is None:
            continue
        start, ops = made
        if is_test(start, ops) != (split == "test"):
            continue
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        question, steps, value = _render(name, obj, start, ops)
        key = (start, ops) if split == "test" else question
        if key in seen:
            continue
        seen.add(key)
        steps.append(f"So {name} has {value} {obj}.")
        rows.append({
            "id": f"{prefix}-d{difficulty}-{len(rows)}",
            "question": question,
            "answer": "\n".join(steps) + f"\n#### {value}",
            "final": str(value),
            "difficulty": difficulty,
        })
    return rows


def worked_solution(row: dict) -> tuple[str, str]:
    """(thinking, answer) of the reference solution, for SFT targets and the programmatic teacher."""
    body, _, final = row["answer"].rpartition("####")
    return body.strip(), final.strip()


# ---------------------------------------------------------------- the programmatic teacher

OPENERS = ["Let me work through this step by step.", "Step by step:", "I will follow the changes in order.", ""]
SLIPS = ("arithmetic", "answer", "truncated")


_STEP = re.compile(r"^(.*: )(-?\d+) ([-+*/]) (\d+) = (-?\d+)\.$")


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def teacher_completion(row: dict, rng: random.Random, slip_rate: float = 0.0) -> tuple[str, str | None]:
    """A chain of thought in <think>/<answer> form for a synthetic row, and the slip it contains (or None).

    Slips, so that verification has something to reject: "arithmetic" (one step's result off by a little,
    carried through to a wrong answer), "answer" (right steps, wrong final answer), "truncated" (cut off
    inside <think>). Correct rollouts vary in wording, and some end with a self-check.
    """
    from thinkforge.formats import format_completion

    thinking, answer = worked_solution(row)
    lines = thinking.splitlines()
    slip = rng.choice(SLIPS) if rng.random() < slip_rate else None
    if slip == "arithmetic":
        steps = [i for i, line in enumerate(lines) if _STEP.match(line)]
        k = rng.choice(steps)
        value = None
        for i in steps[steps.index(k):]:
            head, a, op, b, c = _STEP.match(lines[i]).groups()
            a = int(a) if value is None else value  # later steps carry the mistake forward
            value = _apply(a, op, int(b)) + (rng.choice([-3, -2, -1, 1, 2, 3]) if i == k else 0)
            lines[i] = f"{head}{a} {op} {b} = {value}."
        answer = str(value)
        lines[-1] = re.sub(r"-?\d+(?=\D*$)", answer, lines[-1])
    elif slip == "answer":
        answer = str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    opener = rng.choice(OPENERS)
    if opener:
        lines.insert(0, opener)
    if slip is None and rng.random() < 0.3:
        lines.append(f"Let me check: the last step gives {answer}. Yes.")
    if slip == "truncated":
        return "<think>\n" + "\n".join(lines[: max(1, len(lines) // 2)]), slip
    return format_completion("\n".join(lines), answer), slip


class Synthetic(Task):
    family = "synthetic"
    accepts = frozenset({"level"})
    procedural = True
    levels = (1, 2, 3, 4)
    default_levels = (1, 2)  # trained on 1 and 2 (the facts of 1 recur in 2's steps), evaluated at its option `level`

    def problems(self, split: str, n: int | None, seed: int, levels: list[int] | None = None,
                 stream: str = "") -> list[Problem]:
        levels = levels or [int(self.options.get("level", 2))]
        n = 200 if n is None else n
        out = []
        for level, share in zip(levels, shares(n, len(levels)), strict=True):
            if not share:
                continue
            try:
                rows = generate(share, split, level, seed, stream)
            except ValueError as e:
                raise UserError(f"task synthetic ({split}, level {level}, {share} problems): {e}") from None
            out += [self.make(r["id"], r["question"], r["final"], solution=r["answer"], difficulty=r["difficulty"])
                    for r in rows]
        return out
