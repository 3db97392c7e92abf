"""Tricky grading cases, written by us: (completion, reference, kind, expected, why)."""

T = "<think>I work it out step by step.</think>"


def a(x: str) -> str:
    return f"{T}<answer>{x}</answer>"


CHOICES = ["a red cube", "a blue sphere", "a green cone", "a white torus"]

CASES = [
    # -- equivalent forms: right
    (a("1,234"), "1234", "math", True, "thousands comma"),
    (a("$18.00"), "18", "math", True, "currency and trailing zeros"),
    (a("\\$18"), "18", "math", True, "LaTeX dollar"),
    (a("18 dollars"), "18", "math", True, "unit word"),
    (a("12 apples"), "12", "math", True, "object word"),
    (a("\\text{12 cm}"), "12", "math", True, "text-wrapped unit"),
    (a("0.5"), "\\frac{1}{2}", "math", True, "decimal vs fraction"),
    (a("\\frac{1}{2}"), "0.5", "math", True, "fraction vs decimal"),
    (a("1/2"), "\\dfrac{1}{2}", "math", True, "slash vs dfrac"),
    (a("4/8"), "1/2", "math", True, "unreduced fraction"),
    (a("50\\%"), "50", "math", True, "percent sign"),
    (a("x = 5"), "5", "math", True, "variable assignment"),
    (a("3.0"), "3", "math", True, "trailing .0"),
    (a("  42  "), "42", "math", True, "whitespace"),
    (a("-7"), "-7", "math", True, "negative"),
    (a("\\boxed{7}"), "7", "math", True, "boxed inside the answer tag"),
    (a("The final answer is 9."), "9", "math", True, "sentence inside the answer tag"),
    (a("12 - 3 - 2 = 7"), "7", "math", True, "equation ending in the answer"),
    ("We add them. The final answer is 12.", "12", "math", True, "untagged final-answer sentence"),
    ("Half of 2000 is 1000.\n#### 1,000", "She had 2000.\n#### 1000", "gsm8k", True, "GSM8K hashes"),
    ("so it is \\boxed{\\frac{3}{4}}", "0.75", "math", True, "untagged boxed fraction"),
    (a("(x+1)^2"), "x^2+2x+1", "math", True, "expanded polynomial"),
    (a("\\sqrt{2}/2"), "\\frac{\\sqrt{2}}{2}", "math", True, "radical forms"),
    (a("\\pi/2"), "\\frac{\\pi}{2}", "math", True, "pi forms"),
    (a("[1, 2)"), "[1,2)", "math", True, "interval spacing"),
    (a("\\{3, 1, 2\\}"), "\\{1,2,3\\}", "math", True, "set order"),
    (a("(1, 2)"), "(1,2)", "math", True, "tuple spacing"),
    (a("2^{10}"), "1024", "math", True, "power evaluates"),
    (a("1+" * 60 + "1"), "61", "math", True, "long but honest sum"),
    (a("(B)"), "B", "mcq", True, "parenthesised letter"),
    (a("The answer is C."), "C", "mcq", True, "letter in a sentence"),
    (a("\\boxed{D}"), "D", "mcq", True, "boxed letter"),
    (a("A blue sphere"), "B", "mcq", True, "option text instead of letter"),
    # -- near misses: wrong
    (a("42.01"), "42", "math", False, "close decimal"),
    (a("0.33"), "\\frac{1}{3}", "math", False, "rounded third"),
    (a("(1, 2]"), "[1,2)", "math", False, "interval ends swapped"),
    (a("x^2+2x"), "x^2+2x+1", "math", False, "missing term"),
    (a("-5"), "5", "math", False, "sign"),
    (a("5000"), "500", "math", False, "extra zero"),
    (a("(1, 3)"), "(1,2)", "math", False, "tuple element"),
    (a("B"), "C", "mcq", False, "wrong letter"),
    # -- reward hacks: wrong
    (a("42 or 43"), "42", "math", False, "hedging with 'or'"),
    (a("3, 4, 42"), "42", "math", False, "listing candidates"),
    (a("A, B, C, D"), "B", "mcq", False, "every option"),
    (a("B or C"), "B", "mcq", False, "two options"),
    ("<think>it is \\boxed{42}</think><answer>I am not sure</answer>", "42", "math", False, "answer only in thinking"),
    ("<think>so the result is \\boxed{42} and", "42", "math", False, "cut off inside think"),
    (f"{T}<answer></answer>", "42", "math", False, "empty answer"),
    (f"{T}<answer>41</answer><answer>42</answer>", "42", "math", False, "two answer tags"),
    (a("\\text{correct}"), "42", "math", False, "claims correctness"),
    (a("42"), "B", "mcq", False, "number for a letter"),
    # -- digit-free expressions against a number: the verifier decides, prose does not reach it
    (a("\\cos(\\pi)"), "-1", "math", True, "digit-free cosine equal to a negative number"),
    (a("\\ln(e)"), "1", "math", True, "digit-free logarithm"),
    (a("\\frac{\\pi}{\\pi}"), "1", "math", True, "digit-free fraction"),
    (a("\\sin(\\pi)"), "0", "math", True, "digit-free sine equal to zero"),
    (a("\\pi"), "3", "math", False, "pi is not 3"),
    (a("x"), "5", "math", False, "a bare variable"),
    (a("cannot be determined"), "7", "math", False, "prose for a number"),
    # -- option letters in another case
    (a("(b)"), "B", "mcq", True, "lower-case letter in parentheses"),
    (a("c"), "C", "mcq", True, "lower-case letter alone"),
    (a("option d."), "D", "mcq", True, "lower-case letter after 'option'"),
    (a("B"), "b", "mcq", True, "lower-case reference"),
    (a("a blue sphere"), "B", "mcq", True, "lower-case option text, not option a"),
    (a("(b) or (c)"), "B", "mcq", False, "two lower-case options"),
    (a("the answer is d"), "C", "mcq", False, "wrong lower-case letter"),
    # -- hostile: wrong, fast, no crash
    (a("9^{9^{9^{9}}}"), "1", "math", False, "tower of powers"),
    (a("2^{99999999}"), "1", "math", False, "huge power"),
    (a("10**10**10"), "1", "math", False, "python power tower"),
    (a("99999999999!"), "1", "math", False, "huge factorial"),
    (a("(" * 100_000), "1", "math", False, "100k open brackets"),
    (a("{" * 50_000 + "}" * 50_000), "1", "math", False, "100k nested braces"),
    (a("\\frac{" * 5_000), "1", "math", False, "unclosed fractions"),
    (a("x" * 1_000_000), "1", "math", False, "megabyte answer"),
    ("<think>" * 100_000, "1", "math", False, "100k think tags"),
    ("\\boxed{" * 100_000, "1", "math", False, "100k boxes"),
    (T + "word " * 200_000 + "<answer>42</answer>", "42", "math", True, "megabyte completion, right answer"),
]
