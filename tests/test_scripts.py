"""Every script in benchmarks/ and dev/ runs at its smallest size, as a user runs it: its own process, exit code
0, and its last line is its result (PITFALLS 24: the RL preflight broke benchmarks/grpo_vs_trl.py, which nothing
ran, and its figure outlived it). A new script needs an entry in SMOKE; a one-off experiment is kept in git and
named by its commit in dev/LOG.md instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import engine_python

ROOT = Path(__file__).resolve().parent.parent
N = r"[+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?"  # a number (never NaN or null)


@dataclass(frozen=True)
class Smoke:
    args: tuple[str, ...]  # after the script; {llama}, {run} and {scratch} are folders made below (fixtures of those names)
    result: str  # a regex the last line of stdout matches in full
    also: tuple[str, ...] = ()  # regexes found somewhere in stdout
    needs: tuple[str, ...] = ()  # the engine venvs `make test` builds first: llama-cpp, vllm


def _json(metric: str, *fields: str) -> str:
    return re.escape(f'{{"metric": "{metric}"') + "".join(f', "{f}": {N}' for f in fields) + r"\}"


SMOKE = {
    "benchmarks/compile_train.py": Smoke(
        ("--tiny",), r'\{"metric": "compiled_training", ' + ", ".join(
            f'"{k}": ' + r'\{"eager": ' + N + ', "compiled": ' + N + ', "first_call_s": ' + N + r"\}"
            for k in ("sft", "dpo", "grpo")) + r"\}"),
    "benchmarks/cpu_decode.py": Smoke(
        ("--model", "{llama}", "--new", "4", "--rows", "1", "--repeats", "1", "--top-p", "0.9"),
        # bf16 where the CPU computes it natively, else f32 (the bf16 rows are not run)
        _json("cpu_decode_tok_per_s_bf16_1_row_top_p_0.9", "thinkforge", "peer", "ratio").replace("bf16", "(bf16|f32)"),
        needs=("llama-cpp",)),
    "benchmarks/cpu_precision.py": Smoke(
        ("--model", "{llama}", "--tiny", "--threads", "2"),
        r'\{"metric": "cpu_bf16_autocast", "fp32": \{"train_tokens_per_s": .*\}, "bf16": \{.*\}, "train_ratio": ' + N + r"\}"),
    "benchmarks/decode_step.py": Smoke(
        ("--rows", "2", "--positions", "4", "--hidden", "32", "--layers", "1"),
        _json("decode_ms_per_step_at_4_positions", "thinkforge", "peer", "ratio")),
    "benchmarks/dpo_vs_trl.py": Smoke(
        ("--hidden", "32", "--layers", "1", "--pairs", "8", "--batch", "4"),
        _json("dpo_pairs_per_s", "thinkforge", "peer", "ratio")),
    "benchmarks/gpu_scale.py": Smoke(  # what a GPU session runs in its few minutes, on tiny shapes of the same models
        ("--tiny",),
        r'\{"metric": "gpu_scale", "device": "cpu", "sft": \{.*\}, "dpo": \{.*\}, "grpo_lora": \{"seconds": ' + N
        + r', "peak_gb": null, "tokens": 128, .*\}\}'),  # 2 prompts x G 4 x exactly 16 new tokens
    "benchmarks/grpo_vs_trl.py": Smoke(
        ("--hidden", "32", "--layers", "1", "--steps", "1", "--rounds", "1", "--max-new-tokens", "4"),
        _json("grpo_seconds_per_step", "thinkforge", "peer", "ratio"),
        also=(rf"\| thinkforge rl \(grpo\) \| {N} \| {N} \| 4\.0 \|", rf"\| TRL GRPOTrainer \| {N} \| {N} \| 4(\.0)? \|")),
    # 2 steps each (the step cap before the budget), a checkpoint at step 1. A random model earns -1 on every sample:
    # no advantage, so the weights do not move (the "max weight change" column reads 0 here, > 0 in real runs).
    "benchmarks/learning_vs_trl.py": Smoke(
        ("--model", "{llama}", "--task", "reasoning_gym:chain_sum", "--level", "1", "--minutes", "30", "--max-steps", "2",
         "--eval-items", "3", "--curve-every", "1", "--curve-items", "2", "--prompts", "2", "--group", "2",
         "--max-new-tokens", "4", "--micro-batch", "4", "--pool", "20", "--lr", "1e-2", "--lora", "--autocast",
         "--out", "{scratch}"),
        r'\{"metric": "heldout_accuracy_gain", "thinkforge": ' + N + ', "peer": ' + N + r', "ratio": (' + N
        + r'|null), "difference_ci95": \[(' + N + "|null), (" + N + r"|null)\]\}",
        also=(*(rf"\| {name} \| 2 \| {N} \| {N} \| {N} \| {N} \| " for name in ("thinkforge", "trl")),
              *(rf"curve {name}: 0\.0 min {N}%, {N} min {N}%, {N} min {N}%\n" for name in ("thinkforge", "trl")),
              r"curve: .*curve\.png",
              r"reasoning_gym:chain_sum: constant answer '-?\d+' scores [\d.]+%; most common answer: base '.*' \d+% of 3 "
              r"\(\d distinct\); thinkforge .*; trl ")),
    "benchmarks/long_context_memory.py": Smoke(
        ("--tokens", "128", "--vocab", "1024", "--hidden", "32", "--layers", "1"),
        r'\{"metric": "peak_mb_per_token", "path": "head", "peak_gb": \{"sft@128": ' + N + ', "dpo@128": ' + N
        + ', "grpo@128": ' + N + r"\}\}"),
    "benchmarks/plan_vs_measured.py": Smoke(("--tiny",), _json("plan_relative_error", "max_abs", "configurations")),
    "benchmarks/qlora_cpu.py": Smoke(  # a 2-layer Llama made by the script, 2 steps, each base in its own process
        ("--tiny",),
        r'\{"metric": "qlora_cpu", ' + ", ".join(
            f'"{base}/autocast_{cast}": ' + r'\{"load_s": ' + N + "".join(
                f', "{f}": {N}' for f in ("libraries_mb", "load_peak_mb", "peak_mb", "weight_mb", "trainable", "step_s",
                                           "tokens_per_s", "loss_first", "loss_last")) + r"\}"
            for base in ("4bit", "bf16", "fp32") for cast in ("on", "off")) + r"\}",
        also=(rf"\| 4bit \| on \| {N} \| \d+ / \d+ / \d+ \| {N} \| {N} \| {N} \| {N} -> {N} \|",)),
    "benchmarks/rl_sharded_memory.py": Smoke(
        ("--hidden", "64", "--layers", "1", "--steps", "1"),
        _json("rl_peak_gb_per_rank", "params", "ddp", "fsdp2", "fsdp2_over_ddp")),
    "benchmarks/rl_train_pass.py": Smoke(
        ("--tiny",), _json("rl_train_pass_tokens_per_s", "rl", "rl_without_entropy", "lm", "rl_padded_without_entropy",
                           "of_lm")),
    "benchmarks/gemv.py": Smoke(
        ("--hidden", "40", "--inner", "72", "--kv", "8", "--layers", "1", "--vocab", "100", "--rows", "1", "3", "--repeats", "1"),
        r'\{"metric": "gemv_ms_1_rows", "thinkforge": ' + N + ', "onednn": ' + N + ', "ratio": ' + N + r"\}"),
    "benchmarks/rollout_backends.py": Smoke(  # vLLM's CPU attention: a head size of 32, 64, 80, ...
        ("--hidden", "64", "--layers", "1", "--heads", "2", "--max-new-tokens", "4", "--rounds", "1"),
        r'\{"metric": "rollout_tokens_per_s", "hf": ' + N + ', "vllm": ' + N + ', "ratio": ' + N
        + r', "grpo_step_seconds": \{"hf": ' + N + ', "vllm": ' + N + r'\}, "vllm_sync_seconds": ' + N + r"\}",
        needs=("vllm",)),
    "benchmarks/sampling.py": Smoke(
        ("--vocab", "3000", "--rows", "2", "--top-p", "0.9", "--scale", "1", "4", "--repeats", "2"),
        _json("sampling_ms_2_rows_top_p_0.9_logits_x4", "thinkforge", "peer", "ratio")),
    "benchmarks/serve_concurrency.py": Smoke(
        ("--requests", "2", "--tokens", "4", "--clients", "1,2"),
        r'\{"model": ".*", "requests": 2, "tokens": 4, "results": \{"after": \[\{"clients": 1, .*"failed": 0, .*\}, '
        r'\{"clients": 2, .*"failed": 0, .*\}\]\}\}'),
    "benchmarks/sft_vs_trl.py": Smoke(
        ("--hidden", "32", "--layers", "1", "--docs", "8", "--max-len", "128", "--batch", "2"),
        _json("sft_packed_tokens_per_s", "thinkforge", "peer", "ratio", "raw")),
    "dev/bad_inputs.py": Smoke(
        ("--only", "grade:"), re.escape("7 bad inputs, 7 with exit code 2 and one line ($W: a temporary folder)")),
    "dev/gguf_answers.py": Smoke(
        ("{run}", "--dtypes", "f16", "--problems", "1"), r"f16: [01] of 1 in the reasoning format, [01] right",
        needs=("llama-cpp",)),
    "dev/task_baselines.py": Smoke(
        ("--model", "{llama}", "--task", "reasoning_gym:chain_sum", "--task", "synthetic", "--level", "1", "--items", "2",
         "--k", "2", "--max-new-tokens", "4"),
        r'\{"metric": "task_baselines", "k": 2, "tasks": \{"reasoning_gym:chain_sum": \{"greedy": ' + N
        + r'.*"items": 2, "levels": \[1\]\}, "synthetic": \{.*"items": 2, "levels": \[1\]\}\}\}',
        also=(rf"\| reasoning_gym:chain_sum \| \[1\] \| 2 \| {N} \| {N} \| {N} \| {N} \| {N} \| {N} \| {N} \|",)),
    "dev/stage_table.py": Smoke(
        ("{run}", "{run}", "--clean"), r"\| wall time \| [\d.]+ min \| [\d.]+ min \|",
        also=(rf"\| \+RLVR \| {N} \({N}; {N} to {N}\); format {N}, think {N} words \|",
              r"items without a training twin", r"\| items left \| \d+ \| \d+ \|")),
}


ENGINES = {"llama-cpp": (".venv-llamacpp", "llama-cpp", "llama.cpp"), "vllm": (".venv-vllm", "vllm", "the vLLM CPU engine")}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (the architecture llama.cpp reads) with the local tokenizer."""
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    return str(tiny.init_model(tmp_path_factory.mktemp("scripts") / "llama", InitConfig(arch="llama", hidden=32, layers=1,
                                                                                        heads=2)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A `thinkforge run` folder: a tiny Llama, one LoRA GRPO step (rl/final is an adapter, as in the Infused
    recipe), evaluated before and after (summary.json)."""
    out = tmp_path_factory.mktemp("scripts") / "run"
    r = subprocess.run([sys.executable, "-m", "thinkforge", "run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out),
                        "pipeline.stages=[rl]", "init.arch=llama", "init.hidden=32", "init.layers=1", "init.heads=2",
                        "eval.limit=2", "generation.max_new_tokens=8", "lora.enabled=true", "rl.steps=1",
                        "rl.preflight=false", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8",
                        "rl.checkpoints.every=0"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


@pytest.fixture
def scratch(tmp_path):
    """An empty folder a script writes its outputs to."""
    return str(tmp_path)


def test_every_script_in_benchmarks_and_dev_has_a_smoke_run():
    scripts = {str(p.relative_to(ROOT)) for folder in ("benchmarks", "dev") for p in (ROOT / folder).rglob("*")
               if p.suffix in (".py", ".sh")}
    assert scripts == set(SMOKE), (
        f"without a smoke run in tests/test_scripts.py: {sorted(scripts - set(SMOKE))} (add its smallest size to "
        f"SMOKE, or keep a one-off experiment in git only, named by its commit in dev/LOG.md); SMOKE names scripts "
        f"that are gone: {sorted(set(SMOKE) - scripts)}")


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_the_script_runs_at_its_smallest_size(script, request):
    smoke = SMOKE[script]
    for what in smoke.needs:  # skipped where not built (under CI: a failure), as the engine tests are
        engine_python(*ENGINES[what])
    folders = {name: request.getfixturevalue(name) for name in ("llama", "run", "scratch")
               if any(f"{{{name}}}" in a for a in smoke.args)}
    command = ["bash" if script.endswith(".sh") else sys.executable, str(ROOT / script),
               *(a.format(**folders) for a in smoke.args)]
    r = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, f"{' '.join(command)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    last = (r.stdout.strip().splitlines() or [""])[-1]
    assert re.fullmatch(smoke.result, last), f"{script}'s last line is not its result: {last[:1000]!r}"
    for pattern in smoke.also:
        assert re.search(pattern, r.stdout), f"{script} printed no line matching {pattern!r}:\n{r.stdout[-2000:]}"
