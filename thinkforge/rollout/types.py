"""What every generation backend returns, and the three interfaces backends implement (sampling, streaming,
policy sync)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from thinkforge.draw import SamplingParams, left_pad, stream_key  # noqa: F401 - every backend's, here too

if TYPE_CHECKING:
    import torch


Prompt = "str | list[int]"  # text, or token ids sent as they are


def encode(tokenizer, prompt) -> list[int]:
    """A prompt's token ids: token ids pass through, text is tokenised without special tokens."""
    return list(prompt) if isinstance(prompt, (list, tuple)) else tokenizer(prompt, add_special_tokens=False).input_ids


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
    logprobs: tuple[float, ...] | None = None  # the sampler's log-prob of each token (server backends)
    version: int | None = None  # the policy version that sampled it (pushes since the run (re)started)


def stop_ids(tokenizer, generation_config) -> list[int]:
    """The ids that end a completion, for every backend: the tokenizer's eos and every eos of the model's
    generation config (Phi-4-mini lists two)."""
    ids: list[int] = []
    config_eos = generation_config.eos_token_id if generation_config is not None else None  # None: no config file
    for src in (tokenizer.eos_token_id, config_eos):
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


class Sampler(Protocol):
    """Sampling, for RL, evaluation, the policy's own samples for DPO pairs and teachers: every backend.
    A backend that runs out of memory halves its own batch and retries; when even one prompt's group does not
    fit, it raises the out-of-memory error."""

    batch_size: int  # sequences (prompts x samples) per call

    def generate(self, prompts: list, n: int, params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, ordered prompt by prompt: index i*n + j is sample j of prompt i.
        A prompt is text or a list of token ids."""
        ...

    def close(self) -> None:
        """Release what the backend holds (a server it started, copies of weights)."""
        ...


class Streamer(Sampler, Protocol):
    """Streaming with interruption, for serve and chat: a backend whose model is in this process."""

    model: Any  # the in-process model (the server's log-probs of any tokens need it)
    interrupt: Callable[[], bool] | None  # checked while generating: true ends the rows where they are

    def stream(self, prompt, params: SamplingParams) -> Iterator[str]:
        """The text of one completion piece by piece; closing the iterator stops the generation."""
        ...


class SyncError(RuntimeError):
    """A rollout backend does not sample with the trainer's current weights (PITFALLS 4)."""


class PolicySync(Protocol):
    """Policy sync, for RL only: a backend that holds its own copy of the weights (a vLLM server). A sampler
    that runs the training model itself has none: its weights are always the current ones."""

    version: int  # the policy version it samples: pushes since the run (re)started (each sample carries it)

    def push(self) -> dict[str, float]:
        """The policy changed (an optimizer step): send it as version + 1. Returns what to log."""
        ...

    def prove(self) -> dict[str, float]:
        """Before sampling: prove the backend samples with the policy's current weights, or raise SyncError.
        Returns what to log."""
        ...


def _same(value):
    return value


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What a policy sync reads of the trainer's model, as plain functions the trainer hands over (rollout
    imports no training code). On the ranks of a sharded model every rank calls `tensors` and `logprobs`
    alike (each is a collective there): `collective` says so, and `share` gives every rank the main rank's
    value; the main rank alone writes, talks to the server and judges."""

    lora: bool  # the policy is a LoRA adapter over a base the server holds
    tensors: Callable[[], Iterator[tuple[str, Any]]]  # what a push writes, whole, by name: the adapter's or every weight
    save_adapter: Callable[[Any], None]  # a loadable adapter folder of the policy at a path (LoRA)
    logprobs: Callable[[list[int]], Any]  # (T-1,) log-probs at temperature 1 of tokens 1.. of a sequence, on the CPU
    sizes: dict[str, int]  # every parameter's element count (the share of the model a check covered)
    main: bool = True
    collective: bool = False
    share: Callable[[Any], Any] = _same


def is_out_of_memory(error: BaseException) -> bool:
    """Out of device or host memory (CUDA, MPS, CPU allocator): the one generation error that is not a bug."""
    import torch

    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


@dataclass
class Rollout:
    """A batch of N = B*G scored completions, ordered group by group, with everything the loss needs.

    From the sampler:
      prompt_ids, prompt_mask  (B, P)  the B distinct prompts, left-padded (a group's prompt is run once)
      completion_ids, completion_mask (N, C)  right-padded, eos included when the model stopped
      group (N,) long  the prompt row of each completion;  rewards (N,) float;  correct, truncated (N,) bool
      texts  the N completion texts;  temperature  the sampler's (the loss's log-probs use it too, PITFALLS 5)
    From the trainer, before the loss:
      loss_mask (N, C) float  the completion tokens that carry loss (truncated or re-balanced samples masked)
      advantages (N,) per sample, or (N, C) per token (PPO)
      old_logp (N, C)  log-probs before the update (mu > 1); None: the detached training log-probs (mu = 1)
      ref_logp (N, C)  the reference's log-probs; None without a KL term
      values, returns (N, C)  the critic's values before the update and its targets (PPO); else None
      sampler_logp (N, C)  the rollout server's log-probs of the sampled tokens (vLLM), else None
    stand_in: a copy of another rank's group, on a rank of several that holds none of the step's groups (it
      kept fewer groups than there are ranks): it runs the forwards every rank must join, and counts in no
      loss, advantage or statistic
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    group: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    temperature: float = 1.0
    loss_mask: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    sampler_logp: torch.Tensor | None = None
    stand_in: bool = False

    @property
    def group_size(self) -> int:
        """G: completions per prompt (every group has G, see build)."""
        return len(self.texts) // self.prompt_ids.shape[0]

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]], group: list[int], pad_id: int, *,
              rewards, correct=None, truncated=None, texts: list[str] | None = None, temperature: float = 1.0) -> Rollout:
        """Pad token-id lists into the layout above (prompts left, completions right); every prompt has the
        same number of completions, in order."""
        import torch

        n, b = len(completions), len(prompts)
        if n % b or list(group) != [i // (n // b) for i in range(n)]:
            raise ValueError(f"{n} completions of {b} prompts are not whole groups in order (group ids {list(group)[:12]})")
        p_ids, p_mask = left_pad(prompts, pad_id)
        c_width = max(len(c) for c in completions)
        c_ids = torch.full((n, c_width), pad_id, dtype=torch.long)
        c_mask = torch.zeros_like(c_ids)
        for i, c in enumerate(completions):
            c_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            c_mask[i, : len(c)] = 1
        return cls(p_ids, p_mask, c_ids, c_mask, torch.as_tensor(rewards, dtype=torch.float),
                   torch.as_tensor(correct if correct is not None else [False] * n, dtype=torch.bool),
                   torch.as_tensor(group, dtype=torch.long),
                   torch.as_tensor(truncated if truncated is not None else [False] * n, dtype=torch.bool),
                   list(texts) if texts is not None else [""] * n, temperature)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
