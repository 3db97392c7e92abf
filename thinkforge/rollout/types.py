"""What every generation backend returns, and the interface it implements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; recorded beside every evaluation number (SPEC 5)."""

    max_new_tokens: int = 384
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt.

    prompt_index: which prompt of the request it continues. token_ids: the generated ids (T,), eos included
    when the model stopped. finish_reason: "stop" (eos or stop string) or "length" (hit max_new_tokens).
    """

    prompt_index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str


class Generator(Protocol):
    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, ordered prompt by prompt: index i*n + j is sample j of prompt i."""
        ...

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Text pieces of one completion as they are generated."""
        ...


@dataclass
class Rollout:
    """A batch of N = B*G scored completions, ordered group by group, ready for the loss.

    input_ids, attention_mask, labels: (N, L) prompt + completion, right-padded; labels hold the completion
    ids and IGNORE elsewhere. rewards (N,) float; correct, truncated (N,) bool; group (N,) prompt index.
    texts: the N completion texts. group_size: G.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    group: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    group_size: int
