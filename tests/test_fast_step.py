"""The packed CPU decode step (rollout/fast.py) computes what transformers' forward computes, and is never stale."""

from __future__ import annotations

import pytest
import torch

from thinkforge.rollout.hf import decode, reserved_layer
from thinkforge.rollout.types import SamplingParams


def tiny(tmp_path, arch, **kw):
    from thinkforge import models, tiny
    from thinkforge.config import InitConfig

    folder = tiny.init_model(tmp_path / arch, InitConfig(arch=arch, hidden=64, layers=2, heads=4), seed=2)
    model, tok = models.load(str(folder), dtype="float32", device="cpu")
    return model.eval(), tok


def step_logits(model, prompts, steps: int, fast: bool, autocast: bool = False):
    """Logits of `steps` decode steps after a left-padded prefill, feeding the argmax of transformers' logits."""
    from transformers import DynamicCache

    from thinkforge.models import forward_cached
    from thinkforge.rollout.fast import fast_step
    from thinkforge.rollout.types import left_pad

    ids, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache.layers = [reserved_layer()(ids.shape[1] + steps) for _ in cache.layers]
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o, cache = forward_cached(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        nxt, nxt_pos = o.logits[:, -1].argmax(-1), pos[:, -1] + 1
        step = fast_step(model, cache, ids.shape[1] + steps) if fast else None
        assert (step is not None) == fast
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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_the_packed_step_gives_transformers_logits(tmp_path, arch):
    model, _ = tiny(tmp_path, arch)
    ours, theirs = step_logits(model, PROMPTS, 6, True), step_logits(model, PROMPTS, 6, False)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_under_bf16_autocast_the_step_packs_bf16(tmp_path):
    model, _ = tiny(tmp_path, "llama")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 in oneDNN")
    ours, theirs = step_logits(model, PROMPTS, 4, True, True), step_logits(model, PROMPTS, 4, False, True)
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_a_lora_adapter_is_merged_in(tmp_path):
    from tests.conftest import random_lora

    model, _ = tiny(tmp_path, "llama")
    model = random_lora(model, r=4, alpha=8, std=0.5).eval()
    ours, theirs = step_logits(model, PROMPTS, 4, True), step_logits(model, PROMPTS, 4, False)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_weights_changed_in_place_are_never_stale(tmp_path):
    """An optimizer step changes the weights in place: the next decode call packs them again, with no sync."""
    model, tok = tiny(tmp_path, "llama")
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    held = {}
    first = decode(model, PROMPTS, 1, params, [], 0, packed=held)
    step = held["step"]
    assert decode(model, PROMPTS, 1, params, [], 0, packed=held) == first and held["step"] is step  # unchanged: kept
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    again = decode(model, PROMPTS, 1, params, [], 0, packed=held)
    assert held["step"] is not step
    assert again == decode(model, PROMPTS, 1, params, [], 0)  # what transformers' forward gives now
    assert again != first


def test_what_the_step_refuses_says_why(tmp_path):
    from thinkforge.rollout.fast import refuses

    model, _ = tiny(tmp_path, "phi")
    assert "PhiForCausalLM" in refuses(model, 64)
    llama, _ = tiny(tmp_path, "llama")
    assert refuses(llama, 64) is None
    llama.config.hidden_act = "gelu"
    assert "gelu" in refuses(llama, 64)
