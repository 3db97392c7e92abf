"""The decode loop's KV cache: one dtype for keys and values, full-attention layers reserved up front (written in
place, read as views). Both the loop (`decode.py`) and the fast step (`fast.py`) read it."""

from __future__ import annotations

import functools


def kv_dtype(weights, autocast=None):
    """The one dtype the decode loop's KV cache holds keys and values in: autocast's where it is on (`autocast`,
    None when off), else the weights' (torch dtypes). Attention reads both in it (autocast runs sdpa and matmul
    in it, transformers' flash-attention casts to it), yet under bf16 autocast over float32 weights transformers'
    layers hand float32 keys (bf16 projections turned by float32 cos/sin) beside bf16 values: a float32 key cache
    costs half as much again for keys read in bf16. `thinkforge plan` counts the cache with this."""
    return autocast or weights


def kv_cache(model, capacity: int):
    """A KV cache for `model`'s decode loop, its full-attention layers reserved for `capacity` positions
    (`reserved_layer`), keys and values stored in `kv_dtype` under the autocast in force."""
    import torch
    from transformers.cache_utils import DynamicLayer

    device = model.device.type
    weights = next(p.dtype for p in model.parameters() if p.is_floating_point())
    dtype = kv_dtype(weights, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
    cache = _cache_class()(model.config, dtype)
    cache.layers = [reserved_layer()(capacity) if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


@functools.cache
def _cache_class():
    """The Cache class (made on first use: transformers is imported lazily)."""
    from transformers import DynamicCache

    class Cache(DynamicCache):
        """transformers' DynamicCache storing every layer's keys and values in one dtype (`kv_dtype`)."""

        def __init__(self, config, dtype):
            super().__init__(config=config)
            self.kv_dtype = dtype

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.to(self.kv_dtype), value_states.to(self.kv_dtype), layer_idx, *args, **kwargs)

    return Cache


@functools.cache
def reserved_layer():
    """The ReservedLayer class (made on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A full-attention cache layer with its length reserved up front: each step writes in place and
        attention reads a view, where the default layer concatenates (copies the whole cache) every step —
        half of a decode step at 256 rows x 150 positions on CPU."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device = key_states.dtype, key_states.device
                b, h, _, d = key_states.shape
                self.k_buf = key_states.new_empty((b, h, self.capacity, d))
                self.v_buf = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
                self.is_initialized = True
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"KV cache reserved for {self.capacity} positions, asked for {end}")
            self.k_buf[:, :, self.length : end] = key_states
            self.v_buf[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.k_buf, self.v_buf = self.k_buf.repeat_interleave(repeats, 0), self.v_buf.repeat_interleave(repeats, 0)
                self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
                self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]

    return ReservedLayer
