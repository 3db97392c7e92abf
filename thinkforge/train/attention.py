"""Attention over long rows without a (T, T) mask.

transformers' sdpa and eager paths build a (B, 1, Q, K) mask whenever a row is packed (from its position ids)
or padded, or its queries continue a cache: 1 GB at 32K tokens as bools, several GB as the float mask the
kernel then makes, more than the whole rest of a narrow model's step. Here no such mask is built:

- a packed row (no padding, no cache; PITFALLS 6): each document, found where its position ids restart at 0,
  runs causal sdpa on its own;
- a padded row (a DPO pair, an RL rollout, a generation prefill, the completions on top of a shared prompt's
  cache): its valid keys are one run (prompts padded on the left, completions on the right), and its valid
  queries run causal sdpa over that run alone. Queries that continue a cache are lined up with the end of the
  run by zero queries put in front (causal sdpa aligns top-left), whose outputs are dropped.

The numbers are those of the masked rows (tested); memory grows with the row, not with its square.

    use_document_attention(model)   # every training stage, on an implementation that would build the mask

Small calls (fewer than `SMALL_MASK` mask elements: the decode loop's one-token steps, short batches) keep
transformers' own mask and kernel: the same numbers, one batched call. A row whose valid keys are not one run
gets its own mask (one row's, not the batch's). A sliding window shorter than the row keeps transformers' mask
(a window as long as the context, as Phi-4-mini's, is plain causal attention); soft-capped attention keeps its
implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "thinkforge_documents"
NEEDS_MASK = ("sdpa", "eager")  # what builds the (T, T) mask; flash-attention and flex attention do not
SMALL_MASK = 2**24  # batch x queries x keys below which transformers' own mask is used (128 MB as a float mask)


def document_attention(module, query, key, value, attention_mask, *, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs):
    """Causal attention within each document. query (B, H, T, hd), key and value (B, Hkv, T, hd); the
    documents start where kwargs["position_ids"] (B, T) is 0. -> (B, T, H, hd), None"""
    p = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    if attention_mask is not None and attention_mask.dim() == 2:  # (B, K) valid keys from `_mask`: a long padded batch
        return padded_attention(query, key, value, attention_mask, dropout=p, scaling=scaling, gqa=gqa), None
    if attention_mask is not None or query.shape[2] != key.shape[2]:  # small padded rows, decoding: the mask is real
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    pos = kwargs.get("position_ids")
    if pos is None:  # plain causal attention over the whole row would silently cross documents
        raise RuntimeError(f"{type(module).__name__} does not pass position_ids to its attention: packed rows need them "
                           "to find the documents; set model.attn_implementation=flash_attention_2 or train unpacked")
    pos = pos.expand(query.shape[0], -1)
    rows = []
    for b in range(query.shape[0]):
        starts = sorted({0, *torch.nonzero(pos[b] == 0).flatten().tolist()})
        bounds = list(zip(starts, [*starts[1:], query.shape[2]], strict=True))
        rows.append(torch.cat([F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                                              value[b : b + 1, :, s:e], dropout_p=p, is_causal=True,
                                                              scale=scaling, enable_gqa=gqa)
                               for s, e in bounds], 2))  # (1, H, T, hd)
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def padded_attention(query, key, value, keys, *, dropout: float = 0.0, scaling: float | None = None,
                     gqa: bool = False) -> torch.Tensor:
    """Causal attention of each row's queries over its valid keys, without a (Q, K) mask. query (B, H, Q, hd)
    are the last Q of the K positions of key and value (B, Hkv, K, hd); keys (B, K) bool. -> (B, Q, H, hd),
    zeros at queries with no valid key before them (padding)."""
    B, H, Q, _ = query.shape
    K = key.shape[2]
    first_query = K - Q  # the position of query 0 (a cache's length before these queries)
    rows = []
    for b in range(B):
        valid = torch.nonzero(keys[b]).flatten()
        s, e = (int(valid[0]), int(valid[-1]) + 1) if len(valid) else (K, K)
        if len(valid) and e - s != len(valid):  # valid keys in several runs: this row's own (Q, K) mask
            mask = keys[b] & (torch.arange(K, device=key.device) <= torch.arange(first_query, K, device=key.device)[:, None])
            none = ~mask.any(-1, keepdim=True)  # a padding query with no key: any finite value, then zeros
            y = F.scaled_dot_product_attention(query[b : b + 1], key[b : b + 1], value[b : b + 1], attn_mask=mask | none,
                                               dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            rows.append(y.masked_fill(none, 0.0))
            continue
        start = max(s, first_query)  # the first valid query's position
        y = query.new_zeros(1, H, 0, value.shape[-1])
        if start < e:
            q = query[b : b + 1, :, start - first_query : e - first_query]
            lead = start - s  # keys before the first query: zero queries in front line is_causal up with the end
            if lead:
                q = torch.cat([q.new_zeros(1, H, lead, q.shape[-1]), q], 2)
            y = F.scaled_dot_product_attention(q, key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], dropout_p=dropout,
                                               is_causal=True, scale=scaling, enable_gqa=gqa)[:, :, lead:]
        before = start - first_query
        rows.append(F.pad(y, (0, 0, before, Q - before - y.shape[2])))  # padding queries: zeros
    return torch.cat(rows).transpose(1, 2).contiguous()


def _mask(**kwargs):
    """No mask for a row without padding or cache (the documents come from the position ids); for a long
    padded or cached causal batch its (B, K) valid keys, which `document_attention` reads without building
    the (B, 1, Q, K) mask; else (small, a sliding window shorter than the row, another mask pattern) sdpa's."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask = kwargs.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    q, kv, q_offset, kv_offset = kwargs["q_length"], kwargs["kv_length"], kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    window = kwargs.get("local_size")  # a sliding-window layer's window (Phi-4-mini's covers its whole context)
    if window is not None and window < kv + kv_offset:  # the window bites: transformers' mask says which keys
        return sdpa_mask(**kwargs)
    if not padded and q == kv and not kv_offset:
        return None
    plain = kwargs.get("mask_function") is causal_mask_function or window is not None  # causal (the window a no-op)
    if (kwargs["batch_size"] * q * kv >= SMALL_MASK and plain and kwargs.get("allow_is_causal_skip", True)
            and not kv_offset and isinstance(q_offset, int) and q_offset == kv - q):
        if mask is None:
            return torch.ones(kwargs["batch_size"], kv, dtype=torch.bool, device=kwargs.get("device", "cpu"))
        return prepare_padding_mask(mask, kv, 0)[:, :kv]
    return sdpa_mask(**kwargs)


def use_document_attention(model) -> bool:
    """Switch a model whose attention would build (T, T) or (Q, K) masks to `document_attention`; False
    (unchanged) where its implementation needs no mask or it soft-caps its attention scores."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    text = config.get_text_config().to_dict()
    if config._attn_implementation not in NEEDS_MASK or text.get("attn_logit_softcapping"):
        return False
    AttentionInterface.register(NAME, document_attention)
    AttentionMaskInterface.register(NAME, _mask)
    model.set_attn_implementation(NAME)
    return True
