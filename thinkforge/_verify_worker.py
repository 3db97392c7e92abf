"""The math-verify worker: one process, JSON lines in and out.

Each item comes with its budget in CPU seconds of this process, enforced by the kernel: a profiling timer
(ITIMER_PROF, every thread's CPU time) whose SIGPROF ends the process, with or without the GIL held by a long C
call, so sympy cannot hang the caller whatever the input. CPU seconds, not wall seconds: on a loaded machine an
item gets its full budget of work, and the grade does not depend on the load (a wall-clock budget graded correct
answers wrong under load). The parent (grading._Verifier) sees the end of the output, counts the item as over
budget and restarts the worker; it keeps a wall-clock cap for a worker that gets no CPU at all.
"""

import json
import signal
import sys


def main() -> None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    signal.signal(signal.SIGPROF, signal.SIG_DFL)  # the timer's signal ends the process
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        gold, pred, budget = json.loads(line)
        signal.setitimer(signal.ITIMER_PROF, max(budget, 1e-6))  # 0 would disarm it
        try:
            # math-verify's own timeouts off (they use SIGALRM); the timer is the budget. verify(gold, pred): order matters.
            g = parse(f"$\\boxed{{{gold}}}$", extraction_config=configs, parsing_timeout=None)
            p = parse(f"$\\boxed{{{pred}}}$", extraction_config=configs, parsing_timeout=None)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
        except Exception:
            ok = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        sys.stdout.write(json.dumps(ok) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
