"""Loss math as pure tensor functions: no model, config or I/O. Formulas in ../shared/SPEC.md section 4.

Shapes: B rows (prompts or packed rows), G samples per prompt, T tokens, V vocabulary.
Masks are 1.0 on completion tokens (the only tokens that carry loss) and 0.0 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: position t predicts token t+1. (B, T) -> (B, T), last column IGNORE."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(label_t | prefix) for every position, and the mask of positions that carry a label.

    logits (B, T, V) already aligned with `labels` (B, T) (see shift_labels); IGNORE labels give 0 and mask 0.
    Temperature divides the logits, as the sampler did (PITFALLS 5).
    """
    mask = (labels != IGNORE).float()  # (B, T)
    safe = labels.clamp(min=0)
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    # cross_entropy is the fused log_softmax + gather: no (B, T, V) log-prob tensor is kept.
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
    return -nll.view(labels.shape) * mask, mask  # (B, T), (B, T)


# ---------------------------------------------------------------- masked statistics and the one normaliser


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over `dim` or over everything; 0 where the mask is empty."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=None) -> torch.Tensor:
    """(values - mean) / (std + eps) over the masked positions (population std); 0 outside the mask. total:
    sums over the ranks (`Dist.all_sum`) where the batch is split over them: the whole batch's mean and std."""
    if total is None:
        mean = masked_mean(values, mask)
        std = masked_mean((values - mean) ** 2, mask).sqrt()
        return (values - mean) / (std + eps) * mask
    v, m = values.double(), mask.double()
    count, summed = total([float(m.sum()), float((v * m).sum())])
    mean = summed / max(count, 1.0)
    spread = total([float(((v - mean) ** 2 * m).sum())])[0] / max(count, 1.0)
    return ((values - mean) / (spread**0.5 + eps) * mask).to(values.dtype)


AGGREGATIONS = ("token", "sequence", "constant")


@dataclass(frozen=True)
class Normaliser:
    """The one place that decides how per-token values become a step's loss (STYLE 5), for every stage:

        loss = sum over the step's tokens of value * weight / denominator

    token:    weight 1,                      denominator = tokens of the step       (SFT's N, SPEC 4; DAPO)
    sequence: weight 1 / tokens of its row,  denominator = rows of the step         (GRPO; DPO: a pair is a row)
    constant: weight 1,                      denominator = rows x max_len            (Dr. GRPO: G x max length)

    A row counts when it has a token. The denominator covers the whole optimizer step, every micro-batch and
    every rank: built once per step from the whole batch (`normaliser`), and summed over ranks by exactly one
    all-reduce (`+`), so micro-batches x accumulation x ranks give the full batch's loss and gradient.
    """

    mode: str
    denominator: float

    def __call__(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """These rows' share of the step's loss. values, mask (n, T) -> scalar."""
        masked = values * mask
        if self.mode == "sequence":
            masked = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)  # (n,)
        return masked.sum() / max(self.denominator, 1.0)

    def __add__(self, other: Normaliser) -> Normaliser:
        if other.mode != self.mode:
            raise ValueError(f"cannot add a {other.mode} normaliser to a {self.mode} one")
        return Normaliser(self.mode, self.denominator + other.denominator)

    def __radd__(self, other) -> Normaliser:  # sum(parts) starts from 0
        return self if other == 0 else other + self

    def scaled(self, weight: float) -> Normaliser:
        """The loss times weight; weight 0 carries no loss nor gradient (a rank's padding pass)."""
        return self if weight == 1.0 else Normaliser(self.mode, self.denominator / weight if weight else float("inf"))


def normaliser(mask: torch.Tensor, mode: str = "token", max_len: int | None = None) -> Normaliser:
    """The normaliser of a batch whose loss-carrying tokens are `mask` (N, T) (see Normaliser)."""
    rows = float((mask.sum(-1) > 0).sum())
    if mode == "token":
        return Normaliser(mode, float(mask.sum()))
    if mode == "sequence":
        return Normaliser(mode, rows)
    if mode == "constant":
        if not max_len:
            raise ValueError("the constant normaliser needs max_len (Dr. GRPO: the max completion length)")
        return Normaliser(mode, float(rows * max_len))
    raise ValueError(f"unknown aggregation {mode!r}: {', '.join(AGGREGATIONS)}")


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) 1.0 where a position predicts a completion token (labels unshifted, IGNORE elsewhere)."""
    return (shift_labels(labels) != IGNORE).float()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, norm: Normaliser | None = None) -> torch.Tensor:
    """L = -(1/N) sum over completion tokens of log pi(y_t | x, y_<t)   (SPEC 4, SFT).

    logits (B, T, V), labels (B, T) unshifted with IGNORE on prompt and padding. N comes from `norm`: the
    completion tokens of the whole optimizer step (so micro-batches x accumulation == one full batch), or
    this batch's when None.
    """
    logp, mask = token_logprobs(logits, shift_labels(labels))
    return (norm or normaliser(mask, "token"))(-logp, mask)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) summed over completion tokens. logits (B, T, V), labels (B, T) unshifted -> (B,)."""
    logp, _ = token_logprobs(logits, shift_labels(labels))
    return logp.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) on sequence log-probs, each (B,).

    h_w = log pi(y_w|x) - log pi_ref(y_w|x), h_l likewise (sums over tokens)            (SPEC 4)
    sigmoid: L = -log sigmoid(beta (h_w - h_l));   ipo: L = (h_w - h_l - 1/(2 beta))^2
    Returns the per-pair losses (B,) (the stage's normaliser averages them over the step) and the metrics:
    implicit rewards beta*h, their margin, preference accuracy.
    """
    h_w = policy_chosen - ref_chosen  # (B,)
    h_l = policy_rejected - ref_rejected  # (B,)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (h_w - h_l))
    elif kind == "ipo":
        losses = (h_w - h_l - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}: sigmoid or ipo")
    with torch.no_grad():
        metrics = {
            "reward_chosen": (beta * h_w).mean().item(),
            "reward_rejected": (beta * h_l).mean().item(),
            "margin": (beta * (h_w - h_l)).mean().item(),
            "preference_accuracy": (h_w > h_l).float().mean().item(),
        }
    return losses, metrics


# ---------------------------------------------------------------- RL: advantage estimators


def grpo_advantages(rewards: torch.Tensor, group_size: int, mask=None, total=None, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean(r)) / (std(r) + eps) within each group.

    rewards (B*G,) ordered group by group -> (B*G,). std is the unbiased sample std, as in DeepSeekMath and
    TRL; a zero-variance group gets advantage 0.
    """
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(-1, keepdim=True)
    denom = r.std(-1, keepdim=True) + eps
    adv = adv / torch.where(denom > 0, denom, torch.ones_like(denom))
    return adv.reshape(-1)  # (B*G,)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int, mask=None, total=None) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean(r), no std."""
    r = rewards.view(-1, group_size)  # (B, G)
    return (r - r.mean(-1, keepdim=True)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, mask=None, total=None) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline."""
    r = rewards.view(-1, group_size)  # (B, G)
    others = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, mask: torch.Tensor | None = None, total=None,
                            eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): A_i = r_i - mean(group), then whitened over the whole step's
    samples (the step's std, population, instead of each group's: no division by a near-zero group std).
    mask (B*G,): the samples the step counts (None: all); total: sums over the ranks (`Dist.all_sum`) where
    the step's groups are split over them, so the mean and std are the step's, as one process computes them."""
    centered = dr_grpo_advantages(rewards, group_size)  # (B*G,)
    return masked_whiten(centered, torch.ones_like(centered) if mask is None else mask, eps, total)


# Estimators by name (rl.advantage): (rewards (B*G,), G, mask, total) -> (B*G,). Adding one is adding a function.
# A statistic beyond one group (REINFORCE++'s whitening) is the step's: over the samples in `mask`, summed over
# the ranks by `total` (PITFALLS 23); the group-local estimators need neither (a rank holds whole groups).
ADVANTAGES = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages,
              "reinforce_pp": reinforce_pp_advantages}


# ---------------------------------------------------------------- RL: policy losses


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token (Schulman 2020): exp(l_ref - l) - (l_ref - l) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _clipped(ratio, adv, clip_low, clip_high):
    """min(rho A, clip(rho, 1 - lo, 1 + hi) A) and where the clip bit, each (N, T)."""
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return objective, ratio, ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))


def ppo_clip(logp, old_logp, adv, mask, clip_low, clip_high):
    """PPO-clip per token (Schulman et al. 2017; GRPO, DAPO): min(rho A, clip(rho, 1 - lo, 1 + hi) A),
    rho = exp(logp - old_logp). Returns (objective, ratio, clipped), each (N, T)."""
    return _clipped(torch.exp(logp - old_logp), adv, clip_low, clip_high)


def gspo(logp, old_logp, adv, mask, clip_low, clip_high):
    """GSPO (Zheng et al. 2025): one ratio per sequence, s_i = exp(mean_t(logp - old_logp)), clipped as a whole.

    In its token form (GSPO-token) each token carries s_i * pi / sg(pi): the value s_i and the gradient
    s_i * grad log pi_t, so the sequence aggregation (the only one config allows with GSPO) gives the paper's
    objective 1/G sum_i min(s_i A_i, clip(s_i) A_i) and its gradient. The paper clips at 3e-4 / 4e-4.
    """
    log_s = masked_mean(logp - old_logp, mask, -1).unsqueeze(-1)  # (N, 1)
    return _clipped(torch.exp(log_s.detach() + logp - logp.detach()), adv, clip_low, clip_high)


def cispo(logp, old_logp, adv, mask, clip_low, clip_high):
    """CISPO (MiniMax-M1, 2025): sg(clip(rho, 1 - lo, 1 + hi)) A log pi per token. The importance weight is
    clipped and detached, so every token keeps its gradient (PPO-clip zeroes the clipped tokens')."""
    ratio = torch.exp(logp - old_logp)  # (N, T)
    weight = ratio.clamp(1 - clip_low, 1 + clip_high).detach()
    return weight * adv * logp, ratio, (ratio < 1 - clip_low) | (ratio > 1 + clip_high)


# Policy losses by name (rl.policy_loss): (logp, old_logp, adv, mask, clip_low, clip_high) -> per token
# (objective to maximise, ratio, clipped), each (N, T). Adding one is adding a function.
POLICY_LOSSES = {"ppo_clip": ppo_clip, "gspo": gspo, "cispo": cispo}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                norm: Normaliser, *, kind: str = "ppo_clip", clip: tuple[float, float] = (0.2, 0.2),
                ref_logp: torch.Tensor | None = None, beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The RL loss of these rows: -norm(per-token objective - beta KL_k3)   (SPEC 4).

    logp, old_logp, ref_logp, mask: (N, T); advantages (N,) per sequence or (N, T) per token (PPO).
    `kind` names the objective (POLICY_LOSSES), `norm` the step's aggregation: sequence (GRPO), token (DAPO),
    constant (Dr. GRPO). With mu = 1 and on-policy data old_logp = logp.detach(): rho = 1, its gradient is not 0.
    The metrics keep the policy-gradient term, the KL (when a reference is given) and the clip fraction apart
    (PITFALLS 1).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (N, 1) or (N, T)
    pg, ratio, is_clipped = POLICY_LOSSES[kind](logp, old_logp, adv, mask, *clip)
    objective = pg
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None  # logged whenever a reference is given (PPO
    if kl is not None and beta != 0.0:                              # puts it in the reward, with beta 0 here)
        objective = pg - beta * kl
    loss = -norm(objective, mask)
    with torch.no_grad():
        metrics = {
            "pg_loss": -norm(pg, mask).item(),
            "clip_fraction": masked_mean(is_clipped.float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
        if kl is not None:  # no reference, no KL: never a 0 that looks measured
            metrics["kl"] = masked_mean(kl, mask).item()
    return loss, metrics


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - cache, then falling linearly to -1 at max_len."""
    start = max_len - cache
    return -((lengths.float() - start) / max(1, cache)).clamp(0.0, 1.0)
