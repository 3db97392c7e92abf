"""Tasks (thinkforge/tasks): the built-in ones in the hub's schemas, the synthetic task, local files,
reasoning-gym with its traps, weighted mixes, and the check that no training problem is an evaluation problem."""

from pathlib import Path

import pytest
import yaml

from thinkforge import tasks
from thinkforge.config import Recipe, dump_config, load_config, validate
from thinkforge.errors import UserError
from thinkforge.tasks import synthetic

FIX = Path(__file__).parent / "fixtures"


def bench(name, path=None, columns=None, n=None, options=None):
    return tasks.load(name, options, data_path=str(path) if path else None, columns=columns).problems("test", n, 0)


def train(name, n, levels, seed=0, stream="", path=None, options=None):
    return tasks.load(name, options, data_path=path).problems("train", n, seed, levels, stream)


def test_gsm8k_schema_reference_is_the_number_after_hashes():
    probs = bench("gsm8k", FIX / "gsm8k_test.jsonl")
    assert [p.reference for p in probs] == ["22", "1000", "63"]
    assert probs[0].kind == "math" and "####" in probs[0].meta["solution"]
    assert probs[0].score("22") == 1.0 and probs[0].score("21") == pytest.approx(0.5 * (1 - (1 / 22) / 0.1))


def test_math500_and_aime_schemas():
    math = bench("math500", FIX / "math500_test.jsonl")
    assert math[0].id == "test/prealgebra/1.json" and math[0].reference == "\\frac{3}{4}"
    assert math[1].meta["level"] == 2
    aime = bench("aime24", FIX / "aime24_train.jsonl")
    assert [p.reference for p in aime] == ["9", "30"]


def test_gpqa_options_shuffled_with_a_fixed_seed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thinkforge.io import read_jsonl

    rows = read_jsonl(FIX / "gpqa_diamond_train.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gpqa.parquet")  # the hub ships parquet
    a = bench("gpqa_diamond", tmp_path / "gpqa.parquet")
    b = bench("gpqa_diamond", FIX / "gpqa_diamond_train.jsonl")
    assert [(p.reference, p.choices) for p in a] == [(p.reference, p.choices) for p in b]
    for p, row in zip(a, rows, strict=True):
        assert p.kind == "mcq" and p.choices["ABCD".index(p.reference)] == row["Correct Answer"]
        assert f"({p.reference}) {row['Correct Answer']}" in p.question
        assert p.score(p.reference) == 1.0 and p.score("ABCD".replace(p.reference, "")[0]) == 0.0
    assert {p.reference for p in b} != {"A"}


def test_local_file_with_column_mapping():
    probs = bench("local", FIX / "custom.jsonl", {"question": "prompt", "answer": "target", "id": "uid"})
    assert [(p.id, p.question, p.reference) for p in probs] == [("c1", "What is 3 + 4?", "7"), ("c2", "What is 10 / 4?", "2.5")]


def test_bad_task_inputs_are_clear():
    with pytest.raises(UserError, match="did you mean 'gsm8k'"):
        bench("gsm8")
    with pytest.raises(UserError, match="missing column 'problem'"):
        bench("math500", FIX / "gsm8k_test.jsonl")
    with pytest.raises(UserError, match="not found"):
        bench("gsm8k", FIX / "nope.jsonl")
    with pytest.raises(UserError, match="needs a file"):
        bench("local")
    with pytest.raises(UserError, match="takes no ':x'"):
        tasks.load("synthetic:x")
    with pytest.raises(UserError, match="levels 1-4, got \\[7\\]"):
        tasks.for_training(load_config(None, ["eval.benchmarks=[]"]), "rl", 4, [7])


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load openai/gsm8k.*--data-path"):
        bench("gsm8k")


def test_synthetic_is_seeded_and_test_split_is_disjoint_by_construction():
    assert synthetic.generate(20, "train", 2, seed=1) == synthetic.generate(20, "train", 2, seed=1)
    assert synthetic.generate(20, "train", 2, seed=1) != synthetic.generate(20, "train", 2, seed=2)
    for level in (1, 2, 3, 4):
        train_rows = synthetic.generate(300, "train", level, seed=0)
        test = synthetic.generate(28 if level == 1 else 60, "test", level, seed=0)
        def arithmetic(r):  # the equations, without names or objects
            return tuple(line.split(": ", 1)[1] for line in r["answer"].splitlines()[1:-2])

        assert not {arithmetic(r) for r in train_rows} & {arithmetic(r) for r in test}
        assert len({(r["question"].split(" ")[2], arithmetic(r)) for r in test}) == len(test)  # distinct cases
        assert all(r["answer"].count(" = ") == synthetic.LEVELS[level][0] for r in train_rows)


def test_a_synthetic_test_is_independent_cases_and_asking_for_more_is_one_clear_error():
    assert len(synthetic.generate(28, "test", 1, seed=4)) == 28  # every difficulty-1 test case, once
    with pytest.raises(UserError, match="difficulty 1 has 28.*higher difficulty"):
        bench("synthetic", n=29, options={"synthetic": {"level": 1}})
    assert len(bench("synthetic", n=1000, options={"synthetic": {"level": 2}})) == 1000


def test_synthetic_answers_are_whole_and_right():
    for r in synthetic.generate(200, "train", 4, seed=3):
        value = None
        for line in r["answer"].splitlines()[1:-2]:
            lhs, rhs = line.split(": ", 1)[1].rstrip(".").split(" = ")
            a, op, b = lhs.split()
            assert value is None or int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
            assert op != "/" or int(a) % int(b) == 0
            assert int(rhs) == value >= 0
        assert str(value) == r["final"]


def test_training_never_reads_a_benchmark_test_split():
    with pytest.raises(UserError, match="test split"):
        train("math500", 10, [1])
    assert len(train("gsm8k", 2, None, path=str(FIX / "gsm8k_test.jsonl"))) == 2
    assert all(p.id.startswith("synthetic-s0-train") for p in train("synthetic", 10, [1, 2]))


def test_rl_and_policy_problems_are_draws_the_distillation_did_not_make():
    from thinkforge.data import distill
    from thinkforge.data.distill import policy_problems

    recipe = load_config(None, ["distill.n_problems=400", "distill.difficulties=[2]", "pipeline.policy_problems=100"])
    distilled = {p.question for p in distill.problems_for(recipe)}
    rl_pool = train("synthetic", 100, [2], stream="rl")
    own = policy_problems(recipe)
    assert len(own) == 100 and all(p.id.startswith("synthetic-s0-train-policy-d2-") for p in own)
    assert all(p.id.startswith("synthetic-s0-train-rl-d2-") for p in rl_pool)
    # independent draws: at most chance collisions in a space of tens of thousands of problems
    assert len(distilled & {p.question for p in rl_pool}) <= 2
    assert len(distilled & {p.question for p in own}) <= 2
    # the default stream is the distillation's own draw (ids without a stream name), and `policy_fresh: false`
    # samples on the distilled problems
    default = train("synthetic", 4, [2])
    assert [p.id for p in default] == [f"synthetic-s0-train-d2-{i}" for i in range(4)]
    assert [p.question for p in default] == [r["question"] for r in synthetic.generate(4, "train", 2, seed=0)]
    assert {p.question for p in default}.isdisjoint({p.question for p in train("synthetic", 4, [2], stream="rl")})
    # n problems over several levels are n, the first levels one more where n does not divide
    assert [p.meta["difficulty"] for p in train("synthetic", 5, [1, 2])] == [1, 1, 1, 2, 2]
    stale = policy_problems(load_config(None, ["distill.n_problems=400", "distill.difficulties=[2]",
                                               "pipeline.policy_problems=100", "pipeline.policy_fresh=false"]))
    assert {p.question for p in stale} <= distilled


def test_a_training_problem_that_is_an_evaluation_problem_is_an_error_naming_the_count(tmp_path):
    from thinkforge.io import write_jsonl

    held = bench("synthetic", n=30, options={"synthetic": {"level": 2}})
    rows = [{"question": p.question, "answer": p.reference} for p in held[:3]]
    rows += [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    recipe = load_config(None, ["eval.benchmarks=[synthetic]", "synthetic.difficulty=2", "synthetic.n_test=30",
                                "rl.source=local", f"rl.data_path={tmp_path / 'prompts.jsonl'}"])
    with pytest.raises(UserError, match=r"rl \(local\) and eval synthetic: 3 of 8 training problems are evaluation"):
        tasks.for_training(recipe, "rl", 100, None, data_path=str(tmp_path / "prompts.jsonl"))
    write_jsonl(tmp_path / "prompts.jsonl", rows[3:])
    assert len(tasks.for_training(recipe, "rl", 100, None, data_path=str(tmp_path / "prompts.jsonl"))) == 5


# ---------------------------------------------------------------- reasoning-gym


def test_a_reasoning_gym_task_by_name_with_its_options_levels_and_scorer():
    t = tasks.load("reasoning_gym:chain_sum", {"reasoning_gym:chain_sum": {"allow_negation": False}})
    assert t.name == "reasoning_gym:chain_sum" and t.procedural and t.levels[:3] == (1, 2, 3)
    probs = t.problems("train", 20, 0, [1, 2])
    assert [p.meta["difficulty"] for p in probs[:10]] == [1] * 10 and {p.meta["difficulty"] for p in probs[10:]} == {2}
    assert len({p.question for p in probs}) == len(probs)  # no question twice, across levels either
    assert all(p.score(p.reference) == 1.0 for p in probs)
    terms = {lv: {p.meta["entry"]["metadata"]["num_terms"] for p in probs if p.meta["difficulty"] == lv} for lv in (1, 2)}
    assert terms == {1: {2}, 2: {2, 3}}  # the curriculum's levels 0 and 0-1 (2 terms; 2-3 terms)
    assert all(not p.meta["entry"]["metadata"]["expression"].lstrip().startswith("-") for p in probs)  # the option
    assert probs == t.problems("train", 20, 0, [1, 2])  # seeded
    assert all(p.id == f"rg-chain_sum-train-L{p.meta['difficulty']}-" + __import__("hashlib").sha256(
        p.question.encode()).hexdigest()[:12] for p in probs)  # ids name the content
    with pytest.raises(UserError, match="did you mean 'chain_sum'"):
        tasks.load("reasoning_gym:chain_summ")
    with pytest.raises(UserError, match="unknown option.*min_term;"):
        tasks.load("reasoning_gym:chain_sum", {"reasoning_gym:chain_sum": {"min_term": 2}})
    with pytest.raises(UserError, match="needs a name after the colon"):
        tasks.load("reasoning_gym")
    with pytest.raises(UserError, match="has no curriculum, so no levels"):
        tasks.load("reasoning_gym:acre", {"reasoning_gym:acre": {"level": 1}})


def test_training_at_unset_levels_is_the_configuration_evaluated_and_set_levels_refuse_overwritten_options():
    """rl.difficulties unset: a reasoning-gym task trains at its own options (as it is evaluated), synthetic at 1
    and 2; set, [1, 2] included (once the default's value, then read as unset): its curriculum's levels, and an
    option the curriculum would overwrite is an error. A run's config.yaml keeps the difference."""
    over = ["eval.benchmarks=[reasoning_gym:chain_sum]", "rl.source=reasoning_gym:chain_sum",
            "tasks.options.reasoning_gym:chain_sum={min_terms: 5, max_terms: 6}", "tasks.n_test=20"]
    recipe = load_config(None, over)
    trained = tasks.for_training(recipe, "rl", 20, recipe.rl.difficulties)
    evaluated = tasks.for_evaluation(recipe, "reasoning_gym:chain_sum")[1]
    terms = {p.meta["entry"]["metadata"]["num_terms"] for p in trained + evaluated}
    assert terms <= {5, 6} and len(evaluated) == 20
    with pytest.raises(UserError, match="curriculum sets max_terms, min_terms, which tasks.options also sets"):
        tasks.for_training(recipe, "rl", 20, [1, 3])
    leveled = load_config(None, over[:2] + ["tasks.options.reasoning_gym:chain_sum={level: 3}", "tasks.n_test=20"])
    assert {p.meta["difficulty"] for p in tasks.for_training(leveled, "rl", 20, leveled.rl.difficulties)} == {3}
    assert {p.meta["difficulty"] for p in tasks.for_evaluation(leveled, "reasoning_gym:chain_sum")[1]} == {3}
    written = load_config(None, over[:2] + ["rl.difficulties=[1, 2]", "tasks.n_test=20"])
    assert {p.meta["difficulty"] for p in tasks.for_training(written, "rl", 20, written.rl.difficulties)} == {1, 2}
    unset = load_config(None, over[:2] + ["tasks.n_test=20"])
    assert {p.meta["difficulty"] for p in tasks.for_training(unset, "rl", 20, unset.rl.difficulties)} == {None}
    reread = validate(  # a run's config.yaml, dumped and read back: still unset
        yaml.safe_load(dump_config(unset)), Recipe, "config.yaml")
    assert reread.rl.difficulties is None and reread.distill.difficulties is None
    plain = load_config(None, [])
    assert {p.meta["difficulty"] for p in tasks.for_training(plain, "rl", 20, plain.rl.difficulties)} == {1, 2}


def test_a_level_with_fewer_distinct_problems_than_asked_gives_those_with_a_warning():
    with pytest.warns(UserWarning, match=r"only \d+ distinct test problems at level 1"):
        probs = tasks.load("reasoning_gym:chain_sum").problems("test", 200, 0, [1])
    assert 20 < len(probs) < 200 and len({p.question for p in probs}) == len(probs)


def test_reasoning_gym_splits_are_disjoint_by_content_although_its_seeds_overlap():
    import reasoning_gym

    a, b = reasoning_gym.create_dataset("chain_sum", seed=0, size=5), reasoning_gym.create_dataset("chain_sum", seed=1, size=5)
    assert a[1]["question"] == b[0]["question"]  # the trap: item i+1 of seed s is item i of seed s+1
    t = tasks.load("reasoning_gym:basic_arithmetic")
    test = {p.question for p in t.problems("test", 60, 1, [2])}
    for seed in range(4):  # training draws of any seed, level or stream never reach an evaluation item
        for stream in ("", "rl"):
            assert test.isdisjoint(p.question for p in t.problems("train", 200, seed, [2], stream))
    assert len(test) == 60


def test_arithmetic_twins_share_a_key_and_a_split_in_every_task_and_training_on_one_is_refused():
    """"5 * 8" is a twin of "8 * 5", and "Calculate 3 + 6." of chain_sum's "6 + 3 =": a model trained on one is
    not evaluated on held-out items by the other. They share an expression key, so the same split, and a
    training problem that is the twin of an evaluation problem is refused."""
    from thinkforge.tasks.reasoning_gym import expression_key, is_test

    twins = [("Solve the following multiplication: 5 * 8. Give only the result.", "What is 8 * 5?"),
             ("Calculate 3 + 6.", "State the final answer to the following arithmetic problem: 6 + 3 ="),
             ("Calculate 8 - 3 + 5.", "Calculate 5 + 8 - 3.")]
    for a, b in twins:
        assert expression_key(a) == expression_key(b) is not None and is_test(a, expression_key(a)) == is_test(b, expression_key(b))
    others = [("Calculate 8 - 3.", "Calculate 3 - 8."), ("Calculate 6 / 2.", "Calculate 2 / 6."), ("Calculate 2 * 3 + 1.", "Calculate 2 * 4.")]
    for a, b in others:
        assert expression_key(a) != expression_key(b)
    assert expression_key("How many legs does a spider have?") is None
    factors = tasks.load("reasoning_gym:prime_factorization")  # every question holds the example "2 × 2 × 3":
    assert factors.twin_key(factors.problems("test", 1, 0)[0].question) is None  # its text names it, not that
    chain, basic = tasks.load("reasoning_gym:chain_sum"), tasks.load("reasoning_gym:basic_arithmetic")
    test = chain.problems("test", 150, 0, [1])  # every two-term one-digit sum on the test side ...
    train = basic.problems("train", 300, 0, [1])  # ... is on basic_arithmetic's test side too, whatever the wording
    assert not {expression_key(p.question) for p in test} & {expression_key(p.question) for p in train}
    twin = tasks.Problem("twin", "Calculate " + test[0].question.split(": ")[-1].rstrip(" ="), test[0].reference, task=basic)
    assert expression_key(twin.question) == expression_key(test[0].question)
    with pytest.raises(UserError, match="1 of 1 training problems are evaluation problems"):
        tasks.assert_disjoint([twin], test, "here")


def test_the_scorer_sees_only_the_extracted_answer_and_only_one_point_zero_is_correct():
    from thinkforge.evaluate import score_sample

    p = tasks.load("reasoning_gym:gsm_symbolic").problems("test", 1, 0)[0]
    right = f"<think>There are 3 boxes of 7, so 21 and then more.</think><answer>{p.reference}</answer>"
    assert score_sample(p, right, "stop")["correct"]  # its scorer takes the first number of what it gets
    wrong = score_sample(p, "<think>it is</think><answer>3</answer>", "stop")
    assert wrong["score"] == pytest.approx(0.01) and not wrong["correct"]  # 0.01 for any number: not correct
    from thinkforge.rewards import WeightedRewards

    total, parts = WeightedRewards({"verifiable": 1.0, "correctness": 1.0}).score("", p.reference, p.kind, 0.01)
    assert parts == {"verifiable": -1.0, "correctness": 0.01}
    from thinkforge.config import load_config
    from thinkforge.train.sampling import score

    cfg = load_config(None, []).rl  # in training a near miss earns the card's credit (0.01 for any number was a scorer's)
    rewards = WeightedRewards({"correctness": 1.0})
    assert score(f"<answer>{int(p.reference) * 100 + 7}</answer>", "stop", p, cfg, rewards)[1] == {"correctness": 0.0}
    big = next(q for q in tasks.load("reasoning_gym:gsm_symbolic").problems("test", 20, 0) if int(q.reference) >= 20)
    near = score(f"<answer>{int(big.reference) + 1}</answer>", "stop", big, cfg, rewards)[1]["correctness"]
    assert 0 < near < 1  # within 5% of a number of 20 or more: the card's partial credit, not the full point
    chain = tasks.load("reasoning_gym:chain_sum").problems("test", 1, 0)[0]
    assert 0 < chain.score(chain.reference + "1") < 1  # its scorer's substring credit ...
    assert score(f"<answer>{chain.reference}1</answer>", "stop", chain, cfg, rewards)[1]["correctness"] == 0.0  # ... not paid


def test_a_scorer_that_raises_scores_zero_is_counted_and_never_crashes(recwarn):
    from thinkforge.evaluate import score_sample

    p = tasks.load("reasoning_gym:prime_factorization").problems("test", 1, 0)[0]
    before = tasks.check_errors()
    row = score_sample(p, "<answer>2 * 3</answer>", "stop")  # its scorer does int("2 * 3")
    assert row["score"] == 0.0 and row["check_error"] and tasks.check_errors() == before + 1
    assert score_sample(p, f"<answer>{p.reference}</answer>", "stop")["correct"]


def test_unreliable_tasks_are_named_and_the_constant_answer_baseline_is_measured():
    t = tasks.load("reasoning_gym:syllogism")
    probs = t.problems("test", 200, 0)
    base = tasks.constant_baseline(probs)
    assert "70%" in t.notes and base["answer"] == "Yes" and 0.55 < base["accuracy"] < 0.9
    assert tasks.load("reasoning_gym:propositional_logic").notes
    assert tasks.constant_baseline(tasks.load("reasoning_gym:propositional_logic").problems("test", 5, 0)) is None


def test_a_weighted_mix_draws_shares_by_weight_and_checks_each_problem_with_its_own_task():
    mix = tasks.load("arith", {}, {"arith": {"synthetic": 1, "reasoning_gym:chain_sum": 3}})
    probs = mix.problems("train", 40, 0, [1])
    names = [p.task_name for p in probs]
    assert names.count("synthetic") == 10 and names.count("reasoning_gym:chain_sum") == 30
    assert names != sorted(names) and names != sorted(names, reverse=True)  # interleaved
    assert all(p.score(p.reference) == 1.0 for p in probs)
    assert probs == mix.problems("train", 40, 0, [1]) and mix.procedural
    # a level a part does not have: its nearest (synthetic's 4 for a 6, never an easier fallback)
    high = mix.problems("train", 8, 0, [6])
    assert {p.meta["difficulty"] for p in high if p.task_name == "synthetic"} == {4}
    assert {p.meta["difficulty"] for p in high if p.task_name != "synthetic"} == {6}
    with pytest.raises(UserError, match="weight > 0"):
        tasks.load("bad", {}, {"bad": {"synthetic": 0}})


def test_synthetic_difficulty_sets_the_synthetic_level_inside_a_mix_too():
    recipe = load_config(None, ["eval.benchmarks=[m]", "tasks.mixes.m={synthetic: 1, reasoning_gym:chain_sum: 1}",
                                "synthetic.difficulty=4", "tasks.n_test=10", "eval.limit=10"])
    probs = tasks.for_evaluation(recipe, "m")[1]
    assert {p.meta["difficulty"] for p in probs if p.task_name == "synthetic"} == {4}


def test_eval_scores_a_reasoning_gym_task_by_name(tmp_path, tiny_model):
    """`thinkforge eval -b reasoning_gym:chain_sum`: its own scorer, the constant-answer column, a seeded set."""
    from click.testing import CliRunner

    from thinkforge.cli import cli
    from thinkforge.io import read_jsonl

    out = tmp_path / "ev"
    res = CliRunner().invoke(cli, ["eval", "-m", str(tiny_model), "-b", "reasoning_gym:chain_sum", "--limit", "4",
                                   "--max-new-tokens", "4", "--out", str(out),
                                   "tasks.options.reasoning_gym:chain_sum.level=1"])
    assert res.exit_code == 0, res.output
    assert "constant answer" in res.output and "| reasoning_gym:chain_sum |" in res.output
    rows = read_jsonl(out / "reasoning_gym-chain_sum.samples.jsonl")  # a file name without the colon
    assert len(rows) == 4 and {r["task"] for r in rows} == {"reasoning_gym:chain_sum"}
    assert all(r["problem_id"].startswith("rg-chain_sum-test-L1-") for r in rows)


def test_task_settings_that_would_do_nothing_are_errors(tmp_path):
    """PITFALLS 19: options a task does not read, options or mixes for a task nothing names, and difficulty levels
    for a task without levels."""
    with pytest.raises(UserError, match="option\\(s\\) depth do nothing here; it reads level"):
        tasks.load("synthetic", {"synthetic": {"depth": 3}})
    with pytest.raises(UserError, match="tasks.options\\['reasoning_gym:products'\\] does nothing"):
        load_config(None, ["tasks.options.reasoning_gym:products.level=1"])
    with pytest.raises(UserError, match="tasks.mixes\\['m'\\] does nothing"):
        load_config(None, ["tasks.mixes.m={synthetic: 1}"])
    assert load_config(None, ["rl.source=m", "tasks.mixes.m={reasoning_gym:products: 1}",
                              "tasks.options.reasoning_gym:products.level=1"]).tasks.mixes == {"m": {"reasoning_gym:products": 1.0}}
    recipe = load_config(None, ["eval.benchmarks=[]", "rl.source=local", f"rl.data_path={FIX / 'custom.jsonl'}",
                                "rl.difficulties=[3]"])
    with pytest.raises(UserError, match="rl.difficulties=\\[3\\] does nothing here: task local has no difficulty levels"):
        tasks.for_training(recipe, "rl", 4, [3], data_path=str(FIX / "custom.jsonl"))
    assert tasks.for_training(recipe, "rl", 4, None, data_path=str(FIX / "custom.jsonl"), columns={
        "question": "prompt", "answer": "target", "id": "uid"})  # levels unset: nothing set, nothing said


def test_a_scorer_that_chews_on_a_hostile_answer_is_stopped_at_its_budget_and_counted(recwarn):
    import time

    p = tasks.load("reasoning_gym:polynomial_multiplication").problems("test", 1, 0)[0]
    before, start = tasks.check_errors(), time.process_time()
    assert p.score("9**9**9**9") == 0.0 and tasks.check_errors() == before + 1  # its scorer would run for minutes
    assert time.process_time() - start < 1.0  # the budget is spent in the worker, not here
    assert p.score(p.reference) == 1.0  # a fresh worker scores the next answer
