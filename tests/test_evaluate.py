import json

import pytest

from thinkforge.evaluate import evaluate, summarize
from thinkforge.rollout.types import Completion, SamplingParams
from thinkforge.tasks import Problem


class ScriptedGenerator:
    """Returns fixed completions: for prompt i, sample j -> script[question][j]."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, prompts, n, params):
        self.calls.append((len(prompts), n, params))
        return [Completion(i, self.script[p][j], (1, 2, 3), "stop" if "</answer>" in self.script[p][j] else "length")
                for i, p in enumerate(prompts) for j in range(n)]


def test_pass_at_1_averages_samples_per_problem_then_problems():
    good = "<think>" + "step " * 6 + "</think><answer>4</answer>"
    script = {
        "q1": [good, good, "<think>x</think><answer>5</answer>", "<think>cut off"],  # 2 of 4 right
        "q2": [good] * 4,  # 4 of 4
    }
    problems = [Problem("1", "q1", "4"), Problem("2", "q2", "4")]
    gen = ScriptedGenerator(script)
    rows, s = evaluate(gen, problems, lambda q: q, SamplingParams(temperature=0.6), samples=4, progress=False)
    assert len(rows) == 8 and gen.calls[0][1] == 4
    assert s["accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["format_rate"] == pytest.approx(7 / 8)
    assert s["reasoning_rate"] == pytest.approx(6 / 8)
    assert s["truncated_rate"] == pytest.approx(1 / 8)
    assert s["avg_think_words"] == pytest.approx((6 * 6 + 1 + 2) / 8)
    assert s["n"] == 2 and s["protocol"]["samples_per_problem"] == 4 and s["protocol"]["temperature"] == 0.6


def test_summary_of_nothing_is_zero():
    assert summarize([], 0)["accuracy"] == 0


def test_eval_cli_on_tiny_model_writes_samples_and_summary(tiny_model, tmp_path, capsys):
    from conftest import run_cli

    code, out, err = run_cli(["eval", "-m", tiny_model, "-b", "synthetic", "--limit", "6", "-k", "2",
                              "--max-new-tokens", "8", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "synthetic.summary.json").read_text())
    rows = (tmp_path / "synthetic.samples.jsonl").read_text().splitlines()
    assert len(rows) == 12 and summary["n"] == 6 and summary["samples"] == 12
    assert summary["accuracy"] < 0.2  # a random model is an honest near-zero baseline
    assert summary["protocol"]["max_new_tokens"] == 8
    assert "| synthetic |" in out


def test_paired_change_pairs_by_problem_with_a_t_interval():
    from thinkforge.evaluate import paired_change

    def rows(shares):  # problem -> correct flags of its samples
        return [{"problem_id": p, "question": f"q {p}", "reference": "1", "correct": c} for p, flags in shares.items()
                for c in flags]

    before = rows({"a": [1, 0], "b": [0, 0], "c": [1, 1], "d": [0, 1]})
    after = rows({"b": [1, 0], "a": [1, 1], "c": [1, 1], "d": [0, 1]})
    c = paired_change(before, after)
    d = [0.5, 0.5, 0.0, 0.0]  # a, b, c, d
    mean = sum(d) / 4
    se = (sum((x - mean) ** 2 for x in d) / 3) ** 0.5 / 2
    assert c["n"] == 4 and c["change"] == pytest.approx(0.25) and c["se"] == pytest.approx(se)
    assert c["ci95"] == pytest.approx([0.25 - 3.1824 * se, 0.25 + 3.1824 * se], rel=1e-3)  # t(0.975, 3)
    assert (c["before"], c["after"], c["gained"], c["lost"]) == (pytest.approx(0.5), pytest.approx(0.75), 2, 0)


def test_t_quantiles_against_tables():
    from thinkforge.evaluate import t_quantile

    for df, want in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (9, 2.2622), (29, 2.0452), (199, 1.9720)]:
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-3), df


def test_evaluations_of_different_problems_are_refused_not_paired_on_their_intersection():
    """Synthetic test ids once did not carry the seed: seed 0 against seed 1 paired 200 ids whose questions all
    differed; evaluations of different n used their intersection without a word."""
    from thinkforge.evaluate import paired_change
    from thinkforge.tasks import synthetic

    def rows(problems, n=None):
        return [{"problem_id": p["id"], "question": p["question"], "reference": p["final"], "correct": True}
                for p in problems[:n]]

    seed0, seed1 = synthetic.generate(20, "test", 2, seed=0), synthetic.generate(20, "test", 2, seed=1)
    assert not {p["id"] for p in seed0} & {p["id"] for p in seed1}  # the seed is in the id
    same_ids = [{**p, "id": q["id"]} for p, q in zip(seed1, seed0, strict=True)]  # ids alike, questions not
    for other in (rows(same_ids), rows(seed0, 10)):
        with pytest.raises(ValueError, match="different problems"):
            paired_change(rows(seed0), other)


def test_compare_cli_reads_eval_folders_and_rejects_what_is_not_one(tmp_path, capsys):
    from conftest import run_cli

    for name, flags in (("a", [0, 0, 1, 0]), ("b", [1, 0, 1, 1])):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"problem_id": f"p{i // 2}", "question": f"q{i // 2}", "reference": "1", "correct": bool(f)})
                 for i, f in enumerate(flags)]
        (tmp_path / name / "synthetic.samples.jsonl").write_text("\n".join(lines) + "\n")
        protocol = {"temperature": 0.6, "seed": 0 if name == "a" else 1}
        (tmp_path / name / "synthetic.summary.json").write_text(json.dumps({"protocol": protocol}))
    code, _, err = run_cli(["compare", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    assert code == 2 and "different protocols (seed 0 vs 1)" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "b" / "synthetic.summary.json").write_text(json.dumps({"protocol": {"temperature": 0.6, "seed": 0}}))
    code, out, err = run_cli(["compare", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert "| synthetic | 25.0 | 75.0 | +50.0 | +50.0 to +50.0 | 2 / 0 | 2 |" in out
    (tmp_path / "empty").mkdir()
    for args, expect in (([tmp_path / "a", tmp_path / "empty"], "no <benchmark>.samples.jsonl here"),
                         ([tmp_path / "a", tmp_path / "a" / "x.json"], "no <benchmark>.samples.jsonl here"),
                         ([tmp_path / "a" / "synthetic.samples.jsonl", __file__], "not a samples file")):
        code, _, err = run_cli(["compare", *map(str, args)], capsys)
        assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err


def test_eval_batch_size_sets_rows_per_call_and_the_samples_do_not_depend_on_it(tiny_model, tmp_path, capsys):
    """--batch-size is the rows per generate call at any k (it was 8 problems per call whatever was asked),
    and each sample's stream is keyed by its problem, so sampled completions are the same at any batch size."""
    from conftest import run_cli

    from thinkforge import evaluate as ev

    calls = []
    real = ev.evaluate

    def spy(generator, problems, prompt_fn, params, *, samples=1, chunk=8, progress=True, benchmark=""):
        calls.append(chunk)
        return real(generator, problems, prompt_fn, params, samples=samples, chunk=chunk, progress=progress,
                    benchmark=benchmark)

    texts = {}
    for bs in (2, 12):
        ev.evaluate = spy
        try:
            code, _, err = run_cli(["eval", "-m", tiny_model, "-b", "synthetic", "--limit", "12", "--batch-size", str(bs),
                                    "--temperature", "1.0", "--max-new-tokens", "8", "--out", str(tmp_path / str(bs))], capsys)
        finally:
            ev.evaluate = real
        assert code == 0, err
        texts[bs] = [json.loads(r)["completion"] for r in (tmp_path / str(bs) / "synthetic.samples.jsonl").read_text().splitlines()]
    assert calls == [2, 12]
    assert texts[2] == texts[12] and len(set(texts[2])) > 6


def test_answers_over_the_grading_budget_are_counted_and_warned(monkeypatch):
    """A correct answer whose check runs over math-verify's budget is graded wrong: the sample row says so, the
    summary counts it, and a warning names it (it was silent, and under load correct answers scored as wrong)."""
    from thinkforge import grading

    monkeypatch.setattr(grading.math_equal, "__defaults__", (0.0,))  # no budget: the item runs over it (an
    # expression no other test grades: math-verify caches, and a cached item can answer within a timer tick)
    script = {"q1": ["<think>expand</think><answer>(x+1)^{53}/(x+1)</answer>"], "q2": ["<think>so</think><answer>7</answer>"]}
    problems = [Problem("1", "q1", "(x+1)^{52}"), Problem("2", "q2", "7")]
    with pytest.warns(UserWarning, match="1 of 2 answers ran over math-verify's budget"):
        rows, s = evaluate(ScriptedGenerator(script), problems, lambda q: q, SamplingParams(), samples=1, progress=False)
    assert [r["grading_timeout"] for r in rows] == [True, False] and not rows[0]["correct"]
    assert s["grading_timeouts"] == 1
