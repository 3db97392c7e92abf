"""What a sampling call draws: its settings (`SamplingParams`), the random stream of each of its prompts
(`stream_key`), and its prompts batched (`left_pad`). The lowest floor of generation: the CPU engine and every
rollout backend read it."""

from __future__ import annotations

from dataclasses import dataclass


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
