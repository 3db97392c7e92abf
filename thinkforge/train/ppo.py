"""PPO's critic, apart from GRPO: a value head, its targets (reward shaping, GAE, whitening) and its loss.

    per-token reward  r_t = R on the last completion token - beta KL_k3(t)   (the KL lives in the reward)
    GAE               delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_k (gamma lam)^k delta_{t+k}   (SPEC 4)
    returns           R_t = A_t + V_t;  advantages whitened over the batch
    value loss        0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), token-normalised

The math (`gae`, `ppo_targets`, `value_loss`) is pure; `Critic` holds the head: rl.main has `critic: Critic |
None` and one `if` where PPO differs (advantages from `targets`, the value loss beside the policy loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkforge.losses import Normaliser, kl_k3, masked_whiten
from thinkforge.models import eval_mode
from thinkforge.rollout.types import Rollout
from thinkforge.train.dist import Dist
from thinkforge.train.forward import forward_logp, no_grad_rounds


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


def ppo_targets(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                kl_penalty: torch.Tensor | None = None, *, dist: Dist = Dist()) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages whitened over the batch, returns), each (N, T), from sequence rewards (N,) and values (N, T).

    The reward sits on each sample's last completion token; kl_penalty (N, T) (beta KL_k3) is subtracted per
    token (the classic RLHF shaping: the policy loss then carries no KL term). On N ranks the whitening's mean
    and spread are the whole step's (summed over the ranks), as one process computes them.
    """
    token_rewards = torch.zeros_like(mask)
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)  # index of the last completion token
    token_rewards[torch.arange(len(last)), last] = rewards.float() * (mask.sum(-1) > 0).float()
    if kl_penalty is not None:
        token_rewards = token_rewards - kl_penalty * mask
    adv, returns = gae(token_rewards, values, mask, gamma, lam)
    return masked_whiten(adv, mask, total=dist.all_sum), returns


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, norm: Normaliser) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), normalised by norm."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return norm(0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class ValueHead(torch.nn.Linear):
    """V(state) = w . h + b on the policy's last hidden state, starting at zero. With trunk=False it reads
    detached states: like a separate critic, its loss never pulls the policy's weights."""

    def __init__(self, hidden: int, trunk: bool = False):
        super().__init__(hidden, 1)
        torch.nn.init.zeros_(self.weight)
        torch.nn.init.zeros_(self.bias)
        self.trunk = trunk

    def forward(self, states: torch.Tensor) -> torch.Tensor:  # (n, C, H) -> (n, C)
        return super().forward((states if self.trunk else states.detach()).float()).squeeze(-1)


@dataclass
class Critic:
    """PPO's critic in rl.main: targets before the update, a value loss inside it, its own parameters."""

    head: ValueHead
    beta: float
    gamma: float
    lam: float
    value_clip: float

    @classmethod
    def create(cls, model, cfg, extras: dict[str, torch.Tensor] | None = None) -> Critic:
        """A zero head on `model`'s hidden size (or the one a checkpoint's extras hold)."""
        head = ValueHead(model.get_input_embeddings().weight.shape[1], cfg.value_trunk).to(model.device)
        if extras:
            head.load_state_dict({"weight": extras["value_head.weight"], "bias": extras["value_head.bias"]})
        return cls(head, cfg.beta, cfg.gamma, cfg.lam, cfg.value_clip)

    def attach(self, optimizer, lr: float, lr_scale: float) -> None:
        """The head's own parameter group: no weight decay, lr x lr_scale (it must fit the returns quickly)."""
        optimizer.add_param_group({"params": list(self.head.parameters()), "weight_decay": 0.0,
                                   "lr": lr * lr_scale, "lr_scale": lr_scale})

    @torch.no_grad()
    def targets(self, model, batch: Rollout, micro: int, chunk: int | None = None, dist: Dist = Dist()) -> None:
        """Values before the update, per-token advantages and returns, into the batch."""
        values, logps = [], []
        with eval_mode(model):
            for k, weight in no_grad_rounds(len(batch.texts), micro, dist):
                lp, _, v = forward_logp(model, batch, slice(k * micro, (k + 1) * micro), self.head, chunk=chunk)
                if weight:
                    values.append(v.float().cpu())
                    logps.append(lp.float().cpu())
        mask = batch.loss_mask
        batch.values = torch.cat(values) * mask  # (N, C)
        penalty = None
        if batch.ref_logp is not None and self.beta > 0:
            penalty = self.beta * kl_k3(torch.cat(logps), batch.ref_logp)
        batch.advantages, batch.returns = ppo_targets(batch.rewards, batch.values, mask, self.gamma, self.lam, penalty,
                                                      dist=dist)

    def loss(self, values: torch.Tensor, batch: Rollout, rows: slice, norm: Normaliser) -> torch.Tensor:
        """The value loss of these rows (their share of the step's), unweighted: the caller adds vf_coef x it."""
        mask = batch.loss_mask[rows].to(values.device)
        old, ret = batch.values[rows].to(values.device), batch.returns[rows].to(values.device)
        return value_loss(values, old, ret, mask, self.value_clip, norm)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"value_head.{k}": v for k, v in self.head.state_dict().items()}
