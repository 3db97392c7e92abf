"""The math-verify worker: one process, JSON lines in and out, no signals.

The parent (grading._Verifier) kills and restarts it when an item overruns its time budget, so sympy cannot
hang the caller whatever the input.
"""

import json
import sys


def main() -> None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        gold, pred = json.loads(line)
        try:
            # Timeouts off (they use SIGALRM); the parent enforces the budget. verify(gold, pred): order matters.
            g = parse(f"$\\boxed{{{gold}}}$", extraction_config=configs, parsing_timeout=None)
            p = parse(f"$\\boxed{{{pred}}}$", extraction_config=configs, parsing_timeout=None)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
        except Exception:
            ok = False
        sys.stdout.write(json.dumps(ok) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
