"""The official lm-eval harness (its `local-completions` model, in its own venv `.venv-lmeval`, built by
`make lm-eval`, which `make test` runs first) against `thinkforge serve`: a generation task and a
log-likelihood multiple-choice task of our own, and its numbers checked against the model itself."""

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = ROOT / ".venv-lmeval" / "bin" / "lm_eval"

if not LM_EVAL.is_file():
    if os.environ.get("CI"):  # make test builds it first: under CI a missing harness is a failure, not a skip
        pytest.fail(f"{LM_EVAL} is missing: `make lm-eval` should have built it", pytrace=False)
    pytest.skip("the lm-eval venv is not built: run `make lm-eval` (make test does)", allow_module_level=True)

pytestmark = pytest.mark.slow

GEN = [{"question": f"{a} plus {b} is", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]
MC = [{"question": f"Which is more, {a} or {b}?", "choices": [str(a), str(b)], "label": int(b > a)}
      for a, b in [(1, 2), (7, 3), (5, 9), (8, 4), (6, 1)]]


def _tasks(folder: Path) -> None:
    for name, rows in (("gen", GEN), ("mc", MC)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "tf_gen.yaml").write_text(
        "task: tf_gen\n" + common.format(folder / "gen.jsonl") +
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "tf_mc.yaml").write_text(
        "task: tf_mc\n" + common.format(folder / "mc.jsonl") +
        'output_type: multiple_choice\ndoc_to_text: "{{question}} Answer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")


def test_lm_eval_local_completions_runs_against_serve(tiny_model, tiny_loaded, tmp_path):
    from thinkforge.rollout.hf import HFGenerator
    from thinkforge.rollout.types import SamplingParams
    from thinkforge.serve import Settings, make_server

    model, tok = tiny_loaded
    srv = make_server(HFGenerator(model, tok, 16), tok, Settings("tiny", port=0))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _tasks(tmp_path)
    try:
        args = (f"model=tiny,base_url=http://127.0.0.1:{srv.server_address[1]}/v1/completions,tokenizer={tiny_model},"
                "tokenizer_backend=huggingface,tokenized_requests=True,max_length=1024,num_concurrent=4,max_retries=1")
        r = subprocess.run([str(LM_EVAL), "--model", "local-completions", "--model_args", args, "--tasks", "tf_gen,tf_mc",
                            "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tf_gen" in r.stdout and "tf_mc" in r.stdout

    def samples(task):
        (path,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        return [json.loads(x) for x in path.read_text().splitlines()]

    # log-likelihoods: what the harness got from us equals the model's own sum over the continuation's tokens
    for s in samples("tf_mc"):
        context = s["doc"]["question"] + " Answer:"
        for choice, resp in zip(s["doc"]["choices"], s["resps"], strict=True):
            whole = tok(context + " " + choice, add_special_tokens=False).input_ids
            n_ctx = len(tok(context, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0, :-1].float(), -1)
            want = sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-4)  # the log keeps it as text
    # generations: the harness's text is the model's greedy continuation, cut at its stop string
    gen = HFGenerator(model, tok)
    for s in samples("tf_gen"):
        (c,) = gen.generate([s["doc"]["question"]], 1, SamplingParams(8, 0.0))
        assert s["resps"][0][0] == c.text.split("\n")[0]
