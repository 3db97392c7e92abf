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
