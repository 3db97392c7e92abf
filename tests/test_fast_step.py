"""The fast CPU decode step (engine/fast.py) computes what transformers' forward computes, and is never stale."""

from __future__ import annotations

import pytest
import torch

from thinkforge.arch import ARCHS
from thinkforge.engine.cache import kv_cache, reserved_layer
from thinkforge.engine.decode import Prompts, decode
from thinkforge.rollout.types import SamplingParams


def tiny(tmp_path, arch, **kw):
    from thinkforge import models, tiny
    from thinkforge.config import InitConfig

    folder = tiny.init_model(tmp_path / arch, InitConfig(arch=arch, hidden=64, layers=2, heads=4), seed=2)
    model, tok = models.load(str(folder), dtype="float32", device="cpu")
    return model.eval(), tok


def step_logits(model, prompts, steps: int, fast: bool, autocast: bool = False):
    """Logits of `steps` decode steps after a left-padded prefill, feeding the argmax of transformers' logits."""
    from thinkforge.engine.fast import choose
    from thinkforge.models import forward_cached
    from thinkforge.rollout.types import left_pad

    ids, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        cache = kv_cache(model, ids.shape[1] + steps)  # the decode loop's: reserved layers, one dtype
        assert all(type(x) is reserved_layer() for x in cache.layers)
        o, cache = forward_cached(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        nxt, nxt_pos = o.logits[:, -1].argmax(-1), pos[:, -1] + 1
        step = choose(model, cache, ids.shape[1] + steps, {}) if fast else None
        assert (step is not None) == fast
        if step is not None:
            step_logits.dtype, step_logits.plain = step.dtype, step.plain
            step_logits.one_call = step.lists is not None  # kernels.llama_layers
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], -1)
            if step is not None:
                logits = step(nxt, nxt_pos, mask.bool(), cache)
            else:
                o, cache = forward_cached(model, cache, input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos[:, None])
                logits = o.logits[:, -1].float()
            out.append(logits)
            nxt, nxt_pos = logits.argmax(-1), nxt_pos + 1
    return torch.stack(out)


PROMPTS = [[5, 9, 12, 40, 7], [33, 8], [17, 17, 90, 3, 4, 5, 6]]
FAST = [name for name, row in ARCHS.items() if row.fast_step]  # a row marked fast_step is tested below as it is added


def test_a_streamed_sample_is_the_generated_one(tmp_path):
    """`stream` runs the decode loop of `generate` with the same per-sample stream: the same text when sampling."""
    from thinkforge.rollout.hf import HFGenerator

    model, tok = tiny(tmp_path, "llama")
    gen = HFGenerator(model, tok)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    pieces = list(gen.stream("Mia has 3 apples", params))
    assert len(pieces) > 1 and "".join(pieces) == gen.generate(["Mia has 3 apples"], 1, params)[0].text


@pytest.fixture(params=["kernels", "onednn"])
def layout(request, monkeypatch):
    """Both layouts of the fast step's weights: plain ones for engine/kernels.py's products (a decode of at most
    kernels.ROWS rows, these tests' 1-3), and oneDNN's blocked one (more rows: here ROWS set to 0)."""
    from thinkforge.engine import kernels

    if request.param == "kernels":
        assert kernels.ops() is not None, f"the CPU kernels did not build: {kernels.why_not()}"
    else:
        monkeypatch.setattr(kernels, "ROWS", 0)
    return request.param


def ran(layout: str) -> bool:
    """After step_logits: the step ran the layout asked for."""
    return step_logits.plain == (layout == "kernels")


@pytest.mark.parametrize("arch", FAST)
@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["left-padded", "one-prompt"])
def test_the_fast_step_gives_transformers_logits(tmp_path, arch, prompts, layout):
    model = _random_biases_and_norms(tiny(tmp_path, arch)[0])
    ours, theirs = step_logits(model, prompts, 6, True), step_logits(model, prompts, 6, False)
    assert ran(layout)
    assert step_logits.one_call == (layout == "kernels" and ARCHS[arch].fast_step == "llama")  # Llama's layers in one call
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_partial_rotary_and_wide_heads(tmp_path, layout):
    """Phi-4-mini rotates 3/4 of each head (partial_rotary_factor) and has more query heads than kv heads."""
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, partial_rotary_factor=0.75, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ours, theirs = step_logits(model, PROMPTS, 6, True), step_logits(model, PROMPTS, 6, False)
    assert ran(layout)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_attention_biases_on_q_k_v_and_o(tmp_path, layout):
    """Llama's attention_bias puts a bias on o_proj too (Qwen2: q/k/v only): the one-call layers add it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, attention_bias=True, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = _random_biases_and_norms(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    ours, theirs = step_logits(model, PROMPTS, 4, True), step_logits(model, PROMPTS, 4, False)
    assert ran(layout)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_both_layouts_are_kept_across_batch_sizes(tmp_path):
    """A server's batches cross kernels.ROWS back and forth: each layout is made once, then kept (re-packing the
    oneDNN copy at every switch cost 0.3 s a switch on SmolLM2), and an outdated one is dropped."""
    from thinkforge.engine import kernels

    model, _ = tiny(tmp_path, "llama")
    params, held = SamplingParams(max_new_tokens=3, temperature=0.0), {}
    few, many = Prompts(PROMPTS[:1], 1, [], 0), Prompts(PROMPTS[:1], kernels.ROWS + 1, [], 0)
    decode(model, few, params, fast=held)
    decode(model, many, params, fast=held)
    kept = dict(held)
    assert set(kept) == {"plain", "packed"} and kept["plain"].plain and not kept["packed"].plain
    for prompts in (few, many, few):
        decode(model, prompts, params, fast=held)
    assert held == kept and all(held[s] is kept[s] for s in held)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    decode(model, few, params, fast=held)
    assert set(held) == {"plain"} and held["plain"] is not kept["plain"]


def _random_biases_and_norms(model):
    """Every bias and norm of `model` drawn at random (a random-init model has zero biases and unit norms: a step
    that dropped them would pass)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.3)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def test_phi2_layers_with_their_biases_norms_and_half_rotated_heads(tmp_path, layout):
    """Phi-2's layer: one LayerNorm (weight and bias) feeding attention and the GELU MLP in parallel, a bias on
    q/k/v, dense, fc1, fc2 and the output layer, rotary on half of each head (the tiny model's 0.5; Phi-2: 0.4)."""
    model, _ = tiny(tmp_path, "phi")
    assert model.config.rope_parameters["partial_rotary_factor"] < 1 and model.lm_head.bias is not None
    model = _random_biases_and_norms(model)
    ours, theirs = step_logits(model, PROMPTS, 6, True), step_logits(model, PROMPTS, 6, False)
    assert ran(layout)
    # tighter than the other tests' 1e-4: the exact GELU in place of Phi-2's tanh one moves these logits by 1e-5
    assert (ours - theirs).abs().max() < 2e-6 * theirs.abs().max()


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_under_bf16_autocast_the_step_packs_bf16(tmp_path, arch):
    model, _ = tiny(tmp_path, arch)
    model = _random_biases_and_norms(model) if arch == "phi" else model
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 in oneDNN")
    ours, theirs = step_logits(model, PROMPTS, 4, True, True), step_logits(model, PROMPTS, 4, False, True)
    assert step_logits.dtype == torch.bfloat16
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_biases_on_some_projections_only(tmp_path, layout):
    """A bias on k and up but not on q, v, gate: the stacked products keep them (zeros where there are none)."""
    model, _ = tiny(tmp_path, "llama")
    for layer in model.model.layers:
        for old, name, parent in ((layer.self_attn.k_proj, "k_proj", layer.self_attn), (layer.mlp.up_proj, "up_proj", layer.mlp)):
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.normal_(0, 0.5)
            setattr(parent, name, new)
    ours, theirs = step_logits(model, PROMPTS, 4, True), step_logits(model, PROMPTS, 4, False)
    assert ran(layout)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_a_lora_adapter_is_merged_in(tmp_path, arch, layout):
    from tests.conftest import random_lora

    model, _ = tiny(tmp_path, arch)
    model = random_lora(model, r=4, alpha=8, std=0.5).eval()
    ours, theirs = step_logits(model, PROMPTS, 4, True), step_logits(model, PROMPTS, 4, False)
    assert ran(layout)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_weights_changed_in_place_are_never_stale(tmp_path):
    """An optimizer step changes the weights in place: the next decode call packs them again, with no sync."""
    model, tok = tiny(tmp_path, "llama")
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    held = {}
    first = decode(model, Prompts(PROMPTS, 1, [], 0), params, fast=held)
    step = held["plain"]  # 3 rows: the kernels' layout
    assert decode(model, Prompts(PROMPTS, 1, [], 0), params, fast=held) == first and held["plain"] is step  # unchanged: kept
    weight = model.model.layers[0].mlp.down_proj.weight
    for change in (lambda: weight.mul_(-3.0), lambda: setattr(weight, "data", weight.data * -2.0)):
        with torch.no_grad():
            change()
        again = decode(model, Prompts(PROMPTS, 1, [], 0), params, fast=held)
        assert held["plain"] is not step
        assert again == decode(model, Prompts(PROMPTS, 1, [], 0), params) != first  # transformers' forward, on the new weights
        step, first = held["plain"], again


def test_an_adapter_switched_off_is_seen(tmp_path):
    from tests.conftest import random_lora

    model, _ = tiny(tmp_path, "llama")
    model = random_lora(model, r=4, alpha=8, std=0.5).eval()
    params, held = SamplingParams(max_new_tokens=8, temperature=0.0), {}
    with_adapter = decode(model, Prompts(PROMPTS, 1, [], 0), params, fast=held)
    with model.disable_adapter():
        without = decode(model, Prompts(PROMPTS, 1, [], 0), params, fast=held)
        assert without == decode(model, Prompts(PROMPTS, 1, [], 0), params)
    assert without != with_adapter
    assert decode(model, Prompts(PROMPTS, 1, [], 0), params, fast=held) == with_adapter


def test_adapters_it_cannot_merge_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    from thinkforge.engine.fast import refuses

    model, _ = tiny(tmp_path, "llama")
    embedded = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert "embed" in refuses(embedded, 64)
    model, _ = tiny(tmp_path, "llama")
    dora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in refuses(dora, 64)


def test_a_quantized_linear_is_refused(tmp_path):
    """A 4-bit layer's .weight is packed codes, not a matrix: such a model keeps transformers' forward."""
    from thinkforge.engine.fast import refuses

    class Linear4bit(torch.nn.Linear):  # a stand-in of bitsandbytes' class (not installable here): a subclass
        pass

    model, _ = tiny(tmp_path, "llama")
    old = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = Linear4bit(old.in_features, old.out_features, bias=False)
    assert "Linear4bit" in refuses(model, 64)


def test_what_the_step_refuses_says_why(tmp_path):
    from thinkforge.engine.fast import refuses

    model, _ = tiny(tmp_path, "qwen3")  # its q/k norms are not in the step yet
    assert "Qwen3ForCausalLM is not one of" in refuses(model, 64)
    llama, _ = tiny(tmp_path, "llama")
    assert refuses(llama, 64) is None
    llama.config.hidden_act = "gelu"
    assert "activation gelu (the fast step's llama layers have silu)" in refuses(llama, 64)
    phi, _ = tiny(tmp_path, "phi")
    assert refuses(phi, 64) is None
    phi.config.hidden_act = "relu"
    assert "activation relu (the fast step's phi layers have gelu_new, gelu_pytorch_tanh, gelu)" in refuses(phi, 64)
    phi.config.hidden_act, phi.config.qk_layernorm = "gelu_new", True
    assert "qk_layernorm" in refuses(phi, 64)


def test_a_model_on_the_slow_path_is_told_why_once(tmp_path):
    """Three places decided whether the fast step ran and threw the reason away, so a model silently decoded on
    transformers' forward. Now `refuses` decides, and a CPU model it refuses is told why, once per model."""
    import warnings

    from thinkforge.rollout.hf import HFGenerator
    from thinkforge.rollout.types import SamplingParams

    model, tok = tiny(tmp_path, "qwen3")
    gen = HFGenerator(model, tok, 4)
    params = SamplingParams(max_new_tokens=3, temperature=0.0)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        gen.generate(["a b", "c"], 2, params)
        gen.generate(["d"], 1, params)
    said = [str(w.message) for w in told if "fast CPU step" in str(w.message)]
    assert said == ["Qwen3ForCausalLM decodes with transformers' forward, not the fast CPU step: Qwen3ForCausalLM is not "
                    "one of PhiForCausalLM, Phi3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"]
    llama, tok = tiny(tmp_path, "llama")
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        HFGenerator(llama, tok, 4).generate(["a b"], 1, params)  # taken: nothing to tell
    assert not [w for w in told if "fast CPU step" in str(w.message)]
