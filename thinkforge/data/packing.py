"""Turning (prompt, completion) token lists into training rows, packed or padded.

Packed rows (stage 1): several documents share a row; position ids restart at 0 for each document, which
transformers turns into a block-diagonal causal mask (varlen attention with flash-attention), so no token
attends to another document (PITFALLS 6). Trailing padding is a document of its own with no labels.
Padded rows (stage 2): one document per row, right-padded, with an attention mask.
Loss masks come from the spans we tokenised ourselves, never from template tags (PITFALLS 8).
"""

from __future__ import annotations

from dataclasses import dataclass

from thinkforge.losses import IGNORE


@dataclass(frozen=True)
class Example:
    """One tokenised document: prompt ids (no loss) then completion ids (loss; ends with eos)."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def tokenize(tokenizer, prompt: str, completion: str, max_len: int) -> Example:
    """Tokenise prompt and completion separately (our own span boundary), append eos, cut to max_len. Where the
    prompt pre-fills `<think>` (a chat template's generation prompt), a completion that opens it again (graded
    as the whole response, or a teacher's) starts inside the thinking instead: no target holds it twice."""
    opened = "<think>"
    if prompt.rstrip().endswith(opened) and completion.lstrip().startswith(opened):
        completion = completion.lstrip()[len(opened):]
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(p) >= max_len:
        p = p[-(max_len // 2):]  # keep the end of an over-long prompt: the question is last
    return Example(tuple(p), tuple(c[: max_len - len(p)]))


def pack(examples: list[Example], max_len: int) -> list[list[Example]]:
    """First-fit-decreasing bins of total length <= max_len; the order within a bin is stable."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    return [[examples[i] for i in sorted(b)] for b in bins]


def collate_packed(rows: list[list[Example]], max_len: int, pad_id: int):
    """(input_ids, labels, position_ids), each (B, max_len); no attention mask (see module docstring)."""
    import torch

    ids, labels, pos = [], [], []
    for docs in rows:
        r_ids, r_lab, r_pos = [], [], []
        for d in docs:
            r_ids += [*d.prompt, *d.completion]
            r_lab += [IGNORE] * len(d.prompt) + list(d.completion)
            r_pos += list(range(len(d)))
        pad = max_len - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_lab + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(pos)


def collate_padded(examples: list[Example], pad_id: int):
    """(input_ids, labels, attention_mask), each (B, longest), right-padded."""
    import torch

    longest = max(len(e) for e in examples)
    ids, labels, attn = [], [], []
    for e in examples:
        pad = longest - len(e)
        ids.append([*e.prompt, *e.completion] + [pad_id] * pad)
        labels.append([IGNORE] * len(e.prompt) + list(e.completion) + [IGNORE] * pad)
        attn.append([1] * len(e) + [0] * pad)
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(attn)
