"""`thinkforge plan`: memory per stage from the config alone; out of memory in training is one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinkforge import plan
from thinkforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PHI4 = ROOT / "benchmarks" / "configs" / "phi-4-mini"
GB = 1024**3


def _phi4(*extra):
    return load_config(ROOT / "recipes" / "phi4-mini-reasoning.yaml", [f"model.name_or_path={PHI4}", *extra])


def test_the_phi4_recipe_on_8_gpus_of_80gb(capsys):
    from conftest import run_cli

    code, out, err = run_cli(["plan", str(ROOT / "recipes" / "phi4-mini-reasoning.yaml"), "--gpus", "8", "--gpu-memory",
                              "80GB", f"model.name_or_path={PHI4}"], capsys)
    assert code == 0, err
    assert "8 GPU(s) of 80 GB" in out and all(f"| {s} |" in out for s in ("midtrain", "sft", "dpo", "rl"))
    rows = {r["stage"]: r for r in plan.plan(_phi4(), 8, 80 * GB)}
    shape = plan.shape_of(plan._config(_phi4()))
    assert 3.7e9 < shape.params < 3.9e9 and shape.vocab == 200_064  # Phi-4-mini: 3.8B, tied embeddings counted once
    # FSDP2 over 8 ranks: a full fine-tuning's 16 bytes per parameter (61 GB) become 7.7 GB per GPU, plus the
    # unsharded root (the tied 200K x 3072 embedding, weights and gradients in fp32: 4.9 GB), two gathered layers
    # and AdamW's foreach temporary (4 bytes a parameter, sharded)
    want = 16 * shape.params / 8 + shape.vocab * shape.hidden * 8 + 2 * shape.layer_params * 4 + 4 * shape.params / 8
    assert rows["sft"]["strategy"] == "fsdp2" and rows["sft"]["parts"]["model state"] == pytest.approx(want)
    # RL on FSDP2 too, the same sharded state; its rollouts in-process: 64 sequences of 25.5K tokens of KV cache
    # (199 GB) do not fit
    rl = rows["rl"]
    assert rl["strategy"] == "fsdp2" and rl["parts"]["model state"] == pytest.approx(want)
    assert rl["advice"].startswith("does not fit: rollouts: rl.gen_batch=") and "rollout.backend=vllm" in rl["advice"]
    # on vLLM colocated (its default 0.9 of the GPU) with a KL reference: the fp32 reference, sharded like the policy
    rl = {r["stage"]: r for r in plan.plan(_phi4("rl.beta=0.04", "rollout.backend=vllm"), 8, 80 * GB)}["rl"]
    assert rl["parts"]["reference"] == pytest.approx(4 * shape.params / 8) and rl["budget"] == pytest.approx(8 * GB)
    assert "lora.enabled=true" in rl["advice"] and "--gpu-memory-utilization" in rl["advice"]


def test_the_largest_micro_batch_is_the_largest_that_fits():
    recipe = _phi4("model.gradient_checkpointing=false")
    shape = plan.shape_of(plan._config(recipe), recipe.lora)
    for row in plan.plan(recipe, 8, 80 * GB):
        s = plan.settings_for(recipe, row["stage"], "cuda")

        def training(b, s=s, row=row):
            parts = plan.predict(shape, s, 8, row["strategy"], "cuda", 2, batch=b)
            return plan.peak({**parts, "rollout KV cache": 0.0})

        b = row["largest_batch"]
        assert (b == 0 or training(b) <= row["budget"]) and training(b + 1) > row["budget"], row["stage"]


def test_checkpointing_lora_and_sharding_each_lower_what_they_should():
    base = {r["stage"]: r["parts"] for r in plan.plan(_phi4("model.gradient_checkpointing=false"), 8, 80 * GB, "ddp")}
    ckpt = {r["stage"]: r["parts"] for r in plan.plan(_phi4(), 8, 80 * GB, "ddp")}
    lora = {r["stage"]: r["parts"] for r in plan.plan(_phi4("lora.enabled=true"), 8, 80 * GB, "ddp")}
    fsdp = {r["stage"]: r["parts"] for r in plan.plan(_phi4(), 8, 80 * GB, "fsdp2")}
    assert ckpt["sft"]["activations"] < base["sft"]["activations"] / 5
    assert lora["sft"]["model state"] < ckpt["sft"]["model state"] / 4 and lora["rl"]["reference"] == 0
    assert fsdp["sft"]["model state"] < ckpt["sft"]["model state"] / 4
    # the head: one chunk of logits and the gathered hidden states, never T x V (4 rows of 20K tokens: 61 GB of fp32 logits)
    assert ckpt["sft"]["output head"] < 2 * GB


@pytest.mark.parametrize("args,words", [(["--gpu-memory", "lots", "--gpus", "2"], "--gpu-memory 'lots' is not a size"),
                                        (["--gpu-memory", "8.0.0GB", "--gpus", "2"], "is not a size"), (["--gpu-memory", "24GB"], "needs --gpus"),
                                        (["--gpus", "-1"], "--gpus -1"),
                                        (["model.name_or_path=/nowhere/model"], "/nowhere/model")])
def test_bad_plan_input_is_one_line(args, words, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["plan", str(ROOT / "recipes" / "tiny.yaml"), *args], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_out_of_memory_in_training_is_one_line_naming_the_stage_the_rows_and_what_to_change(tiny_model, tmp_path):
    """Eight packed 65,536-token rows per micro-batch under a 6 GB address-space limit (about 1 GB of activations a
    row). The answer is one line and exit 2 with the plan's micro-batch, not an allocator traceback (exit 1)."""
    from thinkforge.data import distill, sources

    data = tmp_path / "d.jsonl"
    distill.main(sources.synthetic("train", 4000, 2, seed=0), distill.SyntheticTeacher(0.0, 0), 1, data, progress=False)
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
              "from thinkforge.cli import main; main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", script, "midtrain", "--data", str(data), "-m", tiny_model, "--out",
                        str(tmp_path / "m"), "midtrain.max_len=65536", "midtrain.batch_size=8", "midtrain.grad_accum=1",
                        "midtrain.epochs=1"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err[-1].startswith("thinkforge: error: midtrain: out of memory with rows of 65536 tokens x 8"), err[-1]
    assert "GB failed); `thinkforge plan` says: midtrain.batch_size=" in err[-1] and "per step)" in err[-1]
    assert not (tmp_path / "m").exists()  # a failed start leaves no folder


@pytest.mark.slow
def test_the_gpu_scale_benchmark_runs_its_three_steps_on_tiny_shapes():
    """benchmarks/gpu_scale.py is what a GPU session runs in its few minutes: on a CPU with tiny shapes of the
    same architectures it must run sft, dpo and grpo_lora through thinkforge's step functions and report."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--tiny"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["metric"] == "gpu_scale" and set(res) >= {"sft", "dpo", "grpo_lora"}
    assert all(res[k]["seconds"] > 0 and 0 < res[k]["mfu"] < 1 for k in ("sft", "dpo", "grpo_lora"))
    assert res["grpo_lora"]["tokens"] == 2 * 4 * 16  # prompts x G x exactly the new tokens
