"""RL math against the formulas of SPEC 4 on hand-made tensors."""

import math

import pytest
import torch

from thinkforge.losses import (
    ADVANTAGES,
    POLICY_LOSSES,
    dr_grpo_advantages,
    grpo_advantages,
    kl_k3,
    masked_mean,
    masked_whiten,
    normaliser,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from thinkforge.train.ppo import gae, ppo_targets, value_loss


def _loss(logp, old, adv, mask, agg="token", **kw):
    return policy_loss(logp, old, adv, mask, normaliser(mask, agg, mask.shape[1]), **kw)


def test_group_advantages_grpo_and_dr_grpo():
    r = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])  # two groups of 3
    grpo = grpo_advantages(r, 3, eps=0.0)
    std = torch.tensor([1.0, -1.0, -1.0]).std().item()  # sample std of the first group
    assert grpo[:3].tolist() == pytest.approx([(1 + 1 / 3) / std, (-1 + 1 / 3) / std, (-1 + 1 / 3) / std])
    assert grpo[3:].tolist() == [0.0, 0.0, 0.0]  # zero variance: no signal
    dr = dr_grpo_advantages(r, 3)
    assert dr.tolist() == pytest.approx([4 / 3, -2 / 3, -2 / 3, 0, 0, 0])


def test_rloo_is_the_leave_one_out_baseline():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])  # groups [1, 0, 0] and [2, 4, 6]
    # sample 0: 1 - mean(0, 0) = 1; sample 1: 0 - mean(1, 0) = -0.5; sample 3: 2 - mean(4, 6) = -3
    assert rloo_advantages(r, 3).tolist() == pytest.approx([1.0, -0.5, -0.5, -3.0, 0.0, 3.0])
    assert rloo_advantages(r, 3).tolist() == pytest.approx((dr_grpo_advantages(r, 3) * 3 / 2).tolist())


def test_reinforce_pp_centres_in_the_group_and_scales_by_the_batch():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    centered = [2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0]  # mean 0 over the batch
    std = math.sqrt(sum(c * c for c in centered) / 6)  # population std over all six samples
    assert reinforce_pp_advantages(r, 3).tolist() == pytest.approx([c / std for c in centered], rel=1e-6, abs=1e-6)


def test_reinforce_pp_whitens_over_the_samples_the_step_counts():
    """A rank's stand-in group (mask 0) moves neither the step's mean nor its std, and gets advantage 0."""
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    stand_in = torch.tensor([9.0, -9.0, 3.0])
    adv = reinforce_pp_advantages(torch.cat([r, stand_in]), 3, torch.tensor([1.0] * 6 + [0.0] * 3), lambda xs: list(xs))
    assert adv.tolist() == pytest.approx(reinforce_pp_advantages(r, 3).tolist() + [0.0] * 3, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_registered_estimator_ranks_a_groups_samples_by_reward(name):
    """Whatever is registered: within each group the best sample gets the highest advantage, the worst the
    lowest, and a group whose rewards are all equal gets none."""
    rewards = torch.tensor([1.0, -1.0, 0.5, 2.0, 2.0, 2.0])
    adv = ADVANTAGES[name](rewards, 3)
    assert adv[0] > adv[2] > adv[1]
    assert torch.allclose(adv[3:], torch.zeros(3), atol=1e-6)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_registered_policy_loss_raises_a_positive_advantage_sample_and_lowers_a_negative_one(name):
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3], [0, 1, 2]])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (2, 3)
    mask = torch.ones(2, 3)
    loss, _ = _loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, "token", kind=name)
    loss.backward()
    step = -logits.grad  # a gradient-descent step
    moved = (torch.log_softmax(logits.detach() + 0.1 * step, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logp.detach())
    assert (moved[0] > 0).all() and (moved[1] < 0).all()


def test_masked_mean_and_whiten_by_hand():
    v = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(v, m).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(v, m, -1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_mean(v, torch.zeros_like(m)).item() == 0.0
    w = masked_whiten(v, m)
    std = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3)
    assert w.flatten().tolist() == pytest.approx([-1 / std, 0.0, 0.0, 1 / std, 0.0, 0.0], abs=1e-6)


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    want = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert kl_k3(logp, ref).tolist() == pytest.approx(want)
    assert kl_k3(logp, logp).abs().max() == 0


def test_aggregation_modes():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert normaliser(m, "token")(v, m).item() == pytest.approx(10 / 4)  # DAPO: all tokens together
    assert normaliser(m, "sequence")(v, m).item() == pytest.approx((2 + 4) / 2)  # GRPO: per-sample means
    assert normaliser(m, "constant", 3)(v, m).item() == pytest.approx(10 / 6)  # Dr. GRPO: G x max length
    # an empty row counts in no denominator
    m0 = torch.cat([m, torch.zeros(1, 3)])
    v0 = torch.cat([v, torch.full((1, 3), 7.0)])
    assert normaliser(m0, "sequence")(v0, m0).item() == pytest.approx(3.0)
    assert normaliser(m0, "constant", 3)(v0, m0).item() == pytest.approx(10 / 6)


@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
def test_two_half_batches_summed_equal_the_full_batch(mode):
    """What one all-reduce of the normaliser does: two ranks' halves give the full batch's loss."""
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0], [7.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    full = normaliser(m, mode, 3)
    halves = normaliser(m[:2], mode, 3) + normaliser(m[2:], mode, 3)  # the all-reduce (sum)
    assert halves == full
    assert (full(v[:2], m[:2]) + full(v[2:], m[2:])).item() == pytest.approx(full(v, m).item())


def test_clipping_low_high_and_fraction():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.7, 0.9, 1.2, 1.4]]))  # ratios
    mask = torch.ones(1, 4)
    loss, m = _loss(logp, old, torch.tensor([1.0]), mask, clip=(0.2, 0.28))
    # A > 0: min(rho, clip(rho)) = [0.7, 0.9, 1.2, 1.28]
    assert loss.item() == pytest.approx(-(0.7 + 0.9 + 1.2 + 1.28) / 4, abs=1e-6)
    assert m["clip_fraction"] == pytest.approx(0.25)
    loss, m = _loss(logp, old, torch.tensor([-1.0]), mask, clip=(0.2, 0.28))
    # A < 0: min(-rho, -clip(rho)) = -max(rho, clip) = [-0.8, -0.9, -1.2, -1.4]
    assert loss.item() == pytest.approx((0.8 + 0.9 + 1.2 + 1.4) / 4, abs=1e-6)
    assert m["clip_fraction"] == pytest.approx(0.25)


def test_on_policy_ratio_is_one_but_gradient_is_not_zero():
    logits = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :2]  # (1, 2)
    mask = torch.ones(1, 2)
    loss, m = _loss(logp, logp.detach(), torch.tensor([1.0]), mask, "sequence", beta=0.0)
    assert m["ratio_mean"] == pytest.approx(1.0) and "kl" not in m  # no reference: no KL is reported, not a 0
    loss.backward()
    assert logits.grad.abs().sum() > 0  # PITFALLS 1: loss reads -A but gradients flow


def test_kl_term_and_sequence_aggregation():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, m = _loss(logp, logp.detach(), adv, mask, "sequence", ref_logp=ref, beta=0.1)
    k = kl_k3(logp, ref)
    obj0 = ((2.0 - 0.1 * k[0, 0]) + (2.0 - 0.1 * k[0, 1])) / 2
    obj1 = -1.0 - 0.1 * k[1, 0]
    assert loss.item() == pytest.approx(-(obj0 + obj1).item() / 2, abs=1e-6)
    assert m["kl"] == pytest.approx(((k[0, 0] + k[0, 1] + k[1, 0]) / 3).item(), abs=1e-6)
    # beta 0 with a reference (PPO carries the KL in its reward): the loss has no KL term, the log still has the KL
    loss0, m0 = _loss(logp, logp.detach(), adv, mask, "sequence", ref_logp=ref, beta=0.0)
    plain, _ = _loss(logp, logp.detach(), adv, mask, "sequence")
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
    mask = torch.ones(1, 1)
    # unclipped (1-2)^2 = 1; clipped V = 0.2 -> (0.2-2)^2 = 3.24; max -> 3.24, times 0.5
    assert value_loss(v, old, ret, mask, 0.2, normaliser(mask)).item() == pytest.approx(1.62)


def test_ppo_targets_by_hand():
    """Reward on the last completion token, minus the per-token KL penalty; GAE; whitened over the batch."""
    rewards = torch.tensor([1.0, -1.0])
    values = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    penalty = torch.tensor([[0.1, 0.2, 9.0], [0.3, 9.0, 9.0]])
    adv, ret = ppo_targets(rewards, values, mask, 1.0, 1.0, penalty)
    # row 0: token rewards [-0.1, 1 - 0.2]; A_1 = 0.8 - 0.2 = 0.6, A_0 = -0.1 + 0.2 - 0.5 + A_1 = 0.2
    # row 1: token reward [-1 - 0.3]; A_0 = -1.3 - 0.1 = -1.4
    raw = [0.2, 0.6, -1.4]
    mean = sum(raw) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / 3)
    want = [(a - mean) / std for a in raw]
    assert adv[0, :2].tolist() == pytest.approx(want[:2], abs=1e-5) and adv[1, 0].item() == pytest.approx(want[2], abs=1e-5)
    assert adv[0, 2] == 0 and adv[1, 1:].abs().sum() == 0
    assert ret.flatten().tolist() == pytest.approx([0.7, 0.8, 0.0, -1.3, 0.0, 0.0], abs=1e-6)  # A + V, unwhitened


def test_gspo_has_one_ratio_per_sequence_and_the_sequence_gradient():
    logits = torch.tensor([[0.3, -0.2, 0.1, 0.4]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :3]  # (1, 3) log-probs of three tokens
    old = logp.detach() + torch.tensor([[0.1, -0.3, 0.05]])  # the sampler's
    mask = torch.ones(1, 3)
    s = math.exp(((logp.detach() - old) * mask).sum().item() / 3)  # exp(mean of the log-ratios)
    objective, ratio, clipped = POLICY_LOSSES["gspo"](logp, old, torch.tensor([[2.0]]), mask, 0.2, 0.2)
    assert ratio.flatten().tolist() == pytest.approx([s, s, s], rel=1e-6) and not clipped.any()
    (objective * mask).sum(-1).div(3).sum().backward()  # sequence aggregation
    got = logits.grad.clone()
    logits.grad = None
    lp = torch.log_softmax(logits, -1)[:, :3]
    (2.0 * torch.exp((lp - old).mean())).backward()  # the paper: A * s_i, s_i as a function of the policy
    assert torch.allclose(got, logits.grad, atol=1e-6)
    # clipped as a whole: far off-policy, every token of the sequence is clipped
    _, _, clipped = POLICY_LOSSES["gspo"](logp, old - 1.0, torch.tensor([[2.0]]), mask, 0.2, 0.2)
    assert clipped.all()



def test_gspo_at_the_aggregation_config_gives_it_is_the_papers_mean_over_sequences():
    """GSPO (Zheng et al. 2025): J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - lo, 1 + hi) A_i), s_i = exp(mean_t of
    the log-ratios), at the aggregation rl.policy_loss=gspo gets unless told: a 1-token sequence counts as much as
    a 3-token one (the token mean, once its default, weighted them 1:3)."""
    from thinkforge.config import load_config

    agg = load_config(None, ["rl.policy_loss=gspo"]).rl.loss_agg
    logp = torch.tensor([[-1.0, 0.0, 0.0], [-0.5, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    log_ratio = torch.tensor([[math.log(1.1), 9.0, 9.0], [0.3, -0.1, 0.4]])  # the padding's 9 counts nowhere
    loss, m = _loss(logp, logp - log_ratio, torch.tensor([1.0, 2.0]), mask, agg, kind="gspo", clip=(0.2, 0.2))
    # s_0 = 1.1, inside [0.8, 1.2]: 1.1 x 1; s_1 = exp(0.2) = 1.2214, clipped: min(1.2214 x 2, 1.2 x 2) = 2.4
    assert loss.item() == pytest.approx(-(1.1 * 1.0 + 1.2 * 2.0) / 2, rel=1e-6)
    assert m["clip_fraction"] == pytest.approx(3 / 4)  # every token of the clipped sequence


def test_cispo_clips_a_detached_weight_and_keeps_every_gradient():
    logits = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :2]  # (1, 2)
    old = logp.detach() - torch.tensor([[0.0, 1.0]])  # ratios 1 and e: the second beyond 1 + 0.28
    mask = torch.ones(1, 2)
    objective, ratio, clipped = POLICY_LOSSES["cispo"](logp, old, torch.tensor([[1.0]]), mask, 0.2, 0.28)
    assert clipped.tolist() == [[False, True]]
    assert objective.flatten().tolist() == pytest.approx([1.0 * logp[0, 0].item(), 1.28 * logp[0, 1].item()], rel=1e-6)
    objective.sum().backward()
    # the gradient is weight x A x grad log pi: the clipped token still contributes (PPO-clip would drop it)
    manual = torch.autograd.grad(1.0 * torch.log_softmax(logits, -1)[0, 0] + 1.28 * torch.log_softmax(logits, -1)[0, 1], logits)[0]
    assert torch.allclose(logits.grad, manual, atol=1e-6)


def test_dapo_overlong_penalty():
    lengths = torch.tensor([10, 16, 18, 20])
    assert overlong_penalty(lengths, max_len=20, cache=4).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
