"""Promises held at the system boundary, one test per class: full and read-only disks, unreachable endpoints
and hubs, file modes under the umask, a run folder two processes want, and the leftovers of a failed start."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _cli(args, env=None, timeout=120):
    """The real process: exit code and stderr."""
    r = subprocess.run([sys.executable, "-m", "thinkforge", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, cwd=ROOT)
    return r.returncode, r.stderr


def _one_line(code, err, *words):
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip() and "|" not in x.split("\r")[-1]]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("thinkforge: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "64k", readonly: bool = False):
    """A small tmpfs at `path` (full or read-only disks for real); skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _rows(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"completion": f"<answer>{i}</answer>", "reference": str(i)}) + "\n"
                            for i in range(n)))
    return path


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    with _tmpfs(tmp_path / "full") as full:
        code, err = _cli(["init-model", str(full / "model")])
        _one_line(code, err, "no space left", "--out")
        assert list(full.iterdir()) == []  # no temporary folder, no half model
        code, err = _cli(["grade", str(_rows(tmp_path / "in.jsonl", 5000)), "--out", str(full / "graded.jsonl")])
        _one_line(code, err, "no space left")
        assert list(full.iterdir()) == []


def test_a_read_only_output_is_one_line(tmp_path):
    with _tmpfs(tmp_path / "ro", readonly=True) as ro:
        code, err = _cli(["grade", str(_rows(tmp_path / "in.jsonl")), "--out", str(ro / "graded.jsonl")])
        _one_line(code, err, "read-only", str(ro))
        code, err = _cli(["init-model", str(ro / "model")])
        _one_line(code, err, "read-only")


def test_an_unreachable_endpoint_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["data", "distill", "--out", str(tmp_path / "d.jsonl"), "--teacher", "openai",
                            "--teacher-model", "m", "--base-url", "http://127.0.0.1:9/v1", "--problems", "1",
                            "distill.max_retries=0"], capsys)
    _one_line(code, err, "127.0.0.1:9", "is the server running")


def test_a_hub_id_offline_fails_fast_and_quietly(tmp_path):
    import time

    code, err = _cli(["eval", "-m", "some-org/not-cached-model", "--out", str(tmp_path)], {"HF_HUB_OFFLINE": "1"})
    _one_line(code, err, "not in the local Hugging Face cache")
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    t0 = time.time()
    code, err = _cli(["eval", "-m", "some-org/not-cached-model", "--out", str(tmp_path)], env)
    _one_line(code, err, "cannot reach the Hugging Face Hub")
    # The promise: one 5 s connection check, not the hub client's retries with back-off. The margin is the
    # process's start (torch, transformers) on a loaded 2-core machine.
    assert time.time() - t0 < 5 + 55


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    script = (f"import os, sys; os.umask({umask}); from thinkforge.cli import main; "
              f"sys.argv = ['thinkforge'] + sys.argv[1:]; main(sys.argv[1:])")
    for args in (["init-model", str(tmp_path / "model")],
                 ["grade", str(_rows(tmp_path / "in.jsonl")), "--out", str(tmp_path / "graded.jsonl")]):
        r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "graded.jsonl").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode
    for f in (tmp_path / "model").iterdir():
        assert f.stat().st_mode & 0o777 == file_mode, f


def test_a_run_folder_held_by_another_process_is_refused(tiny_model, tmp_path, capsys):
    from thinkforge.io import run_folder

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "completion": "<think>1 + 1 = 2</think><answer>2</answer>"}) + "\n")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from thinkforge.io import run_folder\n"
                               f"with run_folder({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(["sft", "-m", tiny_model, "--data", str(data), "--out", str(out), "sft.max_steps=1"], capsys)
        _one_line(code, err, "being written by another thinkforge process", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    with run_folder(out):  # free again once the holder is gone (the kernel drops a dead process's lock)
        pass


def test_a_failed_start_leaves_no_folder(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')  # no completion column
    out = tmp_path / "sft-run"
    code, _, err = run_cli(["sft", "-m", tiny_model, "--data", str(bad), "--out", str(out)], capsys)
    _one_line(code, err, "completion")
    assert not out.exists()


def test_no_dpo_pairs_is_an_error_that_leaves_no_empty_pairs_file(tiny_model, tmp_path, capsys):
    """A run whose policy never has both a right and a wrong sample: one line, and no empty pairs.jsonl that
    would make every rerun fail the same way."""
    out = tmp_path / "run"
    args = ["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out), f"model.name_or_path={tiny_model}",
            "init=null", "pipeline.stages=[distill,dpo]", "distill.n_problems=8", "eval.limit=4", "synthetic.n_test=4",
            "pipeline.policy_problems=2", "pairs.policy_samples=2", "generation.max_new_tokens=4", "eval.samples=1"]
    code, _, err = run_cli(args, capsys)
    _one_line(code, err, "no DPO pairs")
    assert not (out / "data" / "pairs.jsonl").exists() and not (out / "dpo").exists()
    state = json.loads((out / "state.json").read_text())  # what a rerun resumes from stays ...
    assert "base" in state["stages"] and state["seconds"] > 0  # ... with this failed invocation's time counted


def test_tensorboard_has_one_point_per_step_after_a_resume(tmp_path):
    """Killed after step 3 with its checkpoint at step 2: the resumed run logs 3 again; readers see it once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from thinkforge.train.loop import Metrics

    first = Metrics(tmp_path)
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = Metrics(tmp_path, resume_step=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("loss")]
    assert points == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
