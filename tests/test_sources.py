from pathlib import Path

import pytest

from thinkforge.data import synthetic
from thinkforge.data.sources import load_benchmark
from thinkforge.errors import UserError

FIX = Path(__file__).parent / "fixtures"


def test_gsm8k_schema_reference_is_the_number_after_hashes():
    probs = load_benchmark("gsm8k", str(FIX / "gsm8k_test.jsonl"))
    assert [p.reference for p in probs] == ["22", "1000", "63"]
    assert probs[0].kind == "math" and "####" in probs[0].meta["solution"]


def test_math500_and_aime_schemas():
    math = load_benchmark("math500", str(FIX / "math500_test.jsonl"))
    assert math[0].id == "test/prealgebra/1.json" and math[0].reference == "\\frac{3}{4}"
    assert math[1].meta["level"] == 2
    aime = load_benchmark("aime24", str(FIX / "aime24_train.jsonl"))
    assert [p.reference for p in aime] == ["9", "30"]


def test_gpqa_options_shuffled_with_a_fixed_seed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thinkforge.io import read_jsonl

    rows = read_jsonl(FIX / "gpqa_diamond_train.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gpqa.parquet")  # the hub ships parquet
    a = load_benchmark("gpqa_diamond", str(tmp_path / "gpqa.parquet"))
    b = load_benchmark("gpqa_diamond", str(FIX / "gpqa_diamond_train.jsonl"))
    assert [(p.reference, p.choices) for p in a] == [(p.reference, p.choices) for p in b]
    for p, row in zip(a, rows, strict=True):
        assert p.kind == "mcq" and p.choices["ABCD".index(p.reference)] == row["Correct Answer"]
        assert f"({p.reference}) {row['Correct Answer']}" in p.question
    assert {p.reference for p in load_benchmark("gpqa_diamond", str(FIX / "gpqa_diamond_train.jsonl"))} != {"A"}


def test_local_file_with_column_mapping():
    probs = load_benchmark("local", str(FIX / "custom.jsonl"), {"question": "prompt", "answer": "target", "id": "uid"})
    assert [(p.id, p.question, p.reference) for p in probs] == [("c1", "What is 3 + 4?", "7"), ("c2", "What is 10 / 4?", "2.5")]


def test_bad_benchmark_inputs_are_clear():
    with pytest.raises(UserError, match="did you mean 'gsm8k'"):
        load_benchmark("gsm8")
    with pytest.raises(UserError, match="missing column 'problem'"):
        load_benchmark("math500", str(FIX / "gsm8k_test.jsonl"))
    with pytest.raises(UserError, match="not found"):
        load_benchmark("gsm8k", str(FIX / "nope.jsonl"))
    with pytest.raises(UserError, match="needs a file"):
        load_benchmark("local")


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load openai/gsm8k.*--data-path"):
        load_benchmark("gsm8k")


def test_synthetic_is_seeded_and_test_split_is_disjoint_by_construction():
    assert synthetic.generate(20, "train", 2, seed=1) == synthetic.generate(20, "train", 2, seed=1)
    assert synthetic.generate(20, "train", 2, seed=1) != synthetic.generate(20, "train", 2, seed=2)
    for level in (1, 2, 3, 4):
        train = synthetic.generate(300, "train", level, seed=0)
        test = synthetic.generate(28 if level == 1 else 60, "test", level, seed=0)
        def arithmetic(r):  # the equations, without names or objects
            return tuple(line.split(": ", 1)[1] for line in r["answer"].splitlines()[1:-2])

        assert not {arithmetic(r) for r in train} & {arithmetic(r) for r in test}
        assert len({(r["question"].split(" ")[2], arithmetic(r)) for r in test}) == len(test)  # distinct cases
        assert all(r["answer"].count(" = ") == synthetic.LEVELS[level][0] for r in train)


def test_a_synthetic_test_is_independent_cases_and_asking_for_more_is_one_clear_error():
    assert len(synthetic.generate(28, "test", 1, seed=4)) == 28  # every difficulty-1 test case, once
    with pytest.raises(UserError, match="difficulty 1 has 28.*higher difficulty"):
        load_benchmark("synthetic", difficulty=1, n=29)
    assert len(load_benchmark("synthetic", difficulty=2, n=1000)) == 1000


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
    from thinkforge.data.sources import training_problems

    with pytest.raises(UserError, match="test split"):
        training_problems("math500", 10, [1], 0)
    probs = training_problems("gsm8k", 2, [1], 0, data_path=str(FIX / "gsm8k_test.jsonl"))
    assert len(probs) == 2
    assert all(p.id.startswith("synthetic-s0-train") for p in training_problems("synthetic", 10, [1, 2], 0))


def test_rl_and_policy_problems_are_draws_the_distillation_did_not_make():
    from thinkforge.config import load_config
    from thinkforge.data import distill
    from thinkforge.data.distill import policy_problems
    from thinkforge.data.sources import training_problems

    recipe = load_config(None, ["distill.n_problems=400", "distill.difficulties=[2]", "pipeline.policy_problems=100"])
    distilled = {p.question for p in distill.problems_for(recipe.distill, recipe.seed)}
    rl_pool = training_problems("synthetic", 100, [2], recipe.seed, stream="rl")
    own = policy_problems(recipe)
    assert len(own) == 100 and all(p.id.startswith("synthetic-s0-train-policy-d2-") for p in own)
    assert all(p.id.startswith("synthetic-s0-train-rl-d2-") for p in rl_pool)
    # independent draws: at most chance collisions in a space of tens of thousands of problems
    assert len(distilled & {p.question for p in rl_pool}) <= 2
    assert len(distilled & {p.question for p in own}) <= 2
    # the default stream is the distillation's own draw (ids without a stream name), and `policy_fresh: false`
    # samples on the distilled problems
    default = training_problems("synthetic", 4, [2], 0)
    assert [p.id for p in default] == [f"synthetic-s0-train-d2-{i}" for i in range(4)]
    assert [p.question for p in default] == [r["question"] for r in synthetic.generate(4, "train", 2, seed=0)]
    assert {p.question for p in default}.isdisjoint({p.question for p in training_problems("synthetic", 4, [2], 0, stream="rl")})
    # n problems over several levels are n, the first levels one more where n does not divide
    assert [p.meta["difficulty"] for p in training_problems("synthetic", 5, [1, 2], 0)] == [1, 1, 1, 2, 2]
    stale = policy_problems(load_config(None, ["distill.n_problems=400", "distill.difficulties=[2]",
                                               "pipeline.policy_problems=100", "pipeline.policy_fresh=false"]))
    assert {p.question for p in stale} <= distilled
