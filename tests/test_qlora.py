"""QLoRA on a CPU: the Infused Phi-2 card's LoRA (r 16, alpha 32, q/k/v/dense) on a 4-bit NF4 base, bitsandbytes'
own CPU layers, on a tiny Phi-2-shaped model (model_type phi: parallel attention and MLP, partial rotary)."""

import json
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

from thinkforge import models
from thinkforge.config import load_config
from thinkforge.errors import UserError


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    return str(tiny.init_model(tmp_path_factory.mktemp("models") / "tiny-phi2", InitConfig(arch="phi", hidden=64, layers=2)))


def _card(model, **over):
    over = {"model.name_or_path": model, "model.load_in_4bit": "true", "model.system_prompt": "Think.",
            "model.gradient_checkpointing": "true",  # as recipes/infused-phi2.yaml
            "lora.enabled": "true", "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0,
            "lora.target_modules": "[q_proj, k_proj, v_proj, dense]", "rl.preflight": "false", "rl.steps": 3,
            "rl.prompts_per_step": 2, "rl.group_size": 4, "rl.max_new_tokens": 16, "rl.optim.lr": 1e-2,
            "rl.micro_batch": 4, "rl.checkpoints.every": 2, "rl.truncation": "none", "rl.temperature": 1.0,
            "rl.temperature_start": "null", "rl.beta": 0.04, "rl.reward": "weighted",
            # the card's three rewards, and one that varies within a group of a random model's text
            "rewards.weights": "{correctness: 1.0, reasoning: 0.7, format: 0.3, 'user_rewards:shorter_is_better': 1.0}",
            **over}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_a_4bit_base_loads_on_a_cpu_offline_without_a_word_from_bitsandbytes(phi, tmp_path):
    """A fresh process with a `kernels` package installed: bitsandbytes' import (made by peft's) never reaches it
    (no Hub kernel is fetched), nothing is printed,
    the linear layers are NF4 Linear4bit (the output layer stays full precision), and the logits are the
    full-precision model's within 4-bit rounding."""
    stub = tmp_path / "stub" / "kernels"  # an installed `kernels` package that says when bitsandbytes asks it
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(f"def get_kernel(*a, **k):\n    open({str(tmp_path / 'fetched')!r}, 'w').close()\n")
    code = f"""
import torch
import importlib.util
assert importlib.util.find_spec("kernels") is not None  # installed, and found by anyone but bitsandbytes
from thinkforge import models
import peft  # imports bitsandbytes first, as any LoRA run does
q, tok = models.load({phi!r}, load_in_4bit=True)
f, _ = models.load({phi!r})
layer = q.model.layers[0]
print(type(layer.self_attn.q_proj).__name__, type(layer.mlp.fc2).__name__, type(q.lm_head).__name__,
      layer.self_attn.q_proj.weight.quant_state.quant_type)
ids = tok("Mia has 3 apples and buys 4 more.", return_tensors="pt").input_ids
with torch.no_grad():
    a, b = q(ids).logits, f(ids).logits
print(float((a - b).norm() / b.norm()), float((a.argmax(-1) == b.argmax(-1)).float().mean()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(stub.parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "fetched").exists()  # bitsandbytes never called kernels.get_kernel
    kinds, numbers = done.stdout.splitlines()
    assert kinds.split() == ["Linear4bit", "Linear4bit", "Linear", "nf4"]
    relative, agree = map(float, numbers.split())
    assert 0 < relative < 0.25 and agree > 0.5  # rounded, not garbage (a random tiny model: 4-bit error is large)
    noise = [line for line in done.stderr.splitlines() if "Loading weights" not in line and line.strip()]
    assert not noise, noise  # no kernel fetch warning, no deprecation


def test_an_old_bitsandbytes_or_none_is_one_line_naming_the_release(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5" if name == "bitsandbytes" else real(name))
    with pytest.raises(UserError, match=r"bitsandbytes 0\.45\.5 is older than 0\.50\.2, .*; pip install 'bitsandbytes>=0\.50\.2'"):
        models.import_bitsandbytes("cpu")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(UserError, match="needs bitsandbytes, which is not installed"):
        models.import_bitsandbytes("cpu")


def test_4bit_needs_an_adapter_to_train_and_the_in_process_sampler(phi, tmp_path):
    from thinkforge import plan
    from thinkforge.train import loop

    full = _card(phi, **{"lora.enabled": "false", "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05,
                         "lora.target_modules": "null"})
    with pytest.raises(UserError, match="trains nothing without an adapter"):
        loop.load_for_training(full, tmp_path)
    with pytest.raises(UserError, match="trains nothing without an adapter"):  # no memory table for it either
        plan.plan(full, 0, 24e9)
    with pytest.raises(UserError, match="rollout.backend=vllm samples from a server's own weights"):
        _card(phi, **{"rollout.backend": "vllm"})


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_a_sampling_pass_leaves_the_4bit_layers_differentiable(tmp_path, arch):
    """bitsandbytes repacks a 4-bit weight for its inference kernel (no backward) at the first no-grad eval
    forward; RL samples before it trains: the training pass after a sampling pass has the gradients of one
    without (Phi-2's biased layers failed, Llama's were 10-20% off, before models.load switched it off)."""
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    folder = str(tiny.init_model(tmp_path / arch, InitConfig(arch=arch, hidden=64, layers=2)))
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(sample_first: bool):
        torch.manual_seed(0)
        model = models.add_lora(models.load(folder, load_in_4bit=True)[0], 16, 32, 0.0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        if sample_first:
            with models.eval_mode(model), torch.no_grad():
                model(input_ids=x)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model = models.load(folder, load_in_4bit=True)[0]
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)  # (on any CPU; this one has AVX-512 BF16)
    plain, after = grads(False), grads(True)
    assert plain.keys() == after.keys() and len(plain) == 2 * 2 * 4
    for n in plain:
        assert torch.equal(plain[n], after[n]), n


def test_one_update_of_the_adapter_on_a_4bit_base_moves_a_fixed_batch_the_right_way(phi):
    """The adapter's gradient flows through the 4-bit layers: one GRPO update raises the log-probs of the
    positive-advantage samples and lowers the others', and the 4-bit weights do not move."""
    from test_rl import _rollout

    from thinkforge.losses import grpo_advantages, normaliser, policy_loss
    from thinkforge.train.forward import forward_logp

    model, tok = models.load(phi, load_in_4bit=True)
    model = models.add_lora(model, 16, 32, 0.0, ["q_proj", "k_proj", "v_proj", "dense"])
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert packed and all(not p.requires_grad for p in model.parameters() if p.dtype == torch.uint8)
    texts = ["<think>3 + 1 = 4</think><answer>4</answer>", "<think>3 + 1 = 5</think><answer>5</answer>",
             "<answer>7</answer>", "<think>so 4</think><answer>4</answer>"]
    ro = _rollout(tok, texts, [1.0, -1.0, -1.0, 1.0], 4)
    mask, adv = ro.completion_mask.float(), grpo_advantages(ro.rewards, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def seq_logp():
        with torch.no_grad():
            return (forward_logp(model, ro, slice(0, 4))[0] * mask).sum(-1)

    before = seq_logp()
    for _ in range(3):
        logp, _, _ = forward_logp(model, ro, slice(0, 4))
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, normaliser(mask, "sequence"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = seq_logp() - before
    assert moved[adv > 0].min() > 0 and moved[adv < 0].max() < 0
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)


def test_infused_grpo_on_a_4bit_phi2_runs_and_its_adapter_loads_as_the_card_says(phi, tmp_path, monkeypatch):
    """rl.main with the card's LoRA on a 4-bit base: the reference is the adapter disabled, i.e. the same 4-bit
    base (step-1 KL exactly 0); the adapter trains; the saved adapter loads with the card's snippet on a 4-bit
    base (what trained) and on the float32 base (what `thinkforge merge` merges into), and the merge is that."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from thinkforge.train import rl

    final = rl.main(_card(phi), "rl", tmp_path / "rl", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert len(rows) == 3 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[-1]["kl"] > 0
    # interrupted after step 2 and run again: it resumes from the checkpoint's adapter, trainable, to the same end
    assert rl.main(_card(phi), "rl", tmp_path / "again", progress=False, stop_after=2) is None
    rl.main(_card(phi), "rl", tmp_path / "again", progress=False)
    again = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows] and [r["reward"] for r in again] == [r["reward"] for r in rows]
    card = (final / "README.md").read_text()
    assert "trained on the base loaded in 4 bits" in card and "products in float32" in card
    state = {n: p for n, p in models.load(str(final))[0].named_parameters() if "lora_B" in n}
    assert state and max(float(p.abs().max()) for p in state.values()) > 0  # B starts at 0: it learned

    _, tok = models.load(str(final))
    ids = tok("Mia has 3 apples and buys 4 more.", return_tensors="pt").input_ids
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    monkeypatch.chdir(tmp_path)  # the card's snippet, as a user runs it
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace("PATH/TO/THIS/FOLDER", str(final))
    scope: dict = {}
    exec(snippet, scope)
    on_four = scope["model"].eval()
    assert "BitsAndBytesConfig" in snippet and type(on_four.get_base_model().model.layers[0].mlp.fc1).__name__ == "Linear4bit"
    ours_four = models.load(str(final), load_in_4bit=True)[0].eval()
    with torch.no_grad():
        want = ours_four(ids).logits
        # the snippet's model decodes with bitsandbytes' bf16 inference kernel (ours never does: it trains)
        bf16 = 0.01 * float(want.abs().max())
        assert torch.allclose(on_four(ids).logits, want, atol=bf16)
        with on_four.disable_adapter():
            assert not torch.allclose(on_four(ids).logits, want, atol=3 * bf16)  # the adapter is what moves it
        on_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(final)).eval()(ids).logits
        merged = models.merge(str(final), tmp_path / "merged")
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(merged)(ids).logits, on_full, atol=1e-4)
    with pytest.raises(UserError, match="round the update away"):
        models.save(ours_four, tok, tmp_path / "lossy", merged=True)


def test_plan_counts_a_4bit_base_on_a_cpu_as_loaded(phi, tmp_path):
    """`thinkforge plan` on a CPU: a 4-bit base is half a byte per quantized weight plus its NF4 block scales
    (double-quantized), the rest float32, as training loads it."""
    from thinkforge import plan
    from thinkforge.train import loop

    recipe = _card(phi)
    model, _, _ = loop.load_for_training(recipe, tmp_path)
    frozen = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    scales = 0
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):  # not PEFT's LoRA wrapper of one, also named Linear4bit
            qs = module.weight.quant_state
            scales += qs.absmax.nbytes + qs.state2.absmax.nbytes  # per block; the code tables are constants
    config = plan._config(recipe)
    shape, s = plan.shape_of(config, recipe.lora), plan.settings_for(recipe, "rl", "cpu", config)
    assert s.in_4bit and s.weights == "float32"
    assert plan.frozen_bytes(shape, s) == pytest.approx(frozen + scales, rel=0.001)


def test_a_bf16_base_in_4_bits_is_what_the_adapters_card_loads(phi, tmp_path):
    """The card names the compute dtype the 4-bit layers had (bf16 here, as a CUDA run's), read from bitsandbytes'
    layers and not from PEFT's LoRA wrapper of them (also named Linear4bit, without one)."""
    model, tok = models.load(phi, dtype="bfloat16", load_in_4bit=True)
    assert models.four_bit_of(model) == "bfloat16"
    model = models.add_lora(model, 16, 32, 0.0, ["q_proj", "k_proj", "v_proj", "dense"])
    assert models.four_bit_of(model) == "bfloat16"
    card = (models.save(model, tok, tmp_path / "adapter") / "README.md").read_text()
    assert "products in bfloat16" in card and "bnb_4bit_compute_dtype=torch.bfloat16" in card
    assert models.four_bit_of(models.load(phi)[0]) is None
