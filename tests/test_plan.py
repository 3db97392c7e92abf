"""`thinkforge plan`: memory per stage from the config alone; out of memory in training is one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
            parts = plan.predict(shape, s, 8, row["strategy"], "cuda", batch=b)
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


@pytest.mark.parametrize("overrides", [["rl.mixed_precision=bf16"], ["rl.mixed_precision=no"],
                                       ["rl.mixed_precision=no", "lora.enabled=true", "model.dtype=bfloat16"]],
                         ids=["bf16-autocast-fp32-weights", "fp32", "bf16-lora-base"])
def test_the_rollout_kv_cache_is_counted_in_the_dtypes_the_decode_loop_stores(tiny_model, tmp_path, monkeypatch, overrides):
    """Under bf16 autocast over fp32 master weights transformers' layers hand float32 keys (rotated by float32
    cos/sin) and bf16 values; the cache the decode loop fills for RL holds, per position, the bytes the plan counts."""
    from thinkforge.engine import decode as engine
    from thinkforge.rollout import hf
    from thinkforge.rollout.types import SamplingParams
    from thinkforge.train import loop

    recipe = load_config(ROOT / "recipes" / "tiny.yaml", [f"model.name_or_path={tiny_model}", *overrides])
    model, tok, _ = loop.load_for_training(recipe, tmp_path)
    caches, real = [], engine.forward_cached
    monkeypatch.setattr(engine, "forward_cached", lambda m, cache, **kw: (caches.append(cache), real(m, cache, **kw))[1])
    with loop.autocast("cpu", recipe.rl.mixed_precision):  # as rl.main samples
        hf.HFGenerator(model, tok, 4).generate(["Mia has 3 apples"], 2, SamplingParams(max_new_tokens=4, temperature=0.0))
    stored = sum(t.element_size() * t.shape[1] * t.shape[3] for layer in caches[0].layers for t in (layer.keys, layer.values))
    config = plan._config(recipe)
    s = plan.settings_for(recipe, "rl", "cpu", config)
    parts = plan.predict(plan.shape_of(config, recipe.lora), s, 1, "ddp", "cpu")
    assert parts["rollout KV cache"] / (s.kv_cache * s.kv_tokens) == stored  # bytes per sequence and position


def test_a_lora_base_is_counted_in_the_dtype_training_loads_it_in(tiny_model, tmp_path):
    """The frozen base of a LoRA run is what training loads (train.loop.weights_dtype): model.dtype, auto = bf16
    on CUDA as PEFT and TRL load it, float32 on a CPU; the adapter trains in fp32 (PITFALLS 14)."""
    from thinkforge.train import loop

    for dtype in ("bfloat16", "auto"):
        recipe = load_config(ROOT / "recipes" / "tiny.yaml", [f"model.name_or_path={tiny_model}", "lora.enabled=true",
                                                              f"model.dtype={dtype}"])
        model, _, _ = loop.load_for_training(recipe, tmp_path / dtype)
        frozen = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        config = plan._config(recipe)
        shape, s = plan.shape_of(config, recipe.lora), plan.settings_for(recipe, "sft", "cpu", config)
        assert plan.frozen_bytes(shape, s) == frozen, dtype
        assert s.stream_bytes == model.get_input_embeddings().weight.element_size()  # checkpointed layer inputs
    # on CUDA (none here): the same function decides; the plan counts 2 bytes a base weight, the docs say so
    lora = _phi4("lora.enabled=true", "model.dtype=auto")
    assert loop.weights_dtype(lora, "cuda") == "bfloat16" and loop.weights_dtype(_phi4(), "cuda") == "float32"
    assert "auto = bfloat16 on CUDA" in type(lora.model).model_fields["dtype"].description
    shape = plan.shape_of(plan._config(lora), lora.lora)
    sft = {r["stage"]: r for r in plan.plan(lora, 1, 80 * GB)}["sft"]
    assert sft["parts"]["model state"] == pytest.approx(shape.lora_params * 20 + shape.params * 2)  # + AdamW's foreach


def test_rl_plans_and_advises_sharding_like_every_stage(capsys):
    """RL runs on FSDP2 too: a full fine-tuning whose state does not fit one GPU is told to shard it."""
    from conftest import run_cli

    rl = {r["stage"]: r for r in plan.plan(_phi4("rollout.backend=vllm", "rollout.base_url=http://h:8000/v1"), 2, 40 * GB, "ddp")}["rl"]
    assert rl["parts"]["model state"] > 40 * GB and "FSDP2 over more GPUs" in rl["advice"]
    code, out, _ = run_cli(["plan", "--help"], capsys)
    assert code == 0 and "RL: DDP" not in out and "for every stage" in " ".join(out.split())


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
    from thinkforge import tasks
    from thinkforge.data import distill

    data = tmp_path / "d.jsonl"
    distill.main(tasks.load("synthetic").problems("train", 4000, 0, [2]), distill.SyntheticTeacher(0.0, 0), 1, data, progress=False)
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
