"""One normaliser for every stage: two ranks' half-batches, their normalisers summed (what one all-reduce
does), give exactly the full batch's loss and gradient, for sft (packed), dpo and rl (every aggregation)."""

import pytest
import torch
from test_rl import _rollout
from test_sft import _examples

from thinkforge.config import load_config
from thinkforge.data.packing import pack
from thinkforge.losses import grpo_advantages, normaliser
from thinkforge.train import dpo, rl, sft


def _grads(model):
    out = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
    model.zero_grad()
    return out


def test_sft_packed_two_halves_equal_the_full_batch(tiny_loaded):
    model, tok = tiny_loaded
    model.eval()  # no dropout: every pass sees the same function
    cfg = load_config(None, ["midtrain.max_len=160"]).midtrain
    rows = pack(_examples(tok, 8), cfg.max_len)
    assert len(rows) >= 4
    batches = [sft.collate(rows[i : i + 1], cfg, tok.pad_token_id) for i in range(4)]  # one row per micro-batch
    full = sft.step_normaliser(batches)
    for b in batches:
        sft.forward_loss(model, b, full).backward()
    want = _grads(model)
    halves = sft.step_normaliser(batches[:2]) + sft.step_normaliser(batches[2:])  # rank 0 + rank 1
    assert halves == full
    loss = sum(sft.forward_loss(model, b, halves).item() for b in batches)
    for b in batches:
        sft.forward_loss(model, b, halves).backward()
    assert torch.allclose(_grads(model), want, atol=1e-7)
    assert loss == pytest.approx(sft.forward_loss(model, sft.collate(rows[:4], cfg, tok.pad_token_id), full).item(), abs=1e-6)


def test_dpo_two_halves_equal_the_full_batch(tiny_loaded):
    from thinkforge.data.packing import tokenize

    model, tok = tiny_loaded
    model.eval()
    cfg = load_config(None, ["dpo.beta=0.5"]).dpo
    pairs = [(tokenize(tok, f"Q{i} ", "<answer>4</answer>", 64), tokenize(tok, f"Q{i} ", f"<think>{i}</think><answer>{i}</answer>", 64))
             for i in range(4)]
    ref = torch.randn(4, 2)  # a reference that differs from the policy
    full = dpo.step_normaliser(4)
    whole, _ = dpo.backward(model, pairs, ref, full, cfg, tok.pad_token_id)
    want = _grads(model)
    halves = dpo.step_normaliser(2) + dpo.step_normaliser(2)
    assert halves == full
    a, _ = dpo.backward(model, pairs[:2], ref[:2], halves, cfg, tok.pad_token_id)
    b, _ = dpo.backward(model, pairs[2:], ref[2:], halves, cfg, tok.pad_token_id)
    assert a + b == pytest.approx(whole, abs=1e-6)
    assert torch.allclose(_grads(model), want, atol=1e-7)


@pytest.mark.parametrize("agg", ["sequence", "token", "constant"])
def test_rl_two_halves_equal_the_full_batch(tiny_loaded, agg):
    model, tok = tiny_loaded
    model.eval()
    texts = ["<think>3 + 1 = 4</think><answer>4</answer>", "<answer>5</answer>", "<think>long " * 5 + "</think>",
             "<answer>4</answer>", "<think>a</think><answer>4</answer>", "<answer>7</answer>",
             "<answer>2</answer>", "<think>b c</think><answer>1</answer>"]
    rewards = [1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0]
    cfg = load_config(None, [f"rl.loss_agg={agg}", "rl.micro_batch=3", "rl.group_size=2", "rl.beta=0",
                             "rl.max_new_tokens=40"]).rl
    parts = [_rollout(tok, texts, rewards, 2), _rollout(tok, texts[:4], rewards[:4], 2), _rollout(tok, texts[4:], rewards[4:], 2)]
    for ro in parts:
        ro.loss_mask = ro.completion_mask.float()
        ro.loss_mask[1] = 0.0  # a sample without loss tokens (truncated or re-balanced) counts nowhere
        ro.advantages = grpo_advantages(ro.rewards, 2)
    whole, rank0, rank1 = parts
    full = normaliser(whole.loss_mask, agg, cfg.max_new_tokens)
    stats = rl.backward(model, whole, full, cfg)
    want = _grads(model)
    rank1.loss_mask = rank1.completion_mask.float()  # rank 1's groups are the whole batch's groups 2 and 3
    assert torch.equal(rank1.advantages, whole.advantages[4:])
    halves = normaliser(rank0.loss_mask, agg, cfg.max_new_tokens) + normaliser(rank1.loss_mask, agg, cfg.max_new_tokens)
    assert halves == full
    s0 = rl.backward(model, rank0, halves, cfg)
    s1 = rl.backward(model, rank1, halves, cfg)
    assert torch.allclose(_grads(model), want, atol=1e-7)
    assert s0["loss"] + s1["loss"] == pytest.approx(stats["loss"], abs=1e-6)
