"""Loss math as pure tensor functions: no model, config or I/O. Formulas in ../shared/SPEC.md section 4.

Shapes: B rows (prompts or packed rows), G samples per prompt, T tokens, V vocabulary.
Masks are 1.0 on completion tokens (the only tokens that carry loss) and 0.0 elsewhere.
"""

from __future__ import annotations

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


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token", constant: float | None = None) -> torch.Tensor:
    """The one place that decides normalisation (STYLE 5). values, mask: (B, T).

    token:    sum(values * mask) / sum(mask)                    (DAPO; SFT over a batch)
    sequence: mean over rows of (sum_t values*mask / sum_t mask)  (GRPO)
    constant: sum(values * mask) / constant                      (Dr. GRPO: constant = G x max length;
              also SFT with gradient accumulation: constant = completion tokens of the whole step)
    """
    masked = values * mask
    if mode == "token":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if mode == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "constant":
        if not constant:
            raise ValueError("aggregate(mode='constant') needs a positive constant")
        return masked.sum() / constant
    raise ValueError(f"unknown aggregation {mode!r}: token, sequence or constant")


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    """L = -(1/N) sum over completion tokens of log pi(y_t | x, y_<t)   (SPEC 4, SFT).

    logits (B, T, V), labels (B, T) unshifted with IGNORE on prompt and padding. N = n_tokens when given
    (the completion tokens of the whole optimizer step, so micro-batches x accumulation == one full batch),
    else the tokens of this batch.
    """
    logp, mask = token_logprobs(logits, shift_labels(labels))
    if n_tokens is None:
        return aggregate(-logp, mask, "token")
    return aggregate(-logp, mask, "constant", n_tokens)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) summed over completion tokens. logits (B, T, V), labels (B, T) unshifted -> (B,)."""
    logp, _ = token_logprobs(logits, shift_labels(labels))
    return logp.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) on sequence log-probs, each (B,).

    h_w = log pi(y_w|x) - log pi_ref(y_w|x), h_l likewise (sums over tokens)            (SPEC 4)
    sigmoid: L = -log sigmoid(beta (h_w - h_l));   ipo: L = (h_w - h_l - 1/(2 beta))^2
    Returns the mean loss and the metrics: implicit rewards beta*h, their margin, preference accuracy.
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
    return losses.mean(), metrics


# ---------------------------------------------------------------- RL (GRPO, Dr. GRPO, DAPO, PPO)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath GRPO): A_i = (r_i - mean(r)) / (std(r) + eps) within each group.

    rewards (B*G,) ordered group by group. scale=False gives Dr. GRPO's A_i = r_i - mean(r) (Liu et al. 2025).
    std is the unbiased sample std, as in DeepSeekMath and TRL; a zero-variance group gets advantage 0.
    """
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        denom = r.std(-1, keepdim=True) + eps
        adv = adv / torch.where(denom > 0, denom, torch.ones_like(denom))
    return adv.reshape(-1)  # (B*G,)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token (Schulman 2020): exp(l_ref - l) - (l_ref - l) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, agg: str = "sequence", constant: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss of GRPO / DAPO / Dr. GRPO / PPO (SPEC 4).

    logp, old_logp, ref_logp, mask: (N, T); advantages (N,) per sequence or (N, T) per token (PPO).
    per token: min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) - beta KL_k3,  rho = exp(logp - old_logp)
    loss = -aggregate(per-token objective, mask, agg): sequence (GRPO), token (DAPO), constant (Dr. GRPO).
    With mu = 1 and on-policy data, old_logp = logp.detach(): rho = 1 but its gradient is not zero.
    The metrics keep the policy-gradient term, the KL and the clip fraction apart (PITFALLS 1).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (N, 1) or (N, T)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.minimum(ratio * adv, clipped * adv)  # (N, T)
    objective = pg
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None  # logged whenever a reference is given (PPO
    if kl is not None and beta != 0.0:                              # puts it in the reward, with beta 0 here)
        objective = pg - beta * kl
    loss = -aggregate(objective, mask, agg, constant)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        metrics = {
            "pg_loss": -aggregate(pg, mask, agg, constant).item(),
            "kl": ((kl * mask).sum() / n).item() if kl is not None else 0.0,
            "clip_fraction": ((is_clipped.float() * mask).sum() / n).item(),
            "ratio_mean": ((ratio * mask).sum() / n).item(),
        }
    return loss, metrics


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - cache, then falling linearly to -1 at max_len."""
    start = max_len - cache
    return -((lengths.float() - start) / max(1, cache)).clamp(0.0, 1.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens (Schulman et al. 2016).

    rewards, values, mask: (N, T). delta_t = r_t + gamma V_{t+1} - V_t; A_t = sum_k (gamma lam)^k delta_{t+k};
    returns R_t = A_t + V_t. Positions outside the mask are 0 and end the recursion (V after the end = 0).
    """
    n, t_max = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(t_max)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m
        adv[:, t] = last
        next_value = torch.where(m > 0, values[:, t], next_value * 0)
    return adv, (adv + values) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), token mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return aggregate(per_token, mask, "token")


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the policy over masked positions (PITFALLS 12). logits (N, T, V)."""
    logp = torch.log_softmax(logits.float(), -1)
    ent = -(logp.exp() * logp).sum(-1)  # (N, T)
    return (ent * mask).sum() / mask.sum().clamp(min=1)
