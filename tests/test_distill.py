import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from thinkforge import tasks
from thinkforge.data import distill, selection
from thinkforge.errors import UserError
from thinkforge.rollout.hf import HFGenerator
from thinkforge.rollout.openai import OpenAIClient, ServerError
from thinkforge.rollout.types import SamplingParams
from thinkforge.serve import Settings, make_server


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_synthetic_teacher_rows_are_graded_and_slips_rejected(tmp_path):
    probs = tasks.load("synthetic").problems("train", 40, 0, [2])
    out = tmp_path / "d.jsonl"
    stats = distill.main(probs, distill.SyntheticTeacher(slip_rate=0.5, seed=0), 4, out, progress=False)
    rows = _rows(out)
    assert len(rows) == 160 and stats["rollouts"] == 160
    assert set(rows[0]) >= {"problem_id", "question", "reference", "completion", "correct", "teacher", "length"}
    assert 0.3 < stats["acceptance"] < 0.85  # about half the rollouts carry a slip
    assert all(r["correct"] == ("<answer>" in r["completion"] and r["completion"].strip().endswith("</answer>")) or
               not r["correct"] for r in rows)
    assert not any(r["correct"] for r in rows if "</think>" not in r["completion"])  # truncated ones


def test_rerun_skips_finished_problems_and_completes_partial_ones(tmp_path):
    probs = tasks.load("synthetic").problems("train", 10, 0, [1])
    teacher = distill.SyntheticTeacher(0.3, 0)
    full = tmp_path / "full.jsonl"
    distill.main(probs, teacher, 3, full, progress=False)
    part = tmp_path / "part.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:7]) + lines[7][:25])  # a kill mid-write: a torn line
    stats = distill.main(probs, teacher, 3, part, progress=False)
    assert stats["skipped_done"] == 2
    assert sorted(part.read_text().splitlines()) == sorted(full.read_text().splitlines())


@pytest.mark.slow
def test_a_killed_distill_resumes(tmp_path):
    out = tmp_path / "d.jsonl"
    cmd = [sys.executable, "-m", "thinkforge", "data", "distill", "--out", str(out), "--problems", "3000", "-n", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # waits only as long as the run needs to get there
    while (not out.exists() or out.stat().st_size < 20_000) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(out.read_text().splitlines())
    assert 0 < n_before < 24_000
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = _rows(out)
    assert len(rows) == 24_000
    counts = {}
    for r in rows:
        counts[r["problem_id"]] = counts.get(r["problem_id"], 0) + 1
    assert set(counts.values()) == {8} and len(counts) == 3000


class FlakyGenerator:
    """Fails the first `failures` calls (the server answers 500), then generates normally."""

    def __init__(self, inner, failures):
        self.inner, self.failures, self.calls = inner, failures, 0
        self.batch_size, self.model, self.interrupt = inner.batch_size, inner.model, None

    def generate(self, prompts, n, params):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("out of memory (simulated)")
        return self.inner.generate(prompts, n, params)

    def stream(self, prompt, params):
        return self.inner.stream(prompt, params)


@pytest.fixture
def flaky_server(tiny_loaded):
    model, tok = tiny_loaded
    gen = FlakyGenerator(HFGenerator(model, tok), failures=1)
    srv = make_server(gen, tok, Settings("tiny-teacher", port=0))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", gen
    srv.shutdown()
    srv.server_close()


def test_openai_teacher_against_thinkforge_serve_retries_a_server_error(flaky_server, tmp_path):
    url, gen = flaky_server
    client = OpenAIClient(url, "tiny-teacher", timeout=60, max_retries=3, backoff=0.01, concurrency=2)
    teacher = distill.OpenAITeacher(client, SamplingParams(max_new_tokens=6, temperature=1.0))
    probs = tasks.load("synthetic").problems("train", 3, 0, [1])
    out = tmp_path / "d.jsonl"
    stats = distill.main(probs, teacher, 2, out, progress=False)
    # the first generate call fails: each request in it (1, or 2 when the server batched the two clients'
    # concurrent requests) answers 500 and is retried once; every rollout arrives
    assert stats["rollouts"] == 6 and 1 <= client.retries <= 2 and gen.calls >= 2
    rows = _rows(out)
    assert {r["teacher"] for r in rows} == {"tiny-teacher"} and all(isinstance(r["correct"], bool) for r in rows)


def test_openai_client_gives_up_after_retries_and_reports_client_errors(flaky_server):
    url, gen = flaky_server
    gen.failures = 100
    client = OpenAIClient(url, "tiny-teacher", max_retries=2, backoff=0.01)
    with pytest.raises(ServerError, match="after 3 attempts.*500"):
        client.chat([{"role": "user", "content": "hi"}], 1, SamplingParams(max_new_tokens=2))
    with pytest.raises(UserError, match="400"):
        client.chat([], 1, SamplingParams(max_new_tokens=2))
    refused = OpenAIClient("http://127.0.0.1:9/v1", "x", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(ServerError, match="after 2 attempts"):
        refused.chat([{"role": "user", "content": "hi"}], 1, SamplingParams(max_new_tokens=2))


def test_hf_teacher(tiny_loaded, tmp_path):
    model, tok = tiny_loaded
    teacher = distill.HFTeacher(HFGenerator(model, tok), lambda q: q, SamplingParams(max_new_tokens=4), "tiny")
    stats = distill.main(tasks.load("synthetic").problems("train", 3, 0, [1]), teacher, 2, tmp_path / "d.jsonl", progress=False)
    assert stats["rollouts"] == 6


def test_select_accepts_dedupes_keeps_rejects_and_picks_hard(tmp_path):
    rows = []
    for pid, grades, diff in [("easy", [1, 1, 1, 1], 1), ("mid", [1, 1, 0, 0], 2), ("hard", [1, 0, 0, 0], 2), ("none", [0, 0], 2)]:
        for i, g in enumerate(grades):
            text = f"<think>{pid}</think><answer>{'right' if g else i}</answer>"
            rows.append({"problem_id": pid, "question": pid, "completion": text, "correct": bool(g), "difficulty": diff})
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = selection.main(src, tmp_path / "sel", max_pass_rate=0.5, min_difficulty=2)
    accepted = _rows(tmp_path / "sel" / "accepted.jsonl")
    assert [r["problem_id"] for r in accepted] == ["easy", "mid", "hard"]  # identical correct texts deduplicated
    assert stats["duplicates_dropped"] == 4 and stats["rejected"] == 7
    assert [r["problem_id"] for r in _rows(tmp_path / "sel" / "hard.jsonl")] == ["mid", "hard"]
    assert stats["problems_with_both"] == 2
    assert json.loads((tmp_path / "sel" / "pass_rates.json").read_text())["mid"] == 0.5


def test_a_correct_rollout_cut_off_at_the_token_limit_is_not_accepted(tmp_path):
    """Rejection sampling keeps what the teacher finished: a correct answer whose rollout hit max_new_tokens (no
    </answer>, no eos) would teach the model not to stop."""
    rows = [{"problem_id": "p", "question": "p", "completion": "<think>2 + 2 = 4</think><answer>4", "correct": True,
             "finish_reason": "length"},
            {"problem_id": "p", "question": "p", "completion": "<think>2 + 2 = 4.</think><answer>4</answer>", "correct": True,
             "finish_reason": "stop"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = selection.main(src, tmp_path / "sel")
    assert [r["finish_reason"] for r in _rows(tmp_path / "sel" / "accepted.jsonl")] == ["stop"]
    assert stats["cut_off_dropped"] == 1 and stats["duplicates_dropped"] == 0


def test_a_correct_rollout_cut_off_at_the_token_limit_is_never_a_chosen_side():
    from thinkforge.data import pairs

    rows = [{"problem_id": "p", "question": "q", "completion": "<answer>4", "correct": True, "finish_reason": "length"},
            {"problem_id": "p", "question": "q", "completion": "<answer>5</answer>", "correct": False, "finish_reason": "stop"}]
    built, stats = pairs.build(rows)
    assert built == [] and stats["cut_off_correct_dropped"] == 1


def test_the_solution_teacher_writes_a_tasks_worked_solutions_graded_by_the_task(tmp_path):
    """distill.teacher=solution on a reasoning-gym task that has worked solutions: one rollout per problem, the
    solution as the thinking, graded right by the task's own scorer; a task without solutions is one clear error."""
    from thinkforge.io import read_jsonl

    probs = tasks.load("reasoning_gym:gsm_symbolic").problems("train", 3, 0)
    stats = distill.main(probs, distill.SolutionTeacher(), 1, tmp_path / "s.jsonl", progress=False)
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert stats["acceptance"] == 1.0 and len(rows) == 3
    assert all(r["task"] == "reasoning_gym:gsm_symbolic" and r["score"] == 1.0 for r in rows)
    assert all("####" not in r["completion"] and r["completion"].startswith("<think>") for r in rows)
    assert distill.main(probs, distill.SolutionTeacher(), 1, tmp_path / "s.jsonl", progress=False)["skipped_done"] == 3
    with pytest.raises(UserError, match="has no worked solution"):  # mahjong_puzzle's "solution" is the bare answer
        distill.main(tasks.load("reasoning_gym:mahjong_puzzle").problems("train", 1, 0), distill.SolutionTeacher(), 1,
                     tmp_path / "c.jsonl", progress=False)
    from thinkforge.config import load_config

    recipe = load_config(None, ["distill.teacher=solution"])
    with pytest.raises(UserError, match="one rollout per problem.*distill.samples=1"):
        distill.teacher_for(recipe.distill, recipe)
    with pytest.raises(UserError, match="synthetic teacher writes the synthetic task's solutions.*gsm_symbolic"):
        list(distill.SyntheticTeacher(0.3, 0).solve(probs, 2))


def test_a_self_teacher_asked_in_its_own_words_writes_think_answer_rows_graded_as_written(tiny_model, tmp_path):
    """The Infused cold start from the model's own verified samples: the teacher is asked with its own system prompt
    (one it follows), and each rollout is written in the student's <think>/<answer> form, graded the same; a rollout
    already tagged, or with no answer to read, is kept as written. Either setting with a non-model teacher is an
    error (it would do nothing)."""
    from thinkforge.config import load_config
    from thinkforge.formats import parse

    tagged = distill.think_answer("Add 3 and 4: 3 + 4 = 7.\nThe answer is 7.")
    assert parse(tagged).format_ok and parse(tagged).answer == "7"
    assert parse(tagged).thinking == "Add 3 and 4: 3 + 4 = 7."  # the working, not the sentence that states the answer
    bare = distill.think_answer("The answer is 16.")
    assert parse(bare).format_ok and parse(bare).thinking == "" and parse(bare).answer == "16"
    for said, working in [("The answer is 7. First, 3 + 4 = 7, so that checks out.", "First, 3 + 4 = 7, so that checks out."),
                          ("The answer is 12. Let me double-check the answer: 3*4 = 12.",
                           "Let me double-check the answer: 3*4 = 12."),
                          ("3 + 4 = 7. Therefore, the answer is 7.", "3 + 4 = 7.")]:  # only the sentence that states it goes
        assert parse(distill.think_answer(said)).thinking == working
    for kept in ("<think>3 + 4 = 7</think>\n<answer>7</answer>", "I am not sure"):
        assert distill.think_answer(kept) == kept
    hashes = "The answer is #### 5"  # read as "#### 5"; in an <answer> tag it would read "5": kept as written
    assert distill.think_answer(hashes) == hashes

    recipe = load_config(None, [f"model.name_or_path={tiny_model}", "model.system_prompt=STUDENT-SYSTEM",
                                "distill.teacher=hf", f"distill.teacher_model={tiny_model}",
                                "distill.teacher_system_prompt=TEACHER-SYSTEM", "distill.rewrite=think_answer",
                                "distill.max_new_tokens=6", "model.prompt_format=phi2"])
    teacher = distill.teacher_for(recipe.distill, recipe)
    assert isinstance(teacher, distill.ThinkAnswer)
    asked = teacher.teacher.prompt_fn("What is 3 + 4?")
    assert "TEACHER-SYSTEM" in asked and "STUDENT-SYSTEM" not in asked
    plain = distill.teacher_for(recipe.distill.model_copy(update={"rewrite": "none", "teacher_system_prompt": None}), recipe)
    assert "STUDENT-SYSTEM" in plain.prompt_fn("What is 3 + 4?")

    class Says:  # a teacher that answers in plain words, one right and one wrong
        name = "says"

        def solve(self, problems, n):
            for p in problems:
                yield p, [(f"Working it out. The answer is {p.reference}.", "stop"), ("The answer is -1.", "stop")]

    probs = tasks.load("synthetic").problems("train", 2, 0, [1])
    stats = distill.main(probs, distill.ThinkAnswer(Says()), 2, tmp_path / "d.jsonl", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert stats["correct"] == 2 and [r["correct"] for r in rows] == [True, False, True, False]
    assert all(parse(r["completion"]).format_ok for r in rows)
    for key, value in (("teacher_system_prompt", "x"), ("rewrite", "think_answer")):
        with pytest.raises(UserError, match=f"distill.{key}=.*does nothing here"):
            load_config(None, [f"distill.{key}={value}"])
