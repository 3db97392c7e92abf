"""Does a trained model still answer in the reasoning format once it is a GGUF file in llama.cpp?

    make llama-cpp
    python dev/gguf_answers.py runs/smollm2-infused [--dtypes f16 q8_0] [--problems 6]

Exports RUN/rl/final (the Infused recipe's final LoRA adapter: merged into its base) with `thinkforge export
--gguf`, then llama.cpp (its own venv) answers held-out synthetic problems (difficulty 2) greedily through the
file's own chat template, with the recipe's system prompt (the Infused card's). Prints each answer and, per dtype,
how many are `<think>...</think> <answer>...</answer>` and how many answers are right.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from thinkforge.export import export_gguf
    from thinkforge.formats import SYSTEM_PROMPT, parse
    from thinkforge.grading import math_equal
    from thinkforge.tasks import synthetic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--problems", type=int, default=6)
    a = ap.parse_args()
    problems = synthetic.generate(a.problems, split="test", difficulty=2, seed=5)
    worker = [str(ROOT / ".venv-llamacpp" / "bin" / "python"), str(ROOT / "thinkforge" / "_llamacpp_worker.py")]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in a.dtypes:
            done = export_gguf(Path(a.run) / "rl" / "final", Path(tmp) / f"m-{dtype}.gguf", dtype)
            print(f"{done['path']}: {done['bytes'] / 1e6:.0f} MB, {dtype}")
            formatted = right = 0
            for p in problems:
                request = {"do": "chat", "model": done["path"], "max_tokens": 192, "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p["question"]}]}
                answer = subprocess.run(worker, input=json.dumps(request), capture_output=True, text=True, check=True)
                text = json.loads(answer.stdout.strip().splitlines()[-1])["text"]
                parsed = parse(text)
                ok = parsed.format_ok and bool(re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", text, re.S))
                correct = math_equal(parsed.answer, p["final"])
                formatted, right = formatted + ok, right + correct
                print(f"  [{'format' if ok else 'NO FORMAT'}, {'right' if correct else 'wrong'}] {' '.join(text.split())}")
            print(f"{dtype}: {formatted} of {len(problems)} in the reasoning format, {right} right")


if __name__ == "__main__":
    main()
