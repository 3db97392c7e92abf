"""The command line: --help everywhere, and bad input is one line, exit 2, no traceback, nothing written."""

import json
import subprocess
import sys

import click
import pytest
from conftest import run_cli

from thinkforge.cli import cli

COMMANDS = ["eval", "compare", "grade", "generate", "chat", "serve", "init-model", "midtrain", "sft", "data distill",
            "data select", "data pairs", "dpo", "rl"]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_explains_every_option(name, capsys):
    code, out, _ = run_cli([*name.split(), "--help"], capsys)
    assert code == 0 and "Usage: thinkforge" in out
    command = cli
    for part in name.split():
        command = command.commands[part]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:  # hidden: a removed option's pointer
            assert param.help, f"{name} {param.opts} has no help"
            assert param.opts[0] in out


def _bad(args, capsys, expect):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expect in err
    return err


def test_malformed_jsonl_line(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"completion": "<answer>1</answer>", "reference": "1"}\n{"completion": oops}\n')
    _bad(["grade", str(src), "--out", str(out)], capsys, "in.jsonl:2: not valid JSON")
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))


def test_missing_column(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"completion": "x"}\n')
    _bad(["grade", str(src), "--out", str(out)], capsys, "missing column 'reference'")
    assert not out.exists()


def test_unknown_benchmark_fails_before_loading_a_model(tmp_path, capsys):
    _bad(["eval", "-m", str(tmp_path / "no-model"), "-b", "gsm9k"], capsys, "unknown task 'gsm9k'; did you mean 'gsm8k'?")


def test_config_typo(tiny_model, capsys):
    _bad(["eval", "-m", tiny_model, "generation.max_new_tokns=3"], capsys, "did you mean 'generation.max_new_tokens'")


def test_missing_model_folder(tmp_path, capsys):
    _bad(["generate", "-m", str(tmp_path / "missing"), "-p", "hi"], capsys, "model folder")


def test_missing_recipe(tmp_path, capsys):
    _bad(["eval", "--config", str(tmp_path / "nope.yaml")], capsys, "recipe")


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "thinkforge", "grade", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_generate_writes_jsonl(tiny_model, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    code, stdout, err = run_cli(["generate", "-m", tiny_model, "-p", "Mia has 3 apples.", "-p", "Leo has 2 books.",
                                 "-n", "2", "--max-new-tokens", "6", "--out", str(out)], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["Mia has 3 apples."] * 2 + ["Leo has 2 books."] * 2
    assert set(rows[0]) >= {"completion", "thinking", "answer", "format_ok", "finish_reason"}


def test_generate_shows_the_raw_output_when_the_format_is_missing(tiny_model, tmp_path, capsys):
    """Printed without --out: a completion outside the format is shown whole, not only as 'answer: None'."""
    code, stdout, err = run_cli(["generate", "-m", tiny_model, "-p", "Mia has 3 apples.", "--max-new-tokens", "6",
                                 "--temperature", "0"], capsys)
    assert code == 0, err
    saved = tmp_path / "g.jsonl"
    run_cli(["generate", "-m", tiny_model, "-p", "Mia has 3 apples.", "--max-new-tokens", "6", "--temperature", "0",
             "--out", str(saved)], capsys)
    row = json.loads(saved.read_text())
    assert not row["format_ok"] and row["completion"].strip()
    assert "output:   " + row["completion"].strip() in click.unstyle(stdout)


def test_chat_streams_thinking_and_answer_apart():
    from thinkforge.cli import _ThinkingPrinter

    shown = []
    printer = _ThinkingPrinter(lambda text, nl=True: shown.append(click.unstyle(text) + ("\n" if nl else "")))
    for piece in ["<thi", "nk>2 + 2", " = 4</th", "ink><answer>", "4</answer>"]:
        printer.feed(piece)
    printer.close()
    assert "".join(shown) == "\n[thinking]\n2 + 2 = 4\n[answer]\n4\n"


def test_chat_command_reads_questions_from_stdin(tiny_model):
    r = subprocess.run([sys.executable, "-m", "thinkforge", "chat", "-m", tiny_model, "--max-new-tokens", "5"],
                       input="Mia has 3 apples.\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_chat_keeps_the_conversation_and_reset_clears_it(tiny_model, capsys, monkeypatch):
    import io

    from thinkforge.rollout.hf import HFGenerator

    seen = []

    def stream(self, prompt, params):
        seen.append(prompt)
        yield f"<think>turn {len(seen)}</think><answer>{len(seen)}</answer>"

    monkeypatch.setattr(HFGenerator, "stream", stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Mia has 3 apples.\nAnd Leo?\n/reset\nBen has 2.\n"))
    code, out, err = run_cli(["chat", "-m", tiny_model, "--system-prompt", "Be brief."], capsys)
    assert code == 0, err
    assert len(seen) == 3 and all("Be brief." in p for p in seen)
    assert "Mia has 3 apples." in seen[1] and "<answer>1</answer>" in seen[1] and "And Leo?" in seen[1]
    assert "Mia" not in seen[2] and "Leo" not in seen[2] and "Ben has 2." in seen[2]
    assert "a new conversation" in out


def test_data_help_names_every_subcommand(capsys):
    code, out, _ = run_cli(["data", "--help"], capsys)
    summary = out.split("Options:")[0]
    assert code == 0 and all(f"({name})" in summary for name in ("distill", "select", "pairs"))


def test_init_model_cli(tmp_path, capsys):
    code, out, _ = run_cli(["init-model", str(tmp_path / "m"), "--arch", "qwen2", "--hidden", "32", "--heads", "2"], capsys)
    assert code == 0 and (tmp_path / "m" / "config.json").is_file()
    _bad(["init-model", str(tmp_path / "n"), "--hidden", "30", "--heads", "4"], capsys, "not divisible")


def test_distill_select_sft_from_the_command_line(tiny_model, tmp_path, capsys):
    d, sel, run = tmp_path / "d.jsonl", tmp_path / "sel", tmp_path / "run"
    code, out, err = run_cli(["data", "distill", "--out", str(d), "--problems", "20", "-n", "2"], capsys)
    assert code == 0 and "40 new rollouts" in out, err
    code, out, err = run_cli(["data", "select", str(d), "--out", str(sel), "--max-pass-rate", "0.5"], capsys)
    assert code == 0 and (sel / "accepted.jsonl").is_file(), err
    code, out, err = run_cli(["midtrain", "--data", str(sel / "accepted.jsonl"), "-m", tiny_model,
                              "--out", str(run), "midtrain.max_len=256", "midtrain.batch_size=2",
                              "midtrain.grad_accum=1", "midtrain.epochs=1"], capsys)
    assert code == 0 and (run / "final" / "config.json").is_file() and (run / "config.yaml").is_file(), err
    _bad(["sft", "--out", str(tmp_path / "x"), "-m", tiny_model], capsys, "sft.data is not set")


def test_pairs_and_dpo_from_the_command_line(tiny_model, tmp_path, capsys):
    d, p, run = tmp_path / "d.jsonl", tmp_path / "pairs.jsonl", tmp_path / "dpo"
    assert run_cli(["data", "distill", "--out", str(d), "--problems", "10", "-n", "4", "--slip-rate", "0.5"], capsys)[0] == 0
    code, out, err = run_cli(["data", "pairs", "--rollouts", str(d), "-m", tiny_model, "--samples", "2",
                              "--problems", "3", "--out", str(p), "generation.max_new_tokens=8"], capsys)
    assert code == 0 and "pairs ->" in out, err
    policy = [json.loads(x) for x in p.with_suffix(".policy-rollouts.jsonl").read_text().splitlines()]
    assert len(policy) == 6 and {r["teacher"] for r in policy} == {"policy"}
    # sampled at pairs.temperature (1.0), not at the greedy generation.temperature: a problem's samples differ
    by_problem: dict = {}
    for r in policy:
        by_problem.setdefault(r["problem_id"], []).append(r["completion"])
    assert any(len(set(c)) > 1 for c in by_problem.values())
    code, out, err = run_cli(["dpo", "--data", str(p), "-m", tiny_model, "--out", str(run), "dpo.max_len=256",
                              "dpo.batch_size=2", "dpo.grad_accum=1"], capsys)
    assert code == 0 and (run / "final" / "config.json").is_file(), err


@pytest.mark.parametrize("settings", [["rl.policy_loss=gspo", "rl.loss_agg=sequence", "rl.clip_low=3e-4", "rl.clip_high=4e-4"],
                                      ["rl.policy_loss=cispo", "rl.clip_high=5.0"], ["rl.advantage=rloo"],
                                      ["rl.advantage=reinforce_pp", "rl.loss_agg=token"]],
                         ids=["gspo", "cispo", "rloo", "reinforce_pp"])
def test_each_estimator_and_policy_loss_runs_two_steps_of_rl(tiny_model, tmp_path, capsys, settings):
    out = tmp_path / "rl"
    code, stdout, err = run_cli(["rl", "-m", tiny_model, "--out", str(out), "--steps", "2", "rl.preflight=false", "rl.prompts_per_step=2",
                                 "rl.group_size=3", "rl.max_new_tokens=8", "rl.optim.lr=1e-3", "rl.reward=weighted",
                                 "rewards.weights={'user_rewards:shorter_is_better': 1.0}", "rl.truncation=none",
                                 *settings], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"pg_loss"' in x]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    assert (out / "final" / "config.json").is_file()
    saved = (out / "config.yaml").read_text()
    assert all(f"{s.split('=')[0].split('.')[1]}: " in saved for s in settings)


@pytest.mark.parametrize("command", ["grade", "select", "pairs", "sft", "generate"])
def test_a_binary_or_empty_input_file_is_one_line(tiny_model, tmp_path, capsys, command):
    """Non-UTF-8 bytes and files without rows end in one line and exit 2 for every command that reads JSONL
    (an empty file used to 'succeed' with 0/0 for grade, data select and data pairs)."""
    binary, empty = tmp_path / "bin.jsonl", tmp_path / "empty.jsonl"
    binary.write_bytes(b'{"completion": "a"}\n\xff\xfe\x00\x81 not text\n')
    empty.write_text("\n")
    args = {"grade": ["grade", "{}", "--out", str(tmp_path / "o.jsonl")],
            "select": ["data", "select", "{}", "--out", str(tmp_path / "sel")],
            "pairs": ["data", "pairs", "--rollouts", "{}", "--out", str(tmp_path / "p.jsonl")],
            "sft": ["sft", "--data", "{}", "-m", tiny_model, "--out", str(tmp_path / "run")],
            "generate": ["generate", "-m", tiny_model, "--input", "{}"]}[command]
    _bad([a.replace("{}", str(binary)) for a in args], capsys, "not UTF-8 text")
    err = _bad([a.replace("{}", str(empty)) for a in args], capsys, str(empty))
    assert "no rows" in err or "no training rows" in err or "nothing to generate" in err


def test_rl_data_is_a_local_prompts_file_recorded_in_the_run_folder(tiny_model, tmp_path, capsys):
    """`thinkforge rl --data FILE` trains on FILE's prompts, and the saved config says so (rl.data_path and
    rl.source=local): a rerun without --data resumes on the same prompts."""
    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                               for i in range(1, 9)))
    out = tmp_path / "rl"
    code, _, err = run_cli(["rl", "-m", tiny_model, "--out", str(out), "--data", str(prompts), "--steps", "1", "rl.preflight=false",
                            "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8", "rl.truncation=none",
                            "rl.drop_easy=false"], capsys)
    assert code == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())["rl"]
    assert (saved["data_path"], saved["source"]) == (str(prompts), "local")
    assert any('"reward"' in x for x in (out / "metrics.jsonl").read_text().splitlines())
    bad = tmp_path / "bad.jsonl"  # and it is FILE that is read: one without questions is refused by name
    bad.write_text(json.dumps({"text": "no question here"}) + "\n")
    code, _, err = run_cli(["rl", "-m", tiny_model, "--out", str(tmp_path / "rl2"), "--data", str(bad), "--steps", "1"], capsys)
    assert code == 2 and "bad.jsonl" in err, err
