"""A user reward module for the import-path test."""


def shorter_is_better(completion, reference):
    return -len(completion) / 100.0


_calls = {"n": 0}


def fails_on_rank_1(completion, reference):
    """Scores like shorter_is_better, but on rank 1 breaks at its 5th call (step 2: 3 samples a step) (mid-step, the other rank in a
    collective): the failure test of tests/test_distributed.py."""
    import os

    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 5:
        raise ValueError("the reward service is down")
    return -len(completion) / 100.0


def fails_on_rank_1_while_rank_0_is_busy(completion, reference):
    """As fails_on_rank_1, while rank 0 is busy in its own step-2 reward (its 7th call: 6 samples a step) until
    the launcher's SIGTERM ends it: rank 0 is in no collective when rank 1 exits, the window where a rank is
    ended before it has said the failing rank's line."""
    import os
    import time

    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 5:
        raise ValueError("the reward service is down")
    if os.environ.get("RANK") == "0" and _calls["n"] == 7:
        time.sleep(600)
    return -len(completion) / 100.0


def hangs_on_rank_1(completion, reference):
    """On rank 1 hangs at its 5th call (step 2), for longer than any test waits, while rank 0 waits in a collective."""
    import os
    import time

    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 5:
        time.sleep(600)
    return -len(completion) / 100.0


def flat_on_even_answers(completion, reference):
    """0 for every sample of a problem whose answer ends in an even digit (a group without reward variance:
    dynamic sampling drops it, balance keeps none of it), else shorter is better. Decided by the problem alone,
    so any number of ranks scores alike: the tests of statistics over the step in tests/test_distributed.py."""
    return 0.0 if reference.strip()[-1:] in "02468" else -len(completion) / 100.0


def flat(completion, reference):
    """The same reward for every sample: no group has reward variance."""
    return 0.0
