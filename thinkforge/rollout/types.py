"""What every generation backend returns, and the interface it implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


def stream_key(*identity) -> int:
    """A 128-bit key for the random stream of whatever `identity` names (ints and strings: a seed, a step, a
    refill round, a problem's id and position). Different identities get different keys (blake2b), however
    large any count grows: seed arithmetic such as seed * K + 1000 * step + 100 * round + i reuses a stream
    once a count passes its stride (PITFALLS 18)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(identity).encode(), digest_size=16).digest(), "little")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; recorded beside every evaluation number (SPEC 5).

    Prompt i of a call samples from the stream `stream(i)`: `streams[i]` when the caller names each prompt's
    stream (RL: seed, step, round, the problem; the server: each request's own seed), else
    stream_key(seed, first_prompt + i) (evaluation: the problem's position). Sample j of that prompt draws from
    (stream, j) in every backend, so a sample depends on neither its batch nor the chunking."""

    max_new_tokens: int = 384
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    first_prompt: int = 0  # the position of the call's first prompt in the stream its keys follow
    streams: tuple[int, ...] | None = None  # one stream_key per prompt of the call

    def stream(self, i: int) -> int:
        """The stream key of prompt i of a call."""
        return self.streams[i] if self.streams is not None else stream_key(self.seed, self.first_prompt + i)


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


class Generator(Protocol):
    """A rollout backend. The RL trainer uses `generate` (token ids required), `batch_size` (sequences per
    call) and `load_weights` (after every optimizer step); the server and chat use `stream`, `interrupt`
    and `model`. A backend that runs out of memory halves its own batch and retries; when even one prompt's
    group does not fit, it raises the out-of-memory error."""

    batch_size: int
    stop_ids: list[int]  # what ends a completion (`stop_ids` above)
    model: Any  # the in-process model (log-probs of any tokens need it); None for a server backend
    interrupt: Callable[[], bool] | None  # checked while generating: true ends the rows where they are
    version: int  # the policy version it samples: one more per `load_weights` (each sample carries it)

    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, ordered prompt by prompt: index i*n + j is sample j of prompt i.
        A prompt is text or a list of token ids."""
        ...

    def load_weights(self, model) -> dict[str, float]:
        """The policy changed: its version goes up by one. A backend holding its own copy of the weights (a
        vLLM server) pushes them here; an in-process backend generates with the training model itself.
        Returns what to log (sync seconds)."""
        ...

    def prove(self, model) -> dict[str, float]:
        """Before sampling: prove the backend samples with `model`'s current weights (PITFALLS 4), or raise
        SyncError. Returns what to log."""
        ...

    def stream(self, prompt, params: SamplingParams) -> Iterator[str]:
        """The text of one completion piece by piece; closing the iterator stops the generation."""
        ...

    def close(self) -> None:
        """Stop what the backend started (a server)."""
        ...

    def done(self) -> None:
        """This rank's share of a generation phase is over (called on sharded ranks only): an in-process
        backend on a sharded model joins the other ranks' forwards until theirs is over too."""
        ...


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


def left_pad(seqs: list[list[int]], pad_id: int):
    """(ids, attention_mask), both (B, L) long tensors, sequences aligned to the right."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
