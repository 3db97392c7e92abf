"""RL math against the formulas of SPEC 4 on hand-made tensors."""

import math

import pytest
import torch

from thinkforge.losses import (
    aggregate,
    gae,
    group_advantages,
    kl_k3,
    overlong_penalty,
    policy_loss,
    value_loss,
)


def test_group_advantages_grpo_and_dr_grpo():
    r = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])  # two groups of 3
    grpo = group_advantages(r, 3, eps=0.0)
    std = torch.tensor([1.0, -1.0, -1.0]).std().item()  # sample std of the first group
    assert grpo[:3].tolist() == pytest.approx([(1 + 1 / 3) / std, (-1 + 1 / 3) / std, (-1 + 1 / 3) / std])
    assert grpo[3:].tolist() == [0.0, 0.0, 0.0]  # zero variance: no signal
    dr = group_advantages(r, 3, scale=False)
    assert dr.tolist() == pytest.approx([4 / 3, -2 / 3, -2 / 3, 0, 0, 0])


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    want = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert kl_k3(logp, ref).tolist() == pytest.approx(want)
    assert kl_k3(logp, logp).abs().max() == 0


def test_aggregation_modes():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(v, m, "token").item() == pytest.approx(10 / 4)  # DAPO: all tokens together
    assert aggregate(v, m, "sequence").item() == pytest.approx((2 + 4) / 2)  # GRPO: per-sample means
    assert aggregate(v, m, "constant", 6.0).item() == pytest.approx(10 / 6)  # Dr. GRPO: G x max length


def test_clipping_low_high_and_fraction():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.7, 0.9, 1.2, 1.4]]))  # ratios
    mask = torch.ones(1, 4)
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28, agg="token")
    # A > 0: min(rho, clip(rho)) = [0.7, 0.9, 1.2, 1.28]
    assert loss.item() == pytest.approx(-(0.7 + 0.9 + 1.2 + 1.28) / 4, abs=1e-6)
    assert m["clip_fraction"] == pytest.approx(0.25)
    loss, m = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28, agg="token")
    # A < 0: min(-rho, -clip(rho)) = -max(rho, clip) = [-0.8, -0.9, -1.2, -1.4]
    assert loss.item() == pytest.approx((0.8 + 0.9 + 1.2 + 1.4) / 4, abs=1e-6)
    assert m["clip_fraction"] == pytest.approx(0.25)


def test_on_policy_ratio_is_one_but_gradient_is_not_zero():
    logits = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :2]  # (1, 2)
    mask = torch.ones(1, 2)
    loss, m = policy_loss(logp, logp.detach(), torch.tensor([1.0]), mask, beta=0.0)
    assert m["ratio_mean"] == pytest.approx(1.0) and m["kl"] == 0.0
    loss.backward()
    assert logits.grad.abs().sum() > 0  # PITFALLS 1: loss reads -A but gradients flow


def test_kl_term_and_sequence_aggregation():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, m = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=0.1, agg="sequence")
    k = kl_k3(logp, ref)
    obj0 = ((2.0 - 0.1 * k[0, 0]) + (2.0 - 0.1 * k[0, 1])) / 2
    obj1 = -1.0 - 0.1 * k[1, 0]
    assert loss.item() == pytest.approx(-(obj0 + obj1).item() / 2, abs=1e-6)
    assert m["kl"] == pytest.approx(((k[0, 0] + k[0, 1] + k[1, 0]) / 3).item(), abs=1e-6)
    # beta 0 with a reference (PPO carries the KL in its reward): the loss has no KL term, the log still has the KL
    loss0, m0 = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=0.0, agg="sequence")
    plain, _ = policy_loss(logp, logp.detach(), adv, mask, agg="sequence")
    assert loss0.item() == pytest.approx(plain.item()) and m0["kl"] == pytest.approx(m["kl"])


def test_gae_by_hand():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, m, gamma, lam)
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])


def test_gae_stops_at_the_end_of_each_sequence():
    r = torch.tensor([[0.0, 1.0, 0.0]])
    v = torch.tensor([[0.2, 0.4, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])  # last position is padding
    adv, _ = gae(r, v, m, 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([(1.0 - 0.4) + (0.4 - 0.2), 1.0 - 0.4, 0.0])


def test_value_loss_is_clipped():
    v, old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    # unclipped (1-2)^2 = 1; clipped V = 0.2 -> (0.2-2)^2 = 3.24; max -> 3.24, times 0.5
    assert value_loss(v, old, ret, torch.ones(1, 1), clip=0.2).item() == pytest.approx(1.62)


def test_dapo_overlong_penalty():
    lengths = torch.tensor([10, 16, 18, 20])
    assert overlong_penalty(lengths, max_len=20, cache=4).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
