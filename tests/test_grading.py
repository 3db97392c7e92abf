import json
import threading
import time

import pytest
from grade_cases import CASES, CHOICES

from thinkforge import grading
from thinkforge.grading import as_number, grade, gsm8k_reference, math_equal, mcq_equal


@pytest.fixture(scope="module", autouse=True)
def warm():
    grading.warm_up()  # start-up of the math-verify worker is not a per-item cost


def test_at_least_fifty_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("completion,reference,kind,expected,why", CASES, ids=[c[4] for c in CASES])
def test_grade_case_within_budget(completion, reference, kind, expected, why):
    """Each case is graded right within math-verify's default budget (CPU seconds: the same on a loaded machine)."""
    before = grading._verifier.timeouts
    got = grade(completion, reference, kind, CHOICES if kind == "mcq" else None)
    assert got is expected, why
    assert grading._verifier.timeouts == before, f"{why}: over the budget"


def test_grade_cli_on_all_cases(tmp_path, capsys):
    from conftest import run_cli

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"completion": c, "reference": r, "kind": k, "choices": CHOICES, "expected": e}) + "\n"
                           for c, r, k, e, _ in CASES))
    code, stdout, _ = run_cli(["grade", str(src), "--out", str(out)], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [r["expected"] for r in rows]
    assert f"({sum(e for *_, e, _ in CASES)}/{len(CASES)})" in stdout


def test_numbers():
    assert as_number("$1,234.50") == as_number("1234.5")
    assert as_number("-\\$3") == -3
    assert as_number("12 or 13") is None
    assert gsm8k_reference("He has 3 + 4 = 7.\n#### 1,007") == "1007"


def test_verifier_timeout_kills_and_recovers(monkeypatch):
    # Force an expression past the prefilters and give it no time: the worker is killed, then restarted. A fresh
    # worker and a heavy expression: a warm one once answered a small item before the zero-second wait ended.
    verifier = grading._Verifier()
    monkeypatch.setattr(grading, "_verifier", verifier)
    assert verifier("(x+1)^{40}", "(x+1)^{41}/(x+1)", timeout=0.0) is False
    assert verifier.timeouts == 1
    assert math_equal("(x+1)^2", "x^2+2x+1", timeout=30.0)  # recovered (a generous budget: the restarted worker is cold)


def test_the_budget_is_cpu_time_so_a_loaded_machine_grades_the_same(monkeypatch):
    """The worker is stopped (SIGSTOP: no CPU at all, as on a machine busy elsewhere) for 2.5 s of a 1 s budget:
    the item still gets its second of work and is graded right. A wall-clock budget graded it wrong."""
    import os
    import signal

    verifier = grading._Verifier()
    monkeypatch.setattr(grading, "_verifier", verifier)
    verifier.warm()
    os.kill(verifier._proc.pid, signal.SIGSTOP)
    resume = threading.Timer(2.5, os.kill, (verifier._proc.pid, signal.SIGCONT))
    resume.start()
    start = time.monotonic()
    try:
        assert math_equal("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", timeout=1.0)
    finally:
        resume.join()
    assert time.monotonic() - start >= 2.5 and verifier.timeouts == 0


def test_grading_works_off_the_main_thread():
    results = []

    def work():
        results.append(math_equal("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"))
        results.append(math_equal("1/2", "0.5"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8


def test_grading_works_in_a_daemon_worker_process():
    import multiprocessing as mp

    with mp.get_context("fork").Pool(1) as pool:  # pool workers are daemonic: no children via multiprocessing
        assert pool.apply(math_equal, ("(x+1)^2", "x^2+2x+1")) is True


def test_mcq_rejects_several_options():
    assert not mcq_equal("A and B", "A")
    assert mcq_equal("A", "A")
    assert not mcq_equal(None, "A")


def test_prose_against_a_number_is_wrong_without_the_verifier_and_an_expression_goes_to_it(monkeypatch):
    """A digit-free expression can equal a number (cos(pi) = -1): only prose skips the verifier."""
    assert math_equal("\\frac{x}{y}", "7") is False  # decided by the verifier
    assert math_equal("\\cos(\\pi)", "-1") is True

    def forbidden(*a, **k):
        raise AssertionError("the verifier was called")

    monkeypatch.setattr(grading, "_verifier", forbidden)
    assert math_equal("the apples", "7") is False
    assert math_equal("not enough information", "7") is False
    assert math_equal("7", "7") is True
