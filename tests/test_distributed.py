"""Training on N processes through `accelerate launch` (2 gloo ranks on CPU) equals one process: the same
losses step by step and the same weights within float tolerance, for sft (packed), dpo and rl (every
aggregation); a 2-process run killed mid-stage resumes, on 1 process; `--cpu` (one process) is refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _cmd(args, ranks: int, strategy: str = "ddp") -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "thinkforge", *args]
    how = ["--multi_gpu"] if strategy == "ddp" else ["--use_fsdp", "--fsdp_version", "2"]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(ranks),
            "--main_process_port", _port(), "-m", "thinkforge", *args]


def _launch(args, ranks: int, tmp_path, strategy: str = "ddp") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # the free port _port() found can be taken before the launcher's store binds it: again
        r = subprocess.run(_cmd(args, ranks, strategy), capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        if "address already in use" not in r.stderr.lower():
            break
    return r


def _run(args, ranks: int, tmp_path, strategy: str = "ddp") -> None:
    r = _launch(args, ranks, tmp_path, strategy)
    assert r.returncode == 0, r.stderr[-3000:]


def _kill_every_process_of(marker: str) -> None:
    """SIGKILL every process whose command line names `marker`, until none is left (a crash of the run)."""
    for _ in range(100):
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of {marker} would not die")


def _rows(run: Path, key: str) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if f'"{key}"' in x]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def _same(a: Path, b: Path, key: str, atol: float) -> None:
    ra, rb = _rows(a, key), _rows(b, key)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb, strict=True):
        assert x[key] == pytest.approx(y[key], abs=1e-5), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa, wb = _weights(a), _weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < atol


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist-data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    for args in (["data", "distill", "--out", "d.jsonl", "--problems", "24", "-n", "2"], ["data", "select", "d.jsonl", "--out", "sel"],
                 ["data", "pairs", "--rollouts", "d.jsonl", "-m", tiny_model, "--samples", "2", "--problems", "6",
                  "--out", "pairs.jsonl", "generation.max_new_tokens=8", "distill.difficulties=[1]"]):
        subprocess.run([sys.executable, "-m", "thinkforge", *args], check=True, capture_output=True, cwd=d, env=env)
    return d


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sft_packed_on_two_ranks_equals_one_process(tiny_model, data, tmp_path, strategy):
    args = ["midtrain", "--data", str(data / "sel" / "accepted.jsonl"), "-m", tiny_model,
            "midtrain.max_len=256", "midtrain.batch_size=2", "midtrain.grad_accum=3", "midtrain.epochs=2", "midtrain.optim.lr=1e-3"]
    _run([*args, "--out", "one"], 1, tmp_path)
    _run([*args, "--out", "two"], 2, tmp_path, strategy)
    _same(tmp_path / "one", tmp_path / "two", "loss", 1e-5)
    assert _rows(tmp_path / "one", "loss")[0]["tokens"] == _rows(tmp_path / "two", "loss")[0]["tokens"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dpo_on_two_ranks_equals_one_process(tiny_model, data, tmp_path, strategy):
    args = ["dpo", "--data", str(data / "pairs.jsonl"), "-m", tiny_model, "dpo.max_len=256", "dpo.batch_size=2",
            "dpo.grad_accum=2", "dpo.optim.lr=1e-3", "dpo.epochs=2"]
    _run([*args, "--out", "one"], 1, tmp_path)
    _run([*args, "--out", "two"], 2, tmp_path, strategy)
    _same(tmp_path / "one", tmp_path / "two", "loss", 2e-4)  # Adam at lr 1e-3 magnifies float-order noise


RL = ["rl", "--steps", "2", "rl.preflight=false", "rl.prompts_per_step=3", "rl.group_size=3", "rl.max_new_tokens=10",
      "rl.optim.lr=1e-3", "rl.reward=weighted", "rewards.weights={'user_rewards:shorter_is_better': 1.0}",
      "rl.truncation=none", "rl.micro_batch=4", "rl.temperature=1.0", "rl.temperature_start=null"]


# 3 prompts on 2 ranks: shares of 2 and 1 (uneven micro-batch counts, a rank that ends its rollouts first)


def _same_rl(one: Path, two: Path) -> None:
    _same(one, two, "pg_loss", 1e-4)
    for x, y in zip(_rows(one, "pg_loss"), _rows(two, "pg_loss"), strict=True):
        keys = ("reward", "kept_groups", "kept_samples", "response_tokens", "zero_variance_share")
        assert {k: x[k] for k in keys} == pytest.approx({k: y[k] for k in keys}, abs=1e-5)
        assert {k: v for k, v in x.items() if k.startswith("dropped_")} == {k: v for k, v in y.items() if k.startswith("dropped_")}
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-6)  # the reference (beta 0.04): whole, or sharded under FSDP2
    skipped = [[(e["step"], e["why"]) for e in _rows(run, "event") if e["event"] == "empty_batch"] for run in (one, two)]
    assert skipped[0] == skipped[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("agg,advantage", [("token", "grpo"), ("sequence", "rloo"), ("constant", "dr_grpo")])
def test_rl_on_two_ranks_equals_one_process(tiny_model, tmp_path, agg, advantage, strategy):
    """Each rank samples its share of the same global draw with the seeds one process uses: the same
    rollouts, the same normaliser after one all-reduce, the same update. Under FSDP2 every forward is a
    collective: the ranks generate their shares in lockstep (their samples end at different lengths), and
    the frozen reference is sharded too. Each aggregation runs with one of the group-local estimators
    (REINFORCE++, which looks beyond the group, has its own test below)."""
    args = [*RL, "-m", tiny_model, f"rl.loss_agg={agg}", f"rl.advantage={advantage}"]
    _run([*args, "--out", "one"], 1, tmp_path)
    _run([*args, "--out", "two"], 2, tmp_path, strategy)
    _same_rl(tmp_path / "one", tmp_path / "two")


FLAT_ON_EVEN = "rewards.weights={'user_rewards:flat_on_even_answers': 1.0}"  # about half the groups without variance


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_rl_statistics_over_the_step_on_two_ranks_equal_one_process(tiny_model, tmp_path, strategy):
    """Every switch that looks at more than one sample decides over the whole step, not over a rank's share
    (PITFALLS 23), in one run: REINFORCE++ whitens over every rank's samples; balance keeps the positive and
    negative samples one process keeps (the same draw over the step's advantages on each rank); dynamic
    sampling keeps the first groups of the global draw that have reward variance, on whichever rank sampled
    them (moved so that each rank trains on its contiguous share), refilling the flat ones it drops."""
    args = [*RL, "-m", tiny_model, "rl.advantage=reinforce_pp", "rl.balance=true", "rl.dynamic_sampling=true", FLAT_ON_EVEN]
    _run([*args, "--out", "one"], 1, tmp_path)
    _run([*args, "--out", "two"], 2, tmp_path, strategy)
    _same_rl(tmp_path / "one", tmp_path / "two")
    rows = _rows(tmp_path / "one", "pg_loss")
    assert sum(r.get("dropped_zero_variance", 0) for r in rows) > 0  # the filter dropped groups and refilled
    assert any(r["kept_samples"] < r["kept_groups"] * 3 for r in rows)  # balance left samples out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_rl_with_fewer_groups_than_ranks_and_steps_without_loss_tokens_equals_one_process(tiny_model, tmp_path, strategy):
    """One group a step on 2 ranks: rank 1 holds none and trains on a stand-in copy (it joins every collective
    and counts in nothing), so its share has no loss token on every step. Under balance a step whose group is
    flat has none at all: every rank skips it alike (decided from the count over the ranks), as one process
    does; the other steps train as one process does."""
    args = [*RL, "-m", tiny_model, "rl.prompts_per_step=1", "rl.group_size=4", "rl.balance=true", FLAT_ON_EVEN,
            "--steps", "4"]
    _run([*args, "--out", "one"], 1, tmp_path)
    _run([*args, "--out", "two"], 2, tmp_path, strategy)
    _same_rl(tmp_path / "one", tmp_path / "two")
    events = [e["event"] for e in _rows(tmp_path / "one", "event")]
    assert 0 < events.count("empty_batch") < 4 and len(_rows(tmp_path / "one", "pg_loss")) > 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ppo_on_two_ranks_equals_one_process(tiny_model, tmp_path, strategy):
    """PPO's value head (training the trunk too) is averaged over the ranks like the policy, its advantages
    whitened over the whole step, its loss normalised by the one all-reduce: the same values and updates."""
    args = [*RL, "-m", tiny_model, "rl.algo=ppo", "rl.value_trunk=true", "rl.mu=2"]
    _run([*args, "--out", "one"], 1, tmp_path)
    _run([*args, "--out", "two"], 2, tmp_path, strategy)
    _same_rl(tmp_path / "one", tmp_path / "two")
    for x, y in zip(_rows(tmp_path / "one", "value_loss"), _rows(tmp_path / "two", "value_loss"), strict=True):
        assert x["value_loss"] == pytest.approx(y["value_loss"], abs=1e-5) and x["value_loss"] > 0


def _kill_and_resume(args: list[str], tmp_path: Path, strategy: str, step: int, key: str, atol: float) -> None:
    """Run args straight on one process; on 2 ranks killed once checkpoint `step` exists, then resumed on one
    process: the same losses and weights."""
    _run([*args, "--out", "straight"], 1, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    cut = str(tmp_path / "cut")
    proc = subprocess.Popen(_cmd([*args, "--out", cut], 2, strategy), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # waits only as long as the run needs to get there
    while not any(int(p.name[5:]) >= step for p in (tmp_path / "cut").glob("step-*")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    _kill_every_process_of(cut)  # the launcher and both ranks (torch's launcher puts ranks in their own sessions)
    proc.wait()
    assert not (tmp_path / "cut" / "final").exists()
    _run([*args, "--out", cut], 1, tmp_path)
    rows = _rows(tmp_path / "cut", key)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # no step lost, none repeated
    _same(tmp_path / "straight", tmp_path / "cut", key, atol)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_two_rank_run_killed_mid_stage_resumes_on_one_process(tiny_model, data, tmp_path, strategy):
    """Checkpoints hold full weights and the optimizer state by parameter name: a sharded run resumes unsharded."""
    args = ["midtrain", "--data", str(data / "sel" / "accepted.jsonl"), "-m", tiny_model,
            "midtrain.max_len=128", "midtrain.batch_size=1", "midtrain.grad_accum=2", "midtrain.epochs=6",
            "midtrain.checkpoints.every=1", "midtrain.optim.lr=1e-3"]
    _kill_and_resume(args, tmp_path, strategy, 3, "loss", 1e-5)


def test_a_two_rank_fsdp2_ppo_run_killed_mid_stage_resumes_on_one_process(tiny_model, tmp_path):
    """An FSDP2 PPO checkpoint: full weights, the sharded optimizer state by name, the value head and its
    AdamW state (outside the sharded model) beside them: it resumes on one process where it stopped."""
    args = [*RL, "-m", tiny_model, "rl.algo=ppo", "rl.value_trunk=true", "rl.checkpoints.every=1"]
    args[args.index("2")] = "6"  # --steps
    _kill_and_resume(args, tmp_path, "fsdp2", 2, "pg_loss", 1e-4)


@pytest.mark.parametrize("reward", ["fails_on_rank_1", "fails_on_rank_1_while_rank_0_is_busy"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_rank_that_fails_mid_step_stops_every_rank_with_its_one_line(tiny_model, tmp_path, strategy, reward):
    """Rank 1's reward function raises in step 2 while rank 0 waits in a collective, or while rank 0 is still busy
    in its own reward function when rank 1 exits and the launcher ends it (SIGTERM): both ranks end with rank 1's
    one line and exit code (its traceback printed once, by rank 1), no gloo traceback, long before the collective
    timeout (1800 s: the run's whole time limit here is 300 s)."""
    args = [*RL, "-m", tiny_model, f"rewards.weights={{'user_rewards:{reward}': 1.0}}", "--out", "x"]
    r = _launch(args, 2, tmp_path, strategy)
    assert r.returncode != 0
    line = "thinkforge: error: rank 1: ValueError: the reward service is down"
    assert r.stderr.count(line) == 2, r.stderr[-3000:]  # each rank's last word
    assert r.stderr.count(f"in {reward}\n") == 1  # rank 1's own traceback, once; rank 0 prints none
    assert "Connection closed by peer" not in r.stderr and "[rank0]" not in r.stderr
    assert r.stderr.count("exitcode  : 1") == 2, r.stderr[-3000:]  # the launcher's summary: both ranks ended with code 1
    assert not (tmp_path / "x" / "final").exists()


def test_a_rank_that_hangs_ends_the_others_wait_at_the_collective_timeout(tiny_model, tmp_path):
    """Rank 1 hangs in its reward function (for 600 s): rank 0 waits collective_timeout in its collective, then
    stops with one line that says so; the launcher then ends rank 1, which says the same line. Nothing waits forever: the run ends within
    the test's 300 s. The timeout is 20 s, not less: the ranks' legitimate waits for each other on a loaded
    2-core machine (one rank's imports or rollouts behind the other's) must stay below it."""
    args = [*RL, "-m", tiny_model, "rewards.weights={'user_rewards:hangs_on_rank_1': 1.0}", "collective_timeout=20",
            "--out", "x"]
    r = _launch(args, 2, tmp_path)
    assert r.returncode != 0
    line = "thinkforge: error: rank 0: waited 20 s in a collective for the other ranks: one hangs or died"
    assert r.stderr.count(line) == 2, r.stderr[-3000:]  # rank 1, ended by the launcher in its hang, says it too
    assert "[rank0]" not in r.stderr and "Timed out waiting" not in r.stderr  # the line, not gloo's traceback


def test_a_config_error_before_the_ranks_join_ends_each_rank_with_one_line(tiny_model, tmp_path):
    """Both ranks refuse the recipe before any group exists (no store to share a line): the first to exit says
    the error, and the other says it too or, ended by the launcher first, a line pointing at it; no rank's traceback."""
    r = _launch([*RL, "-m", tiny_model, "rl.group_size=banana", "--out", "x"], 2, tmp_path)
    assert r.returncode != 0
    said = [x for x in r.stderr.splitlines() if x.startswith("thinkforge: error:")]
    assert len(said) == 2 and any("rl.group_size" in x for x in said), r.stderr[-3000:]
    assert all("rl.group_size" in x or "ended by the launcher (SIGTERM): another rank ended first" in x for x in said)
    assert str(ROOT / "thinkforge") not in r.stderr  # no frame of ours: no rank printed a traceback (the launcher does)


def test_accelerate_cpu_launch_starts_one_process_and_is_refused(tiny_model, data, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--main_process_port",
           _port(), "-m", "thinkforge", "sft", "--data", str(data / "sel" / "accepted.jsonl"), "-m", tiny_model, "--out", "x"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert "thinkforge: error: accelerate launch --cpu starts a single process" in r.stderr
    assert not (tmp_path / "x" / "final").exists()
