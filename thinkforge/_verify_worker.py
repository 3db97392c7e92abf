"""The math-verify worker: one process, JSON lines in and out, no signals.

Each item comes with its budget in CPU seconds of this process; a watchdog thread ends the process (after a
"timeout" line) once an item has used it, so sympy cannot hang the caller whatever the input. CPU seconds, not
wall seconds: on a loaded machine an item gets its full budget of work, and the grade does not depend on the
load (a wall-clock budget graded correct answers wrong under load). The parent (grading._Verifier) restarts
the worker, and keeps a wall-clock cap for a worker that gets no CPU at all.
"""

import json
import os
import sys
import threading
import time


def _watch(state: dict, lock: threading.Lock) -> None:
    while True:
        time.sleep(0.02)
        with lock:
            if state["deadline"] is not None and time.process_time() > state["deadline"]:
                os.write(1, b"timeout\n")
                os._exit(3)


def main() -> None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    state, lock = {"deadline": None}, threading.Lock()
    threading.Thread(target=_watch, args=(state, lock), daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        gold, pred, budget = json.loads(line)
        with lock:
            state["deadline"] = time.process_time() + budget
        try:
            # Timeouts off (they use SIGALRM); the watchdog enforces the budget. verify(gold, pred): order matters.
            g = parse(f"$\\boxed{{{gold}}}$", extraction_config=configs, parsing_timeout=None)
            p = parse(f"$\\boxed{{{pred}}}$", extraction_config=configs, parsing_timeout=None)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
        except Exception:
            ok = False
        with lock:  # the answer or the watchdog's timeout, never both
            state["deadline"] = None
            sys.stdout.write(json.dumps(ok) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
