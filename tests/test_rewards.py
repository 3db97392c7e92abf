import pytest

from thinkforge.errors import UserError
from thinkforge.rewards import (
    REWARDS,
    WeightedRewards,
    correctness,
    format_reward,
    reasoning,
    resolve,
    verifiable,
)

GOOD = "<think>First, 5 + 4 = 9.\nThen I check: 9 - 4 = 5.\nSo it is 9.</think><answer>9</answer>"


def test_verifiable_is_plus_or_minus_one():
    assert verifiable(GOOD, "9") == 1.0
    assert verifiable(GOOD, "10") == -1.0
    assert verifiable("<think>5 + 4", "9") == -1.0


def test_correctness_partial_credit_for_close_numbers():
    assert correctness("<answer>100</answer>", "100") == 1.0
    assert correctness("<answer>98</answer>", "100") == pytest.approx(0.4)  # 2% off: 0.5 * (1 - 0.02/0.1)
    assert correctness("<answer>150</answer>", "100") == 0.0
    assert correctness("<answer>cat</answer>", "100") == 0.0
    assert correctness("<answer>B</answer>", "C", "mcq") == 0.0


def test_reasoning_rewards_thinking_steps_and_calculations():
    assert reasoning("<answer>9</answer>") == 0.0
    bare = reasoning("<think>hmm</think><answer>9</answer>")
    rich = reasoning(GOOD)
    assert 0.4 <= bare < rich <= 1.0
    assert rich >= 0.8


def test_format_reward_grades_structure():
    assert format_reward(GOOD) == 1.0
    assert format_reward("9") == 0.0
    assert format_reward("<think>x</think>9") == 0.25
    assert 0 < format_reward("<answer>9</answer><think>x</think>") < 1


def test_weighted_set_uses_recipe_weights():
    rewards = WeightedRewards({"correctness": 1.0, "reasoning": 0.7, "format": 0.3})
    total, parts = rewards.score(GOOD, "9")
    assert parts["correctness"] == 1.0 and parts["format"] == 1.0
    assert total == pytest.approx(1.0 + 0.7 * parts["reasoning"] + 0.3)


def test_user_reward_by_import_path():
    rewards = WeightedRewards({"user_rewards:shorter_is_better": 2.0, "verifiable": 1.0})
    total, parts = rewards.score("<answer>9</answer>", "9")
    assert parts["user_rewards:shorter_is_better"] == pytest.approx(-0.18)
    assert total == pytest.approx(2 * -0.18 + 1.0)


def test_unknown_rewards_are_clear_errors():
    with pytest.raises(UserError, match="unknown reward 'corectness'"):
        resolve("corectness")
    with pytest.raises(UserError, match="cannot be imported"):
        resolve("no_such_module:fn")


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_registered_reward_prefers_a_right_reasoned_formatted_answer(name):
    """Whatever is registered: the worked, tagged, right answer scores above an untagged wrong one."""
    assert REWARDS[name](GOOD, "9") > REWARDS[name]("10", "9")


def test_weighted_rewards_share_the_one_grading_of_a_completion_with_its_choices(monkeypatch):
    """An answer given as the option's text is right for the accuracy, and so for the reward: the completion
    is scored once, by its task's checker with the problem's choices, and every reward that grades takes that score."""
    from thinkforge import grading, rewards
    from thinkforge.config import load_config
    from thinkforge.tasks import Problem, Task
    from thinkforge.train import sampling

    calls = []
    real_check, real_grade = Task.check, grading.grade

    def counted(*args, **kwargs):
        calls.append(args)
        return real_check(*args, **kwargs)

    def graded_again(*args, **kwargs):
        calls.append(("again", *args))
        return real_grade(*args, **kwargs)

    monkeypatch.setattr(Task, "check", counted)
    monkeypatch.setattr(rewards, "grade", graded_again)
    problem = Problem("q1", "Which is needed?", "B", "mcq", ("4.2 J", "vitamin C", "iron", "zinc"), task=Task())
    weighted = WeightedRewards({"correctness": 1.0, "verifiable": 0.5, "format": 0.3})
    cfg = load_config(None, ["rl.reward=weighted"]).rl
    total, parts, correct = sampling.score("<think>It is the vitamin.</think><answer>vitamin C</answer>", "stop",
                                           problem, cfg, weighted)
    assert correct and parts["correctness"] == 1.0 and parts["verifiable"] == 1.0
    assert total == pytest.approx(1.0 + 0.5 + 0.3) and len(calls) == 1


@pytest.mark.parametrize("module", ["thinkforge.rewards", "thinkforge.grading"])
def test_the_docstring_examples_hold(module):
    """The examples in the docstrings are run (they were never collected)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted >= 5 and result.failed == 0


def test_a_cut_off_response_earns_at_most_what_saying_nothing_does_under_every_reward():
    """truncation=penalize was -1 for the verifiable reward and 0 for the weighted ones, two hard-coded numbers:
    now one rule for any reward set, a user's included."""
    from thinkforge import tasks
    from thinkforge.config import load_config
    from thinkforge.train.sampling import score

    p = tasks.load("synthetic").problems("test", 1, 0, [2])[0]
    right = f"<think>2 + 2 = 4, then more.</think><answer>{p.reference}</answer>"
    cfg = load_config(None, []).rl
    for weights, cut in [(None, -1.0), ({"correctness": 1.0, "reasoning": 0.7, "format": 0.3}, 0.0)]:
        rewards = WeightedRewards(weights) if weights else None
        full, _, ok = score(right, "stop", p, cfg, rewards)
        assert ok and full > cut and score(right, "length", p, cfg, rewards)[:1] == (cut,)
        assert score(right, "length", p, cfg.model_copy(update={"truncation": "none"}), rewards)[0] == full
    user = WeightedRewards({"user_rewards:shorter_is_better": 1.0})  # saying nothing is its best: no reward for the cut
    assert score(right, "length", p, cfg, user)[0] == score(right, "stop", p, cfg, user)[0] < 0
