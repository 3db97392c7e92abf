"""The output head without the full (T, V) logits: log-probs of given tokens from the final hidden states,
computed a chunk of tokens at a time.

At the recipe's length the logits are the largest tensor of a step: a 16K-token row with a 200,064-token
vocabulary is 13 GB of fp32 logits, again for their gradient, for a loss that needs one number per token.
Here the model's forward runs with its output layer bypassed (it returns the final hidden states, (N, T, D));
the output layer then runs on `chunk` labelled tokens at a time inside activation checkpointing, so only one
chunk's (chunk, V) logits exist at once, in the forward and again in the backward (recomputed). Tokens without
a label (prompt, padding, IGNORE) never reach the output layer. The output layer is the model's own module
(tied or not, LoRA on it or not): its gradients are the unchunked path's, and DDP's hooks and FSDP2's root
unsharding see it as part of the step (the root's parameters stay unsharded until backward).

    with hidden_states(model) as head:                       # the forward's output layer is the identity
        h = final(model(input_ids=..., attention_mask=...))  # (N, T, D) hidden states
    logp, mask = head.logprobs(h, targets, temperature)      # (N, T), never (N, T, V)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from thinkforge.errors import UserError
from thinkforge.losses import IGNORE

# Elements of one chunk's fp32 logits (256 MB): 335 tokens at a 200,064 vocabulary, 1,024 at 65,536 (TRL's tiles
# are 4,096 x 32,768 = 2^27); the backward holds about three such tensors (logits, softmax, their gradient).
CHUNK_ELEMENTS = 1 << 26


def chunk_tokens(vocab: int, chunk: int | None = None) -> int:
    """Tokens per chunk: `chunk` when set, else as many as CHUNK_ELEMENTS logits hold (at least 1)."""
    return chunk or max(1, CHUNK_ELEMENTS // vocab)


class Head:
    """The model's output layer, applied a chunk of labelled tokens at a time (see the module docstring)."""

    def __init__(self, layer: torch.nn.Module, vocab: int, chunk: int | None = None):
        self.layer, self.vocab, self.chunk = layer, vocab, chunk_tokens(vocab, chunk)
        base = getattr(layer, "base_layer", layer)  # under a LoRA adapter on the output layer: its own sum is linear too
        lora_bias = any(getattr(layer, "lora_bias", {}).values())  # unless the adapter adds a bias of its own
        self.linear_without_bias = isinstance(base, torch.nn.Linear) and base.bias is None and not lora_bias

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
        """log pi(target_t | prefix) at `temperature` for every position of hidden (N, T, D) whose target (N, T)
        is not IGNORE (0 elsewhere), and the mask of those positions; with_entropy also the entropy of the
        untempered distribution there (a metric: no gradient). -> (N, T), (N, T)[, (N, T)]"""
        mask = targets != IGNORE  # (N, T)
        rows = hidden[mask]  # (K, D): labelled positions only
        tgt = targets[mask]  # (K,)
        parts, ents = [], []
        for i in range(0, len(tgt), self.chunk):
            h, t = rows[i : i + self.chunk], tgt[i : i + self.chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                parts.append(checkpoint(self._logp, h, t, temperature, use_reentrant=False))
            else:
                parts.append(self._logp(h, t, temperature))
            if with_entropy:
                with torch.no_grad():
                    ents.append(_entropy(self.layer(h).float()))
        logp = hidden.new_zeros(mask.shape, dtype=torch.float32)
        logp = logp.masked_scatter(mask, torch.cat(parts)) if parts else logp  # (N, T)
        out = (logp, mask.float())
        if with_entropy:
            ent = hidden.new_zeros(mask.shape, dtype=torch.float32)
            out += (ent.masked_scatter(mask, torch.cat(ents)) if ents else ent,)
        return out

    def _logp(self, h: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        if temperature != 1.0 and self.linear_without_bias:
            logits = self.layer(h / temperature).float()  # W h / T, divided on D numbers, not on V
        else:
            logits = self.layer(h).float()  # (c, V): the only logits alive
            if temperature != 1.0:
                logits = logits / temperature
        return -F.cross_entropy(logits, t, reduction="none")  # (c,)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def hf_model(model):
    """The transformers model under DDP / FSDP wrappers and a PEFT adapter."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def final(output) -> torch.Tensor:
    """The final hidden states (N, T, D) of a forward run inside `hidden_states` (transformers returns them in
    the field it names `logits`: they are not logits)."""
    return output.logits


@contextmanager
def hidden_states(model, chunk: int | None = None):
    """Inside, the model's forward returns its final hidden states (its output layer replaced by the identity;
    read them with `final`); yields the `Head` that applies the real output layer afterwards, chunk by chunk."""
    hf = hf_model(model)
    config = hf.config.get_text_config()
    for key in ("final_logit_softcapping",):  # (a scale after a bias-free layer commutes with it: not here)
        if config.to_dict().get(key) not in (None, 1.0):
            raise UserError(f"{type(hf).__name__} transforms its logits after the output layer ({key}="
                            f"{config.to_dict()[key]}), which thinkforge's chunked output head does not apply; "
                            f"train a model without it")
    layer = hf.get_output_embeddings()
    hf.set_output_embeddings(torch.nn.Identity())
    try:
        yield Head(layer, config.vocab_size, chunk)
    finally:
        hf.set_output_embeddings(layer)
