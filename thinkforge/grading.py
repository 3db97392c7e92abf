"""Is an answer right? One grader for training rewards and evaluation alike (PITFALLS 9).

- Math: plain numbers (commas, units, currency, percent, fractions, decimals) are compared exactly as
  rationals in-process; anything else (LaTeX expressions, intervals, sets, tuples) goes to math-verify in a
  separate worker process with a per-item budget of CPU seconds (the same grade on a loaded machine), so
  grading never hangs and needs no signals (it works off the main thread and inside worker processes).
- Multiple choice: exactly one option letter must be named; a response naming several is wrong.
- Only the answer part is graded, never text inside <think> (formats.parse decides what the answer is).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

from thinkforge.formats import parse

MAX_ANSWER_CHARS = 400  # longer "answers" are not answers; they are also the cheapest way to stall sympy
MAX_NESTING = 40


def gsm8k_reference(solution: str) -> str:
    """GSM8K's answer field ends in `#### N`: return N without thousands commas."""
    pos = solution.rfind("####")
    tail = solution[pos + 4 :] if pos >= 0 else solution
    return tail.strip().replace(",", "")


# ---------------------------------------------------------------- numbers

_LATEX_NOISE = re.compile(r"\\[,!;: ]|\\left|\\right|\\displaystyle|\{,\}")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_PLAIN = re.compile(rf"^({_NUM})$")
_SLASH = re.compile(rf"^({_NUM})\s*/\s*({_NUM})$")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")
_CURRENCY = "$€£¥₹"
_UNIT_WORDS = re.compile(r"^[A-Za-z][A-Za-z .'/-]*$")  # "dollars", "cm", "apples per box", "sq. ft"
_LEAD = re.compile(r"^(?:[a-zA-Z]\s*=|(?:the )?answer(?: is)?:?|approximately|about|≈|=)\s*", re.IGNORECASE)


def _strip(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = _TEXT_WRAP.sub(r"\1", s)
    s = _LATEX_NOISE.sub("", s)
    s = s.replace("\\$", "$").replace("\\%", "%").replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = _LEAD.sub("", s).strip()
    return s.rstrip(".").strip()


def _to_fraction(token: str) -> Fraction | None:
    token = token.replace(",", "")
    if token in ("", "-", ".", "-."):
        return None
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def as_number(text: str) -> Fraction | None:
    """A single number written in any of the usual ways, else None.

    >>> as_number("$1,234.50") == Fraction("1234.5")
    True
    >>> as_number("\\\\frac{3}{4}") == Fraction(3, 4)
    True
    >>> as_number("12 apples")
    Fraction(12, 1)
    >>> as_number("12 or 13") is None
    True
    """
    s = _strip(text)
    if len(s) > 60:
        return None
    s = s.lstrip(_CURRENCY).strip()
    if s.startswith("-") and len(s) > 1 and s[1] in _CURRENCY:
        s = "-" + s[2:].strip()
    s = s.rstrip("%").strip()
    m = _FRAC.match(s) or _FRAC_SHORT.match(s)
    if m:
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    m = _PLAIN.match(s)
    if m:
        return _to_fraction(m.group(1))
    m = _SLASH.match(s)
    if m:
        num, den = _to_fraction(m.group(1)), _to_fraction(m.group(2))
        return num / den if num is not None and den else None
    # A number followed by unit words: "18 dollars", "5 cm", "3 apples per box".
    m = re.match(rf"^({_NUM})\s*(.*)$", s)
    if m and m.group(1) and _UNIT_WORDS.match(m.group(2) or "x"):
        return _to_fraction(m.group(1))
    return None


_ANY_NUMBER = re.compile(r"\d")
# Names a digit-free expression may use and still be a number: \cos(\pi) = -1, \ln e = 1, e^{i\pi}, ...
_MATH_NAMES = {
    "pi", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "ln",
    "log", "exp", "sqrt", "frac", "dfrac", "tfrac", "cdot", "times", "left", "right", "infty", "operatorname",
}


def could_be_a_number(text: str) -> bool:
    """Can this digit-free answer equal a number? Yes for expressions (\\cos(\\pi), \\ln e, e^{i\\pi}: single
    letters and math names only), no for prose ("unknown", "not enough information"), which skips the verifier.

    >>> could_be_a_number("\\cos(\\pi)"), could_be_a_number("e^{i\\pi}"), could_be_a_number("cannot be determined")
    (True, True, False)
    """
    names = re.findall(r"[A-Za-z]+", text)
    return bool(names) and all(len(n) == 1 or n.lower() in _MATH_NAMES for n in names)
_LIST_SEP = re.compile(r",\s|;|\bor\b|\band\b|\n", re.IGNORECASE)


# ---------------------------------------------------------------- math-verify, time-bounded


class Worker:
    """A worker process that answers one line per request line within a budget of its own CPU seconds (it ends
    itself past it, see _verify_worker.py); an item over budget (or a dead worker) is None, counted, and the
    worker restarted. Thread-safe. `module`: the worker's module (`python -m module`)."""

    def __init__(self, module: str = "thinkforge._verify_worker", what: str = "math-verify"):
        self.module, self.what = module, what
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.timeouts = 0
        atexit.register(self._kill)  # no worker outlives its process

    def _start(self) -> None:
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        if self._readline(60.0) != "ready":
            self._kill()
            raise RuntimeError(f"the {self.what} worker did not start; is {self.what} installed?")

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        return line.strip() if line else None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def warm(self) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()

    def ask(self, request: str, timeout: float) -> str | None:
        """The worker's reply line to `request` (one line), or None when it ran over `timeout` CPU seconds (the
        worker ends itself) or over the wall cap of WALL_CAP times that plus start-up slack."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(request + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                self._kill()
                self.timeouts += 1
                return None
            line = self._readline(WALL_CAP * timeout + 10.0)
            if not line:  # its timer ended it (or it died), or no answer within the wall cap
                self.timeouts += 1
                self._kill()
                return None
            return line


class _Verifier(Worker):
    """math-verify in its worker: is `pred` equal to `gold`? An item over its budget is False (and counted)."""

    def __call__(self, gold: str, pred: str, timeout: float) -> bool:
        """`timeout`: the item's budget in the worker's CPU seconds (the worker ends itself past it); the wall
        clock caps a worker that gets no CPU at all at `WALL_CAP` times that, plus start-up slack."""
        line = self.ask(json.dumps([gold, pred, timeout]), timeout)
        if line not in (None, "true", "false"):  # not an answer: a broken worker, counted as over budget
            self.timeouts += 1
            self._kill()
            return False
        return line == "true"


WALL_CAP = 20  # a worker starved of CPU (a stopped or swapped process) still ends within 20x its budget + 10 s


_verifier = _Verifier()

# An item over its budget is graded wrong: a correct answer then scores as a wrong one. Every caller counts them
# (RL metrics per step, evaluation summaries) and warns above this share of the samples it graded.
TIMEOUT_WARN_SHARE = 0.01


def timeouts() -> int:
    """How many math-verify items this process has graded wrong for running over their budget."""
    return _verifier.timeouts


def timeout_warning(count: int, graded: int, where: str) -> str | None:
    """One warning line when more than TIMEOUT_WARN_SHARE of `graded` samples ran over the grading budget."""
    if count <= TIMEOUT_WARN_SHARE * max(1, graded):
        return None
    return (f"{where}: {count} of {graded} answers ran over math-verify's budget and were graded wrong (a correct "
            "answer among them scores as wrong); see grading_timeouts in the metrics")


def warm_up() -> None:
    """Start the math-verify worker now, so the first graded item pays no start-up time."""
    _verifier.warm()


def _nesting(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "({[":
            depth += 1
            best = max(best, depth)
        elif c in ")}]":
            depth -= 1
    return best


_HUGE_POWER = re.compile(r"(\^|\*\*)\s*[{(]?\s*-?\d{4,}|(\^|\*\*)[^$]*(\^|\*\*)[^$]*(\^|\*\*)|!\s*!|\d{7,}\s*!")


def _hostile(s: str) -> bool:
    return len(s) > MAX_ANSWER_CHARS or _nesting(s) > MAX_NESTING or bool(_HUGE_POWER.search(s))


# ---------------------------------------------------------------- public graders


def math_equal(pred: str | None, gold: str, timeout: float = 1.5) -> bool:
    """Is the answer string `pred` mathematically equal to the reference `gold`? `timeout`: math-verify's budget
    for the item in CPU seconds (an item over it is graded wrong and counted in `_verifier.timeouts`).

    >>> math_equal("1,000", "1000"), math_equal("$18.00", "18"), math_equal("0.5", "\\\\frac{1}{2}")
    (True, True, True)
    >>> math_equal("42 or 43", "42")
    False
    """
    if pred is None or not gold.strip():
        return False
    pred, gold = pred.strip(), gold.strip()
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    g = as_number(gold)
    if g is not None:
        p = as_number(pred)
        if p is not None:
            return p == g
        # Hedging ("12 or 13", "3, 4, 5", "x = 3 or x = 5") against a single-number reference is wrong: checked
        # before the "=" rule, which would otherwise take the last candidate. A candidate is a piece that is a
        # number or ends "= number" ("y = 2x + 1, so y = 7" offers one).
        parts = [x for x in _LIST_SEP.split(pred) if _ANY_NUMBER.search(x)]
        candidates = [x for x in parts if as_number(x) is not None or ("=" in x and as_number(x.rsplit("=", 1)[1]) is not None)]
        if len(candidates) > 1:
            return False
        if "=" in pred and (p := as_number(pred.rsplit("=", 1)[1])) is not None:
            return p == g
        if not parts and not could_be_a_number(pred):  # prose: skip the verifier (most of a young policy's answers)
            return False
    if _strip(pred) == _strip(gold):
        return True
    if _hostile(pred) or _hostile(gold):
        return False
    return _verifier(gold, pred, timeout)


_OPTION = re.compile(r"(?<![A-Za-z0-9])\(?([A-J])\)?(?![A-Za-z0-9])")
# A lower-case letter is an option only where it cannot be a word ("a" is an article): in parentheses, or
# ending the answer alone or after option / choice / answer ("the answer is a blue sphere" is option text).
_OPTION_LOWER = re.compile(r"\(([a-j])\)|(?:^|\b(?:option|choice|answer)(?:\s+is)?\s*:?)\s*\(?([a-j])\)?\s*[.:)]?\s*$",
                           re.IGNORECASE)
# The letter the answer leads with, marked as an option ("(B) 4.2 J", "B: 5 F", "B. vitamin C"), or an
# explicitly named one ("the answer is B", "option (C)"): the text after it is the option's own text, whose
# units and names (J, C, F, H, G in GPQA's options) are not options.
_LEADING = re.compile(r"^\s*(?:\(([A-Ja-j])\)|([A-J])\s*[.:)])")
_NAMED = re.compile(r"\b(?i:answer|option|choice)(?:\s+is)?\s*:?\s*\(?([A-J])\)?(?![A-Za-z0-9])")
# The answer is a letter and nothing else: "C", "(c)", "C."
_ALONE = re.compile(r"\s*\(?([A-Ja-j])\)?\s*\.?\s*")
# After a leading letter: another option offered as an alternative ("(B) or (C)", "B, C").
_ALTERNATIVE = re.compile(r"\s*(?:or|and|/|,)\s*\(?[A-Ja-j]\)?(?![A-Za-z0-9])")
# Another option marked as one: "(C)", "C)"
_MARKED = re.compile(r"(?<![A-Za-z0-9])(?:\([A-Ja-j]\)|[A-J]\))")
# Two options offered as alternatives anywhere ("B or C", "(B)/(C)", "A and B", "B, C"): a hedge, never right.
_HEDGE = re.compile(r"(?:(?<![A-Za-z0-9])\(?[A-J]\)?|\([a-j]\))\s*(?:or|and|/|,)\s*(?:\(?[A-J]\)?(?![A-Za-z0-9])|\([a-j]\))")
# A capital that reads as a word before a lower-case word: the article "A ...", the pronoun "I ...".
_WORD_CAPITAL = re.compile(r"(?<![A-Za-z0-9])([AI])\s+[a-z]")


def mcq_equal(pred: str | None, gold: str, choices: list[str] | None = None) -> bool:
    """Multiple choice: the answer names exactly one option, and it is the right one. In order: an option's
    own text; a leading letter marked as an option, or the answer alone, unless what follows offers or names
    another option; a named letter ("the answer is C"); otherwise several standalone letters are a hedge.

    >>> mcq_equal("(B)", "B"), mcq_equal("B or C", "B"), mcq_equal("The answer is C", "C"), mcq_equal("(b)", "B")
    (True, False, True, True)
    >>> mcq_equal("(B) 4.2 J", "B"), mcq_equal("B. vitamin C", "B"), mcq_equal("I think B", "B")
    (True, True, True)
    >>> mcq_equal("C", "C", ["N", "C", "O", "H"]), mcq_equal("H", "D", ["N", "C", "O", "H"]), mcq_equal("(B) or (C)", "B")
    (True, True, False)
    >>> mcq_equal("(A) is wrong; the answer is (C)", "C"), mcq_equal("C. elegans", "B", ["E. coli", "C. elegans"])
    (True, True)
    """
    if pred is None:
        return False
    pred = _TEXT_WRAP.sub(r"\1", pred.strip())[:MAX_ANSWER_CHARS]
    texts = [" ".join(c.lower().split()).rstrip(".") for c in choices or []]
    norm = " ".join(pred.lower().split()).rstrip(".")
    alone = _ALONE.fullmatch(pred)
    a_letter = alone is not None and ord(alone.group(1).upper()) - ord("A") < max(len(texts), 1)  # not "H" of 4
    if norm in texts and not a_letter:  # an option's own text ("vitamin C", "C. elegans", "H" of N, C, O, H)
        return texts.index(norm) == ord(gold.strip().upper()) - ord("A")
    lead = _LEADING.match(pred) or _ALONE.fullmatch(pred)
    if lead:  # what follows a marked letter is its option's text, unless it offers or names another option
        rest = pred[lead.end():]
        named = _NAMED.search(rest)
        if named:  # "(A) is wrong; the answer is (C)"
            return named.group(1).upper() == gold.strip().upper()
        if _ALTERNATIVE.match(rest) or _MARKED.search(rest):  # "(B) or (C)", "B) 4 or C) 5"
            return False
        return next(g for g in lead.groups() if g).upper() == gold.strip().upper()
    if _HEDGE.search(pred):
        return False
    named = _NAMED.search(pred)
    if named:
        return named.group(1).upper() == gold.strip().upper()
    words = {m.start(1) for m in _WORD_CAPITAL.finditer(pred)}
    letters = {m.group(1) for m in _OPTION.finditer(pred) if m.start(1) not in words and m.start() not in words}
    if not letters:  # written in lower case: "(b)", "b", "option c"
        letters = {next(g for g in m.groups() if g).upper() for m in _OPTION_LOWER.finditer(pred)}
    if len(letters) == 1:
        return letters.pop() == gold.strip().upper()
    return False


PARTIAL_CREDIT_MAX = 0.5  # a close-but-wrong number never earns more than half of a right one
PARTIAL_CREDIT_RANGE = 0.1  # relative error beyond which partial credit is 0


def partial_credit(answer: str | None, reference: str) -> float:
    """The Infused card's partial credit for a wrong numeric answer: up to 0.5 for a number within 10% of the
    reference, falling linearly to 0 (a right answer is the checker's 1.0, not this).

    >>> partial_credit("98", "100"), partial_credit("50", "100"), partial_credit("x", "100")
    (0.4, 0.0, 0.0)
    """
    gold = as_number(reference)
    pred = as_number(answer) if answer is not None else None
    if gold is None or pred is None:
        return 0.0
    rel = abs(float(pred - gold)) / max(abs(float(gold)), 1.0)
    return round(PARTIAL_CREDIT_MAX * max(0.0, 1.0 - rel / PARTIAL_CREDIT_RANGE), 6)


def grade(completion: str, reference: str, kind: str = "math", choices: list[str] | None = None) -> bool:
    """Grade a whole completion against a reference (kind: math, gsm8k, mcq or exact)."""
    return grade_answer(parse(completion).answer, reference, kind, choices)


def grade_answer(answer: str | None, reference: str, kind: str = "math", choices: list[str] | None = None) -> bool:
    """Grade an answer already parsed out of its completion (`formats.parse(...).answer`)."""
    if kind == "gsm8k":
        return math_equal(answer, gsm8k_reference(reference))
    if kind == "mcq":
        return mcq_equal(answer, reference, choices)
    if kind == "math":
        return math_equal(answer, reference)
    if kind == "exact":  # a task's own answer string (reasoning-gym's): equal once outer spaces are stripped
        return answer is not None and answer.strip() == reference.strip()
    raise ValueError(f"unknown answer kind {kind!r}; use math, gsm8k, mcq or exact")
