"""Attention over long rows without a (T, T) mask.

transformers' sdpa path builds a (B, 1, Q, K) mask whenever a row is packed (from its position ids) or padded,
or its queries continue a cache: 1 GB at 32K tokens as bools, several GB as the float mask the kernel then
makes, more than the whole rest of a narrow model's step. Here no such mask is built:

- a packed row (no padding, no cache; PITFALLS 6): each document, found where its position ids restart at 0,
  runs causal sdpa on its own (a batch without a second document in any row: one batched causal call);
- a long padded row (a DPO pair, an RL rollout, a generation prefill, the completions on top of a shared
  prompt's cache): its valid keys are one run (prompts padded on the left, completions on the right), and its
  valid queries run causal sdpa over that run alone, rows with the same run in one call. Queries that continue
  a cache are lined up with the end of the run by zero queries put in front (causal sdpa aligns top-left),
  whose outputs are dropped: used only where they are no more than the real queries.

The numbers are those of the masked rows (tested); memory grows with the row, not with its square.

A group's completions can also run packed (`packed_completions`): their real tokens one after another in a
single row, no padding, each attending to its prompt's cached keys and to its own earlier tokens (one small
causal call per completion). Used by train/forward.py's shared-prompt pass.

    use_document_attention(model)   # every training stage, where the model runs transformers' sdpa

Everything else keeps transformers' own mask and kernel: small calls (fewer than `SMALL_MASK` mask elements,
short batches), one-token decode steps, a cache continued by fewer queries than it holds, a sliding window
shorter than the row (a window as long as the context, as Phi-4-mini's, is plain causal attention), masks of
another pattern (image tokens, block overlays). A row whose valid keys are not one run gets its own mask (one
row's, not the batch's). Models whose attention takes more than a mask (sinks, soft-capping, position bias),
bidirectional ones, and those without sdpa keep their implementation.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

NAME = "thinkforge_documents"
SMALL_MASK = 2**24  # batch x queries x keys below which transformers' own mask is used (128 MB as a float mask)
EXTRAS = ("s_aux", "softcap", "position_bias")  # attention inputs beyond a mask: such a model keeps its own


def document_attention(module, query, key, value, attention_mask, *, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs):
    """Causal attention within each document. query (B, H, T, hd), key and value (B, Hkv, T, hd); the
    documents start where kwargs["position_ids"] (B, T) is 0. -> (B, T, H, hd), None"""
    if any(kwargs.get(k) is not None for k in EXTRAS) or kwargs.get("is_causal") is False:
        raise RuntimeError(f"{type(module).__name__} passes {[k for k in EXTRAS if kwargs.get(k) is not None] or 'is_causal=False'} "
                           "to its attention, which train/attention.py does not compute: it must keep its own")
    p = dropout if module.training else 0.0
    packed = _PACKED.get()
    if packed is not None:  # completions packed in one row over their prompts' cache
        return packed.attend(module, query, key, value, dropout=p, scaling=scaling), None
    if attention_mask is not None and attention_mask.dim() == 2:  # (B, K) valid keys from `_mask`: a long padded batch
        return padded_attention(query, key, value, attention_mask, dropout=p, scaling=scaling), None
    if attention_mask is not None or query.shape[2] != key.shape[2]:  # small padded rows, decoding: the mask is real
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    pos = kwargs.get("position_ids")
    if pos is None:  # plain causal attention over the whole row would silently cross documents
        raise RuntimeError(f"{type(module).__name__} does not pass position_ids to its attention: packed rows need them "
                           "to find the documents; set model.attn_implementation=flash_attention_2 or train unpacked")
    pos = pos.expand(query.shape[0], -1)
    starts = torch.nonzero(pos[:, 1:] == 0).tolist()  # (row, position - 1) of every document after a row's first
    if not starts:  # one document per row: one batched causal call
        return _sdpa(query, key, value, dropout=p, scaling=scaling).transpose(1, 2).contiguous(), None
    rows = []
    for b in range(query.shape[0]):
        cuts = [0, *(j + 1 for r, j in starts if r == b), query.shape[2]]
        rows.append(torch.cat([_sdpa(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                                     dropout=p, scaling=scaling) for s, e in zip(cuts, cuts[1:], strict=False)], 2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None  # (B, T, H, hd)


def _sdpa(query, key, value, mask=None, *, dropout: float, scaling: float | None):
    """Causal sdpa (or under `mask`: a tensor or torch's `CausalBias`), grouped-query heads as transformers' sdpa
    runs them: repeated where the device's kernel would otherwise fall back to the math kernel (CUDA with a mask),
    and under a CausalBias (whose kernels are called without sdpa's grouped-query handling, and past autocast:
    its inputs are cast here as autocast would cast them for sdpa)."""
    from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa

    if isinstance(mask, CausalBias):  # its kernels are called past autocast: the inputs in the dtype autocast gives
        device = query.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    gqa = query.shape[1] != key.shape[1]
    if gqa and (isinstance(mask, CausalBias) or not use_gqa_in_sdpa(mask, key, value)):  # CausalBias: no gqa
        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // value.shape[1])
        gqa = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                          scale=scaling, enable_gqa=gqa)


@dataclass
class Packed:
    """Completions packed in one row (1, N) on top of their prompts' KV cache.

    prompt_cache: the prompts' cache (B, Hkv, P, hd per layer, the prompts left-padded); rows: per completion
    (its prompt's row, the prompt's first valid key, its offset in the packed row, its length). Each layer's
    queries of a completion attend to its prompt's valid keys and, causally, to the completion's own keys.
    """

    prompt_cache: object
    rows: list[tuple[int, int, int, int]]
    calls: int = 0  # attention calls that ran here (the caller checks: every layer)
    _masks: dict = field(default_factory=dict)

    def attend(self, module, query, key, value, *, dropout: float, scaling: float | None) -> torch.Tensor:
        """query (1, H, N, hd), key and value (1, Hkv, N, hd) of the packed completions. -> (1, N, H, hd)"""
        layer = self.prompt_cache.layers[module.layer_idx]
        P = layer.keys.shape[2]
        prompts = {g: first for g, first, _, _ in self.rows}  # each prompt's valid keys, sliced once (B, Hkv, P, hd)
        p_keys = {g: layer.keys[g : g + 1, :, first:] for g, first in prompts.items()}
        p_values = {g: layer.values[g : g + 1, :, first:] for g, first in prompts.items()}
        lengths = [length for *_, length in self.rows]
        # split, not sliced per completion: one backward node each, not a zero-filled (1, H, N, hd) per completion
        qs, ks, vs = query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)
        alike: dict[tuple[int, int], list[int]] = {}  # completions of one prompt and one length: one call
        for i, (g, _, _, length) in enumerate(self.rows):
            if length:
                alike.setdefault((g, length), []).append(i)
        outs: list = [None] * len(self.rows)
        for (g, length), members in alike.items():
            q, k, v = (_stack([t[i] for i in members]) for t in (qs, ks, vs))
            prompt_k, prompt_v = (t[g].expand(len(members), -1, -1, -1) for t in (p_keys, p_values))
            y = _sdpa(q, torch.cat([prompt_k, k], 2), torch.cat([prompt_v, v], 2),
                      self._mask(P - prompts[g], length, query.device), dropout=dropout, scaling=scaling)
            for j, i in enumerate(members):
                outs[i] = y[j : j + 1]
        self.calls += 1
        return torch.cat([y for y in outs if y is not None], 2).transpose(1, 2).contiguous()

    def _mask(self, prompt: int, length: int, device):
        """Every prompt key, then causal over the completion's own: causal aligned bottom-right. Where the device's
        kernels take that alignment without a mask (CUDA: flash, else memory-efficient), torch's `CausalBias`;
        elsewhere a (length, prompt + length) bool mask (CPU: flash with the mask, which CausalBias would build
        anyway)."""
        if lower_right_kernel(device):
            from torch.nn.attention.bias import causal_lower_right

            return causal_lower_right(length, prompt + length)
        if (prompt, length) not in self._masks:
            keys = torch.arange(prompt + length, device=device)
            self._masks[prompt, length] = keys <= torch.arange(prompt, prompt + length, device=device)[:, None]
        return self._masks[prompt, length]


def lower_right_kernel(device) -> bool:
    """Whether sdpa on `device` has kernels for causal attention aligned bottom-right (queries at the end of
    the keys) without a mask."""
    return torch.device(device).type == "cuda"


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """(1, ...) tensors as one (n, ...) batch (one alone as it is)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_PACKED: ContextVar[Packed | None] = ContextVar("thinkforge_packed", default=None)


@contextmanager
def packed_completions(packed: Packed):
    """Inside, the model's attention (document_attention) runs `packed`'s layout: its forward takes the packed
    completions (1, N) with their positions and no cache."""
    token = _PACKED.set(packed)
    try:
        yield packed
    finally:
        _PACKED.reset(token)


def key_runs(keys: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(start, end, one run) of each row's valid keys (B, K) bool, with one host sync."""
    n = keys.sum(-1)
    first = keys.int().argmax(-1)
    last = keys.shape[1] - 1 - keys.flip(-1).int().argmax(-1)
    out = []
    for count, s, e in torch.stack([n, first, last + 1], -1).tolist():
        out.append((s, e, e - s == count) if count else (keys.shape[1], keys.shape[1], True))
    return out


def padded_attention(query, key, value, keys, *, dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """Causal attention of each row's queries over its valid keys, without a (Q, K) mask. query (B, H, Q, hd)
    are the last Q of the K positions of key and value (B, Hkv, K, hd); keys (B, K) bool (its runs computed
    once by `_mask`, else here). -> (B, Q, H, hd), zeros at queries with no valid key before them (padding)."""
    B, H, Q, _ = query.shape
    K = key.shape[2]
    first_query = K - Q  # the position of query 0 (a cache's length before these queries)
    runs = getattr(keys, "thinkforge_runs", None) or key_runs(keys)
    rows: list = [None] * B
    same: dict[tuple[int, int], list[int]] = {}
    for b, (s, e, one) in enumerate(runs):
        if one:
            same.setdefault((s, e), []).append(b)
            continue
        mask = keys[b] & (torch.arange(K, device=key.device) <= torch.arange(first_query, K, device=key.device)[:, None])
        none = ~mask.any(-1, keepdim=True)  # a padding query with no key: any finite value, then zeros
        y = _sdpa(query[b : b + 1], key[b : b + 1], value[b : b + 1], mask | none, dropout=dropout, scaling=scaling)
        rows[b] = y.masked_fill(none, 0.0)
    for (s, e), members in same.items():
        start = max(s, first_query)  # the first valid query's position
        y = query.new_zeros(len(members), H, 0, value.shape[-1])
        if start < e:
            q = _rows(query, members)[:, :, start - first_query : e - first_query]
            lead = start - s  # keys before the first query: zero queries in front line is_causal up with the end
            if lead:
                q = torch.cat([q.new_zeros(q.shape[0], H, lead, q.shape[-1]), q], 2)
            y = _sdpa(q, _rows(key, members)[:, :, s:e], _rows(value, members)[:, :, s:e], dropout=dropout,
                      scaling=scaling)[:, :, lead:]
        before = start - first_query
        y = F.pad(y, (0, 0, before, Q - before - y.shape[2]))  # padding queries: zeros
        for i, b in enumerate(members):
            rows[b] = y[i : i + 1]
    return torch.cat(rows).transpose(1, 2).contiguous()


def _rows(t: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Rows `members` of t (a view for one row)."""
    if len(members) == 1:
        return t[members[0] : members[0] + 1]
    return t.index_select(0, torch.tensor(members, device=t.device))


def _mask(**kwargs):
    """No mask for a row without padding or cache (the documents come from the position ids); for a long
    padded or cached causal batch its (B, K) valid keys, which `document_attention` reads without building
    the (B, 1, Q, K) mask; else sdpa's own mask (see the module's docstring for which calls)."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if _PACKED.get() is not None:  # `Packed.attend` lays the completions out itself
        return None
    mask = kwargs.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    q, kv, q_offset, kv_offset = kwargs["q_length"], kwargs["kv_length"], kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    window = kwargs.get("local_size")  # a sliding-window layer's window (Phi-4-mini's covers its whole context)
    fn = kwargs.get("mask_function")
    if (window is not None and window < kv + kv_offset) or "allow_is_bidirectional_skip" in kwargs or kwargs.get("use_vmap"):
        return sdpa_mask(**kwargs)  # a biting window, a bidirectional or custom pattern: transformers' mask says
    # causal, a window that never bites, or transformers' packed-row wrapper of them (and_masks, not vmapped)
    causal = fn is causal_mask_function or getattr(fn, "__qualname__", "").startswith("and_masks.")
    if causal and not padded and q == kv and not kv_offset:
        return None
    plain = fn is causal_mask_function or (window is not None and kwargs.get("allow_is_causal_skip", True))
    if (kwargs["batch_size"] * q * kv >= SMALL_MASK and plain and kwargs.get("allow_is_causal_skip", True) and q > 1
            and not kv_offset and isinstance(q_offset, int) and q_offset == kv - q and q_offset <= q):
        keys = (torch.ones(kwargs["batch_size"], kv, dtype=torch.bool, device=kwargs.get("device", "cpu")) if mask is None
                else prepare_padding_mask(mask, kv, 0)[:, :kv].contiguous())
        keys.thinkforge_runs = key_runs(keys)  # once per forward, not per layer
        return keys
    return sdpa_mask(**kwargs)


def use_document_attention(model) -> bool:
    """Switch a model that runs transformers' sdpa attention to `document_attention`; False (unchanged) where
    it runs another implementation (eager, flash-attention, flex) or its attention is more than a causal mask
    (soft-capped scores, bidirectional, a multimodal model's sub-models)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    text = config.get_text_config()
    if (config._attn_implementation != "sdpa" or text.to_dict().get("attn_logit_softcapping")
            or not getattr(text, "is_causal", True) or getattr(config, "sub_configs", None)):
        return False
    AttentionInterface.register(NAME, document_attention)
    AttentionMaskInterface.register(NAME, _mask)
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
