"""Attention over packed rows without a (T, T) mask.

A packed row holds several documents; their position ids restart at 0 where each starts, and no token may
attend across documents (PITFALLS 6). flash-attention reads the boundaries from the position ids (varlen).
transformers' sdpa and eager paths instead build a (B, 1, T, T) mask from them: 1 GB at 32K tokens as bools,
several GB as the float mask the kernel then makes, more than the whole rest of a narrow model's step. Here
each document's block runs causal sdpa on its own (no mask at all); the numbers are those of the masked
row (tested), and memory grows with the longest document, not with the row.

    use_document_attention(model)   # packed training on an implementation that would build the mask

Only a row without padding and without a cache takes this path (a packed training row); anything else (a
padded batch, decoding with a cache) gets transformers' own sdpa mask and kernel, so the model stays right
for every later use. Models with sliding-window or soft-capped attention keep their implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "thinkforge_documents"
NEEDS_MASK = ("sdpa", "eager")  # what builds the (T, T) mask; flash-attention and flex attention do not


def document_attention(module, query, key, value, attention_mask, *, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs):
    """Causal attention within each document. query (B, H, T, hd), key and value (B, Hkv, T, hd); the
    documents start where kwargs["position_ids"] (B, T) is 0. -> (B, T, H, hd), None"""
    if attention_mask is not None or query.shape[2] != key.shape[2]:  # padded rows, decoding: the mask is real
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    pos = kwargs.get("position_ids")
    if pos is None:  # plain causal attention over the whole row would silently cross documents
        raise RuntimeError(f"{type(module).__name__} does not pass position_ids to its attention: packed rows need them "
                           "to find the documents; set model.attn_implementation=flash_attention_2 or train unpacked")
    pos = pos.expand(query.shape[0], -1)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for b in range(query.shape[0]):
        starts = sorted({0, *torch.nonzero(pos[b] == 0).flatten().tolist()})
        bounds = list(zip(starts, [*starts[1:], query.shape[2]], strict=True))
        rows.append(torch.cat([F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                                              value[b : b + 1, :, s:e], dropout_p=p, is_causal=True,
                                                              scale=scaling, enable_gqa=gqa)
                               for s, e in bounds], 2))  # (1, H, T, hd)
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _mask(**kwargs):
    """No mask for a row without padding or cache (the documents come from the position ids); else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    padded = kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all())
    if not padded and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(**kwargs)


def use_document_attention(model) -> bool:
    """Switch a model whose attention would build the packed row's (T, T) mask to `document_attention`;
    False (unchanged) where its implementation needs no mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    text = config.get_text_config().to_dict()
    if config._attn_implementation not in NEEDS_MASK or text.get("sliding_window") or text.get("attn_logit_softcapping"):
        return False
    AttentionInterface.register(NAME, document_attention)
    AttentionMaskInterface.register(NAME, _mask)
    model.set_attn_implementation(NAME)
    return True
