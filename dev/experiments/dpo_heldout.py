"""Preference accuracy of a DPO model on held-out pairs (never trained on).

Pairs come from the reference (stage-2) model's own graded samples on held-out synthetic test problems;
accuracy = share of pairs where the DPO model's implicit reward prefers the correct rollout.
    python dev/experiments/dpo_heldout.py SFT_MODEL DPO_MODEL [--system "..."] [--difficulty 1]
"""

import argparse
import functools
import json
import tempfile
from pathlib import Path

from thinkforge import models
from thinkforge.config import load_config
from thinkforge.data import distill, pairs, sources
from thinkforge.formats import render_prompt
from thinkforge.rollout.hf import HFGenerator
from thinkforge.rollout.types import SamplingParams
from thinkforge.train import dpo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sft_model")
    ap.add_argument("dpo_model")
    ap.add_argument("--system", default="Solve it step by step.")
    ap.add_argument("--difficulty", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.1)
    a = ap.parse_args()
    recipe = load_config(None, [f"model.system_prompt={a.system}"])
    ref_model, tok = models.load(a.sft_model)
    prompt_fn = functools.partial(render_prompt, fmt="auto", system=a.system, tokenizer=tok)
    problems = sources.synthetic("test", 200, a.difficulty, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        teacher = distill.HFTeacher(HFGenerator(ref_model, tok, 64), prompt_fn, SamplingParams(128, 1.0, 1.0, 0, 0), "ref")
        distill.main(problems, teacher, 4, out, progress=False)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
    built, stats = pairs.build(rows, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in built))
        pr = dpo.load_pairs(str(path), tok, recipe, 512)
    ref = dpo.reference_logprobs(ref_model, pr, tok.pad_token_id, 16)
    policy, _ = models.load(a.dpo_model)
    res = dpo.preference_accuracy(policy, pr, ref, tok.pad_token_id, a.beta, 16)
    print(json.dumps({"heldout_pairs": len(pr), **stats, **res}))


if __name__ == "__main__":
    main()
