"""The task-scorer worker (reasoning-gym's scorers): one process, one line in and one out per answer.

A request is (family, argument, options, level, entry, answer, budget), pickled and base64-encoded: an entry is
reasoning-gym's own item (tuples, nested dicts), passed between two of our own processes and never written to a
file. The budget is CPU seconds of this process, enforced by the kernel as in _verify_worker.py (ITIMER_PROF ends
the process): a scorer that chews on a hostile answer ("9**9**9**9" for a polynomial scorer) cannot hang training.
The reply is JSON: ["ok", score] or ["error", "what it raised"].
"""

import base64
import json
import pickle
import signal
import sys


def main() -> None:
    from thinkforge.tasks import task_class

    signal.signal(signal.SIGPROF, signal.SIG_DFL)  # the timer's signal ends the process
    tasks: dict = {}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        family, argument, options, level, entry, answer, budget = pickle.loads(base64.b64decode(line))
        key = (family, argument, repr(sorted(options.items())))
        try:
            if key not in tasks:
                tasks[key] = task_class(family)(argument, options)
            signal.setitimer(signal.ITIMER_PROF, max(budget, 1e-6))  # 0 would disarm it
            try:
                out = ["ok", float(tasks[key].score_here(level, entry, answer))]
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
        except Exception as e:  # the scorer raised: the parent scores 0 and counts it
            out = ["error", f"{type(e).__name__}: {str(e)[:200]}"]
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
