"""`thinkforge run` end to end on a minimal recipe, and a run killed mid-stage that resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAST = [
    "init.hidden=32", "init.layers=1", "init.heads=2", "eval.limit=12", "generation.max_new_tokens=48",
    "distill.n_problems=40", "distill.samples=2", "midtrain.epochs=1", "midtrain.max_len=512",
    "sft.epochs=1", "pipeline.policy_problems=6", "pairs.policy_samples=2", "dpo.batch_size=4", "dpo.grad_accum=1",
    "rl.steps=2", "rl.preflight=false", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=24", "rl.checkpoints.every=1",
    "rl.anneal_steps=1", "pipeline.pair_sources=[policy,teacher]",  # an untrained model has no correct rollouts of its own
]


@pytest.mark.slow
def test_run_produces_summary_report_card_and_a_loadable_model(tmp_path, capsys):
    from conftest import run_cli

    from thinkforge.evaluate import t_quantile

    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out), *FAST], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["base", "midtrain", "sft", "dpo", "rl"]
    for s in summary["stages"]:
        assert set(s) >= {"name", "accuracy", "format_rate", "reasoning_rate", "avg_think_words", "n"}
    assert summary["wall_seconds"] > 0 and summary["example_question"]
    for above, s in zip(summary["stages"], summary["stages"][1:], strict=False):  # each stage's gain, paired by problem
        assert s["change"]["change"] == pytest.approx(s["accuracy"] - above["accuracy"], abs=1e-9)
        # the interval from the two stages' samples files by hand: per-problem differences, their standard error
        shares = []
        for name in (above["name"], s["name"]):
            by: dict = {}
            for r in (json.loads(x) for x in (out / name / "eval" / "synthetic.samples.jsonl").read_text().splitlines()):
                by.setdefault(r["problem_id"], []).append(r["correct"])
            shares.append({k: sum(v) / len(v) for k, v in by.items()})
        d = [shares[1][k] - shares[0][k] for k in shares[0]]
        mean = sum(d) / len(d)
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5 / len(d) ** 0.5
        t = t_quantile(0.975, len(d) - 1)  # Student's t, not z = 1.96
        assert s["change"]["ci95"] == pytest.approx([mean - t * se, mean + t * se], abs=1e-9)
        assert (s["change"]["gained"], s["change"]["lost"]) == (sum(x > 0 for x in d), sum(x < 0 for x in d))
    assert "| +RLVR |" in stdout and "| base |" in stdout
    report = (out / "report.md").read_text()
    assert "staircase.png" in report and (out / "staircase.png").is_file() and (out / "rl_curves.png").is_file()
    final = Path(summary["final_model"])
    card = (final / "README.md").read_text()
    assert "## How to get started" in card and "| +rollout DPO |" in card and "thinkforge export" in card
    flat = " ".join(card.split())
    assert "This model is a phi3 model, written as llama.cpp's phi3" in flat and "phi (as llama.cpp's phi2)" in flat
    header = card.split("---\n")[1]  # the Hub's YAML metadata
    assert "library_name: transformers" in header and "- thinkforge" in header and "license:" in header
    assert f'base_model: "{out / "base-model"}"' in header  # absolute: the card works from anywhere
    steps = max(json.loads(x)["step"] for x in (out / "rl" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)
    assert f"ran {steps} optimizer steps, sampling temperature 1 -> " in card  # the schedule that ran
    assert all(s.get("ci95") and s["ci95"][0] <= s["accuracy"] <= s["ci95"][1] for s in summary["stages"])

    # The card's snippet runs with plain transformers and answers.
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace("max_new_tokens=48", "max_new_tokens=8")
    r = subprocess.run([sys.executable, "-c", snippet + "\nprint(repr(prompt))"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert r.returncode == 0, r.stderr
    # ... with the prompt (system prompt included) that training and evaluation used
    from thinkforge.config import load_config
    from thinkforge.formats import render_prompt
    from thinkforge.models import load_tokenizer

    system = load_config(str(out / "config.yaml"), []).model.system_prompt  # the recipe's ("Solve it step by step.")
    trained = render_prompt(summary["example_question"], "auto", system, load_tokenizer(str(final)))
    assert r.stdout.strip().splitlines()[-1] == repr(trained)

    # A rerun skips everything that is finished: no stage's file is written again (the final model's card is: it
    # carries the run's summary, which the end of every run writes)
    def stage_files():
        return {f: f.stat().st_mtime_ns for f in out.glob("*/**/*") if f.is_file() and f != final / "README.md"}

    before = stage_files()
    code, _, _ = run_cli(["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out), *FAST], capsys)
    after = stage_files()
    assert code == 0 and after == before, sorted(str(f.relative_to(out)) for f in after if after[f] != before.get(f))


@pytest.mark.slow
def test_a_run_killed_mid_stage_resumes_and_finishes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "thinkforge", "run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out), *FAST,
           "midtrain.checkpoints.every=1", "midtrain.epochs=20", "midtrain.max_len=128", "midtrain.batch_size=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # waits only as long as the run needs to get there
    def checkpointed():  # at least 3 steps done (older checkpoints are pruned, so look at any)
        return any(int(p.name[5:]) >= 3 for p in (out / "midtrain").glob("step-*"))

    while not checkpointed() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "midtrain" / "final").exists()
    steps_before = len(list((out / "midtrain").glob("step-*")))
    assert steps_before >= 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["base", "midtrain", "sft", "dpo", "rl"]
    metrics = [json.loads(x) for x in (out / "midtrain" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))  # no step lost, none repeated


def test_running_mean_of_the_rl_curves():
    from thinkforge.report import running_mean

    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], 5) == [2.0, 3.0]


@pytest.mark.slow
def test_a_rerun_with_another_recipe_redoes_the_evaluations_or_refuses_stale_stages(tmp_path, capsys):
    """state.json recorded a step by name only: changing eval.limit after the base evaluation mixed two
    protocols in one stage table. A changed protocol now re-evaluates every finished step; a changed
    training input is refused in one line (the step and those after it would be stale)."""
    from conftest import run_cli

    out = tmp_path / "run"
    few = [*FAST, "pipeline.stages=[distill,midtrain]", "midtrain.max_len=128"]
    code, _, err = run_cli(["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out), *few], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out), *few, "eval.limit=20"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [s["n"] for s in summary["stages"]] == [20, 20]
    rows = [json.loads(x) for x in (out / "midtrain" / "eval" / "synthetic.samples.jsonl").read_text().splitlines()]
    assert len({r["problem_id"] for r in rows}) == 20
    code, _, err = run_cli(["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out), *few, "eval.limit=20",
                            "midtrain.optim.lr=0.01"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the finished midtrain step was made from another recipe than this one (changed: midtrain)" in err


def test_what_a_step_is_made_from_leaves_out_how_it_ran_and_names_the_steps_before_it():
    """A rerun refuses a stale step by these fingerprints: how a run executes (device, checkpointing) and the
    evaluation's sampling are not stage inputs; a stage inserted before a finished one is."""
    from thinkforge.config import load_config
    from thinkforge.pipeline import EVAL_INPUTS, fingerprint, stage_inputs

    base = load_config(ROOT / "recipes" / "tiny.yaml")
    for harmless, step in ((["model.device=cpu"], "rl"), (["model.gradient_checkpointing=true"], "rl"),
                           (["generation.temperature=0.8"], "rl"), (["dpo.optim.lr=1e-6"], "pairs")):
        assert stage_inputs(load_config(ROOT / "recipes" / "tiny.yaml", harmless), step) == stage_inputs(base, step), harmless
    assert fingerprint(load_config(ROOT / "recipes" / "tiny.yaml", ["generation.temperature=0.8"]), EVAL_INPUTS) != \
        fingerprint(base, EVAL_INPUTS)  # an evaluation input: the evaluations are redone
    fewer = load_config(ROOT / "recipes" / "tiny.yaml", ["pipeline.stages=[distill,sft,dpo,rl]"])
    assert stage_inputs(fewer, "sft")["steps"] != stage_inputs(base, "sft")["steps"]
    assert stage_inputs(load_config(ROOT / "recipes" / "tiny.yaml", ["sft.optim.lr=1e-3"]), "rl") != stage_inputs(base, "rl")


def test_a_run_finished_before_the_nested_optimizer_schema_still_resumes(tmp_path):
    """The fingerprint of the tiny recipe's RL step as 879909c (flat sft.lr, rl.save_every) recorded it: a run
    folder made then is not judged stale by a release that nests optim/checkpoints; and its config.yaml loads
    (the flat keys read as their new names, with a warning)."""
    import hashlib

    from thinkforge.config import load_config
    from thinkforge.pipeline import stage_inputs

    recipe = load_config(ROOT / "recipes" / "tiny.yaml")
    made_from = stage_inputs(recipe, "rl")
    assert hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16] == "fb60f5948cd7378b"
    assert stage_inputs(load_config(ROOT / "recipes" / "tiny.yaml", ["rl.head_chunk=64"]), "rl") == made_from
    assert stage_inputs(load_config(ROOT / "recipes" / "tiny.yaml", ["rl.entropy_every=5"]), "rl") == made_from
    old = tmp_path / "config.yaml"
    old.write_text("sft: {lr: 0.0005, warmup_ratio: 0.03, save_every: 0, keep_checkpoints: 2, clip: 1.0}\n")
    with pytest.warns(FutureWarning, match="'sft.lr' is now 'sft.optim.lr'"):
        loaded = load_config(old)
    assert (loaded.sft.optim.lr, loaded.sft.optim.warmup_ratio, loaded.sft.checkpoints.every) == (5e-4, 0.03, 0)


def test_every_benchmark_gets_its_own_paired_change_per_stage_in_the_stage_table(tmp_path):
    """With several benchmarks the stage table read only the first: the others' gains were in no table. Each one's
    change is now paired by problem with the same benchmark at the stage above."""
    from thinkforge.config import load_config
    from thinkforge.evaluate import file_stem
    from thinkforge.pipeline import Run, stage_rows
    from thinkforge.report import stage_table

    recipe = load_config(None, ["pipeline.stages=[sft]", "eval.benchmarks=[synthetic, gsm8k]"])
    run = Run(tmp_path)
    right = {"synthetic": ([0] * 10, [1] * 5 + [0] * 5), "gsm8k": ([1] * 10, [1] * 8 + [0] * 2)}  # base, sft
    for i, stage in enumerate(["base", "sft"]):
        ev = {}
        for bench, per_stage in right.items():
            rows = [{"problem_id": f"p{j}", "correct": bool(c)} for j, c in enumerate(per_stage[i])]
            folder = tmp_path / stage / "eval"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{file_stem(bench)}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            ev[bench] = {"accuracy": sum(per_stage[i]) / 10, "format_rate": 0.0, "reasoning_rate": 0.0,
                         "avg_think_words": 0.0, "n": 10}
        run.record(stage, model=stage, eval=ev)
    rows = stage_rows(recipe, tmp_path, run)
    assert [r["benchmarks"]["gsm8k"].get("change", {}).get("change") for r in rows] == [None, pytest.approx(-0.2)]
    assert rows[1]["change"]["change"] == pytest.approx(0.5) and rows[1]["benchmarks"]["synthetic"]["change"] == rows[1]["change"]
    table = stage_table({"stages": rows})
    assert "| stage | synthetic (n 10) | gsm8k (n 10) |" in table
    assert table.splitlines()[-1].startswith("| +fine-tuning | 50.0 +50.0 (") and " | 80.0 -20.0 (" in table.splitlines()[-1]


def test_an_unfinished_distillation_resumed_with_other_settings_is_refused_not_mixed(tmp_path):
    """A killed distillation resumes by appending: rollouts of the first form and of another (a rewrite, another
    teacher prompt) would share one file silently. Resuming with the same settings goes on; with others, one line."""
    from thinkforge.config import load_config
    from thinkforge.errors import UserError
    from thinkforge.pipeline import _rollouts_made_from

    rollouts = tmp_path / "data" / "rollouts.jsonl"
    first = load_config(None, ["distill.teacher=hf", "distill.teacher_model=some-model"])
    _rollouts_made_from(first, rollouts)
    rollouts.write_text('{"problem_id": "p"}\n')
    _rollouts_made_from(first, rollouts)  # the same settings: resumes
    _rollouts_made_from(load_config(None, ["distill.teacher=hf", "distill.teacher_model=some-model", "select.min_words=3"]),
                        rollouts)  # selection happens after: the rollouts are the same
    served = ["distill.teacher=openai", "distill.teacher_model=m", "distill.base_url=http://127.0.0.1:1/v1"]
    other = tmp_path / "other" / "rollouts.jsonl"
    _rollouts_made_from(load_config(None, served), other)
    other.write_text('{"problem_id": "p"}\n')  # resumed against a restarted server, more patiently: the same rollouts
    _rollouts_made_from(load_config(None, [*served[:2], "distill.base_url=http://127.0.0.1:2/v1", "distill.concurrency=2",
                                           "distill.timeout=900"]), other)
    for change in ("distill.rewrite=think_answer", "model.system_prompt=Be brief."):
        with pytest.raises(UserError, match=r"unfinished distillation made from other settings \(changed: (distill|model)"):
            _rollouts_made_from(load_config(None, ["distill.teacher=hf", "distill.teacher_model=some-model", change]), rollouts)


def test_the_seed_table_script_gives_each_benchmark_its_own_table(tmp_path, capsys):
    """dev/stage_table.py over runs that evaluated several benchmarks: the first benchmark's table as before, then
    one table per benchmark with its own paired changes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_table", ROOT / "dev" / "stage_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    change = {"change": 0.05, "ci95": [0.01, 0.09]}
    for seed in (0, 1):
        for i, name in enumerate(["base", "rl"]):  # each benchmark's 10 items: 1, then 3 of them right
            (tmp_path / f"s{seed}" / name / "eval").mkdir(parents=True)
            for b in ("rg-a", "rg-b"):
                rows = [{"problem_id": f"p{j}", "correct": j < 1 + 2 * i} for j in range(10)]
                (tmp_path / f"s{seed}" / name / "eval" / f"{b}.samples.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows))
        stages = [{"name": name, "label": label, "accuracy": 0.1 + i / 10, "format_rate": 0.0, "avg_think_words": 0.0,
                   **({"change": change} if i else {}),
                   "benchmarks": {b: {"accuracy": 0.2 + i / 10 + seed / 100, **({"change": change} if i else {})}
                                  for b in ("rg:a", "rg:b")}} for i, (name, label) in enumerate([("base", "base"),
                                                                                               ("rl", "+RLVR")])]
        (tmp_path / f"s{seed}" / "summary.json").write_text(json.dumps({"stages": stages, "wall_seconds": 60.0}))
    script.main([str(tmp_path / "s0"), str(tmp_path / "s1")], pool=["rg:a", "rg:b"])
    out = capsys.readouterr().out
    assert "rg:a + rg:b, pooled" in out and "| +RLVR | 30.0 (+20.0; +" in out  # 20 items: 2 then 6 right
    assert "| +RLVR | 20.0 (+5.0; +1.0 to +9.0); format 0, think 0 words |" in out
    assert "rg:b: accuracy %" in out and "| +RLVR | 30.0 (+5.0; +1.0 to +9.0) | 31.0 (+5.0; +1.0 to +9.0) |" in out


def test_the_cards_llama_cpp_section_for_a_hub_base_and_an_architecture_without_gguf(tmp_path):
    """An adapter on a Hub base (no local config to read) still gets the export commands; a local model of an
    architecture the exporter does not write is told so instead of being given a command that fails."""
    from pathlib import Path

    from thinkforge.report import _gguf_section

    hub = _gguf_section(Path("runs/x/final"), "microsoft/phi-2", True, None)
    assert "thinkforge export runs/x/final --gguf final.gguf" in hub and "(None)" not in hub
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    other = _gguf_section(tmp_path, tmp_path, False, None)
    assert "this model's architecture (gpt2) is not among them yet" in other and "llama-cli" not in other
    (tmp_path / "config.json").write_text('{"model_type": "phi3"}')  # Phi-3-mini: a SentencePiece-style tokenizer
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}, "decoder": {"type": "Sequence", "decoders": '
                                             '[{"type": "Replace"}, {"type": "ByteFallback"}, {"type": "Fuse"}]}}')
    sentencepiece = _gguf_section(tmp_path, tmp_path, False, None)
    assert "writes byte-level BPE tokenizers" in sentencepiece and "llama-cli" not in sentencepiece
