"""Bad inputs at the command line, each run as a real process: its exit code and what the user reads.

    python dev/bad_inputs.py > dev/bad_inputs.md
    python dev/bad_inputs.py --only "rl:"      # the rows whose name holds that text

Every row should be exit code 2 with one line on stderr (no traceback). The script prints a Markdown table
and, last, a summary line; it exits 1 if a row breaks the promise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
W = Path(tempfile.mkdtemp(prefix="bad-inputs-"))


def files() -> dict[str, Path]:
    f = {
        "binary": W / "binary.jsonl", "empty": W / "empty.jsonl", "broken": W / "broken.jsonl",
        "list_row": W / "list_row.jsonl", "no_completion": W / "no_completion.jsonl", "graded": W / "graded.jsonl",
        "pairs_bad": W / "pairs_bad.jsonl", "yaml_bad": W / "bad.yaml", "yaml_key": W / "key.yaml", "not_gguf": W / "x.gguf",
        "no_question": W / "no_question.jsonl",
    }
    f["binary"].write_bytes(b"\xff\xfe\x00\x81binary\n")
    f["empty"].write_text("")
    f["broken"].write_text('{"completion": "a", "reference": "1"}\n{"completion": \n')
    f["list_row"].write_text("[1, 2]\n")
    f["no_completion"].write_text('{"question": "q"}\n')
    f["graded"].write_text(json.dumps({"problem_id": "1", "question": "q", "completion": "<answer>1</answer>",
                                       "correct": True, "reference": "1"}) + "\n")
    f["pairs_bad"].write_text('{"question": "q", "chosen": "a"}\n')
    f["yaml_bad"].write_text("model: [unclosed\n")
    f["yaml_key"].write_text("modle: {name_or_path: x}\n")
    f["not_gguf"].write_bytes(b"PK\x03\x04 zip")
    f["no_question"].write_text('{"text": "q"}\n')
    (W / "adir").mkdir()
    return f


def cases(model: str, f: dict[str, Path]) -> list[tuple[str, list[str]]]:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases.busy = busy  # kept open while the cases run
    out = str(W / "out")
    return [
        ("init-model: hidden 0", ["init-model", out, "--hidden", "0"]),
        ("init-model: negative layers", ["init-model", out, "--layers", "-1"]),
        ("init-model: heads do not divide hidden", ["init-model", out, "--hidden", "30", "--heads", "4"]),
        ("init-model: unknown arch", ["init-model", out, "--arch", "gpt9"]),
        ("init-model: GGUF file missing", ["init-model", out, "--from-gguf", str(W / "none.gguf")]),
        ("init-model: not a GGUF file", ["init-model", out, "--from-gguf", str(f["not_gguf"])]),
        ("grade: input missing", ["grade", str(W / "none.jsonl"), "--out", out]),
        ("grade: binary input", ["grade", str(f["binary"]), "--out", out]),
        ("grade: empty input", ["grade", str(f["empty"]), "--out", out]),
        ("grade: malformed JSON line", ["grade", str(f["broken"]), "--out", out]),
        ("grade: row not an object", ["grade", str(f["list_row"]), "--out", out]),
        ("grade: rows without completion", ["grade", str(f["no_completion"]), "--out", out]),
        ("grade: input is a folder", ["grade", str(W / "adir"), "--out", out]),
        ("data select: input missing", ["data", "select", str(W / "none.jsonl"), "--out", out]),
        ("data select: binary input", ["data", "select", str(f["binary"]), "--out", out]),
        ("data select: empty input", ["data", "select", str(f["empty"]), "--out", out]),
        ("data select: rows without columns", ["data", "select", str(f["no_completion"]), "--out", out]),
        ("data pairs: empty input", ["data", "pairs", "--rollouts", str(f["empty"]), "--out", str(W / "p.jsonl")]),
        ("data pairs: binary input", ["data", "pairs", "--rollouts", str(f["binary"]), "--out", str(W / "p.jsonl")]),
        ("data pairs: rows without columns", ["data", "pairs", "--rollouts", str(f["no_completion"]),
                                              "--out", str(W / "p.jsonl")]),
        ("data distill: unknown teacher", ["data", "distill", "--out", str(W / "d.jsonl"), "--teacher", "oracle"]),
        ("data distill: openai without base url", ["data", "distill", "--out", str(W / "d.jsonl"), "--teacher", "openai",
                                                   "--teacher-model", "m"]),
        ("data distill: unreachable endpoint", ["data", "distill", "--out", str(W / "d.jsonl"), "--teacher", "openai",
                                                "--teacher-model", "m", "--base-url", "http://127.0.0.1:9/v1",
                                                "--problems", "1", "distill.max_retries=0"]),
        ("data distill: zero problems", ["data", "distill", "--out", str(W / "d.jsonl"), "--problems", "0"]),
        ("generate: model folder missing", ["generate", "-m", str(W / "none"), "-p", "hi"]),
        ("generate: folder is not a model", ["generate", "-m", str(W / "adir"), "-p", "hi"]),
        ("generate: nothing to generate", ["generate", "-m", model]),
        ("generate: zero samples", ["generate", "-m", model, "-p", "hi", "-n", "0"]),
        ("generate: binary --input", ["generate", "-m", model, "--input", str(f["binary"])]),
        ("generate: empty --input", ["generate", "-m", model, "--input", str(f["empty"])]),
        ("generate: --input rows without question", ["generate", "-m", model, "--input", str(f["no_question"])]),
        ("generate: negative temperature", ["generate", "-m", model, "-p", "hi", "--temperature", "-1"]),
        ("generate: hub id offline", ["generate", "-m", "some-org/not-cached", "-p", "hi"]),
        ("eval: unknown benchmark", ["eval", "-m", model, "-b", "mmlu-pro-max", "--out", out]),
        ("eval: local benchmark without data", ["eval", "-m", model, "-b", "local", "--out", out]),
        ("eval: local benchmark, binary data", ["eval", "-m", model, "-b", "local", "eval.data_path=" + str(f["binary"]),
                                                "--out", out]),
        ("eval: zero samples", ["eval", "-m", model, "-k", "0", "--out", out]),
        ("eval: model missing", ["eval", "-m", str(W / "none"), "--out", out]),
        ("eval: unknown config key", ["eval", "-m", model, "--out", out, "eval.sampels=2"]),
        ("eval: config value of the wrong type", ["eval", "-m", model, "--out", out, "eval.samples=many"]),
        ("eval: override without =", ["eval", "-m", model, "--out", out, "eval.samples"]),
        ("eval: config file missing", ["eval", "-m", model, "--out", out, "--config", str(W / "none.yaml")]),
        ("eval: config YAML syntax error", ["eval", "-m", model, "--out", out, "--config", str(f["yaml_bad"])]),
        ("eval: config with a misspelt section", ["eval", "-m", model, "--out", out, "--config", str(f["yaml_key"])]),
        ("sft: no data", ["sft", "-m", model, "--out", str(W / "sft")]),
        ("sft: data missing", ["sft", "-m", model, "--data", str(W / "none.jsonl"), "--out", str(W / "sft")]),
        ("sft: binary data", ["sft", "-m", model, "--data", str(f["binary"]), "--out", str(W / "sft")]),
        ("sft: empty data", ["sft", "-m", model, "--data", str(f["empty"]), "--out", str(W / "sft")]),
        ("sft: rows without completion", ["sft", "-m", model, "--data", str(f["no_completion"]), "--out", str(W / "sft")]),
        ("sft: negative learning rate", ["sft", "-m", model, "--data", str(f["graded"]), "--out", str(W / "sft"),
                                        "sft.optim.lr=-1"]),
        ("sft: LoRA target the model lacks", ["sft", "-m", model, "--data", str(f["graded"]), "--out", str(W / "sft"),
                                              "--lora", "lora.target_modules=[wq]"]),
        ("dpo: pairs without rejected", ["dpo", "-m", model, "--data", str(f["pairs_bad"]), "--out", str(W / "dpo")]),
        ("dpo: empty pairs", ["dpo", "-m", model, "--data", str(f["empty"]), "--out", str(W / "dpo")]),
        ("rl: group of one sample", ["rl", "-m", model, "--out", str(W / "rl"), "rl.group_size=1"]),
        ("rl: a PPO setting under GRPO", ["rl", "-m", model, "--out", str(W / "rl"), "rl.lam=0.9"]),
        ("rl: renamed setting", ["rl", "-m", model, "--out", str(W / "rl"), "rl.scale_advantages=false"]),
        ("rl: openai backend (no weight updates)", ["rl", "-m", model, "--out", str(W / "rl"), "rollout.backend=openai",
                                                     "rollout.base_url=http://127.0.0.1:9/v1"]),
        ("rl: unknown advantage", ["rl", "-m", model, "--out", str(W / "rl"), "rl.advantage=magic"]),
        ("run: recipe missing", ["run", str(W / "none.yaml"), "--out", out]),
        ("run: unknown stage", ["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", out, "pipeline.stages=[sft,xx]"]),
        ("serve: port in use", ["serve", "-m", model, "--port", str(busy.getsockname()[1])]),
        ("serve: port out of range", ["serve", "-m", model, "--port", "70000"]),
        ("serve: host not on this machine", ["serve", "-m", model, "--host", "8.8.8.8", "--port", "0"]),
        ("compare: folders that are not evaluations", ["compare", str(W / "adir"), str(W / "adir")]),
        ("merge: not an adapter", ["merge", model, str(W / "merged")]),
        ("merge: folder missing", ["merge", str(W / "none"), str(W / "merged")]),
        ("chat: model missing", ["chat", "-m", str(W / "none")]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only the rows whose name holds this text")
    only = ap.parse_args().only
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    model = W / "tiny"
    subprocess.run([sys.executable, "-m", "thinkforge", "init-model", str(model)], check=True, capture_output=True,
                   env=env, cwd=ROOT)
    rows, broken = [], 0
    chosen = [(name, args) for name, args in cases(str(model), files()) if only in name]
    if not chosen:
        sys.exit(f"no row's name holds {only!r}")
    for name, args in chosen:
        r = subprocess.run([sys.executable, "-m", "thinkforge", *args], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
        lines = [x for x in r.stderr.splitlines() if x.strip() and "|" not in x.split("\r")[-1]]
        ok = r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr
        broken += not ok
        shown = (lines[-1] if lines else r.stderr.strip()[-200:]).replace("|", "\\|").replace(str(W), "$W")
        command = " ".join(args).replace(str(W), "$W").replace(str(ROOT) + "/", "")
        rows.append(f"| {len(rows) + 1} | {name} | `thinkforge {command}` | {r.returncode} | {shown} |")
        shutil.rmtree(W / "out", ignore_errors=True)
    print("| # | bad input | command | exit | what the user reads (stderr) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(rows)} bad inputs, {len(rows) - broken} with exit code 2 and one line ($W: a temporary folder)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
