"""Generation with Hugging Face transformers: KV cache, left-padded batches, a group's samples together.

`generate` and `stream` run our own decode loop: each distinct prompt is prefilled once by the model's forward
(the model and its KV cache are transformers') and its cache repeated for the n samples of its group, and rows
that have stopped leave the batch, so a group costs one prompt pass and the batch shrinks as samples finish. On
a CPU each decode step runs the packed step (`rollout/fast.py`) for the models it takes. A model whose forward takes no explicit positions or KV cache is
refused with one line (`models.cache_argument`): there is no quiet fallback that would lose per-sample streams.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator

from thinkforge.models import cache_argument, eval_mode, forward_cached
from thinkforge.rollout.types import (
    Completion,
    SamplingParams,
    encode,
    is_out_of_memory,
    left_pad,
    pad_id,
    stop_ids,
)


class HFGenerator:
    """Generate with a loaded model and tokenizer. `batch_size` counts sequences (prompts x samples).

    peers: the ranks of a sharded (FSDP2) model, whose every forward is a collective. Each rank generates its
    own share, and before each forward all ranks agree that one more runs (`Dist.lockstep`); a rank whose
    share is done calls `done()`, which runs stand-in forwards until every rank's share is done. The ranks'
    shares need not match in prompts, chunks or lengths."""

    def __init__(self, model, tokenizer, batch_size: int = 16, peers=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        cache_argument(model)  # a model the decode loop cannot run is refused here, in one line
        self.stop_ids = stop_ids(tokenizer, model.generation_config)
        self.interrupt = None  # a function checked every decode step; true ends the rows (the server sets it)
        self.peers = peers if peers is not None and peers.sharded else None
        self.version = 0  # load_weights calls: the training model's optimizer steps since the run (re)started
        self.packed = {}  # the decode loop's FastStep (rollout/fast.py), remade whenever the weights changed

    def done(self) -> None:
        """This rank's generation is over: with sharded peers, join their forwards until theirs is too."""
        if self.peers is None:
            return
        import torch

        model = self.model
        ids = torch.full((1, 1), pad_id(self.tokenizer), dtype=torch.long, device=model.device)
        with eval_mode(model), torch.no_grad():
            while self.peers.lockstep(False):
                model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False)  # its collectives only

    def load_weights(self, model) -> dict[str, float]:
        """Generation runs on the training model itself: its weights are always the current ones."""
        if model is not self.model:
            self.model, self.stop_ids = model, stop_ids(self.tokenizer, model.generation_config)
            self.packed.clear()  # the old model's packed step: its parameters' ids may be reused by the new one
        self.version += 1
        return {}

    def prove(self, model) -> dict[str, float]:
        """The training model itself samples: nothing to prove."""
        return {}

    def close(self) -> None:
        pass

    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> list[Completion]:
        tok, model = self.tokenizer, self.model
        stops = self.stop_ids
        out: list[Completion] = []
        with eval_mode(model):
            start = 0
            while start < len(prompts):
                chunk = prompts[start : start + max(1, self.batch_size // n)]
                try:
                    rows = self._rows(chunk, start, n, params, stops)
                except RuntimeError as e:  # out of memory: halve the batch and retry; a bug propagates
                    if not is_out_of_memory(e) or len(chunk) == 1 or self.peers is not None:  # peers wait in a collective
                        raise
                    self.batch_size = max(n, self.batch_size // 2)
                    _free_cache(model.device)
                    continue
                for row, ids in enumerate(rows):
                    stopped = bool(ids) and ids[-1] in stops
                    text = tok.decode(ids, skip_special_tokens=True)
                    out.append(Completion(start + row // n, text, tuple(ids), "stop" if stopped else "length",
                                          version=self.version))
                start += len(chunk)
        return out

    def _rows(self, chunk: list[str], start: int, n: int, params: SamplingParams, stops: list[int]) -> list[list[int]]:
        """The generated ids of prompts chunk (the first is prompt `start` of the call), n rows per prompt."""
        tok, model = self.tokenizer, self.model
        encoded = [encode(tok, p) for p in chunk]
        uniforms = None
        if params.temperature > 0:
            keys = [(params.stream(start + p), j) for p in range(len(chunk)) for j in range(n)]
            uniforms = RowStreams(keys, _draw_dtype(model.device), model.device)
        return decode(model, encoded, n, params, stops, pad_id(tok), uniforms=uniforms, interrupt=self.interrupt,
                      lockstep=self.peers.lockstep if self.peers is not None else None, packed=self.packed)

    def stream(self, prompt, params: SamplingParams) -> Iterator[str]:
        """The text of one completion piece by piece: the decode loop of `generate` (the same tokens as
        `generate([prompt], 1, params)`: the same stream, the packed step) in a thread, each new token's text
        yielded as soon as it is whole (a character split over tokens waits for its last byte). Generation stops
        at the next token when the consumer stops iterating (closing the iterator: a client that left)."""
        import queue

        tok, model = self.tokenizer, self.model
        ids = encode(tok, prompt)
        tokens: queue.Queue = queue.Queue()
        left = threading.Event()
        failed: list[BaseException] = []

        def run():
            try:
                with eval_mode(model):
                    uniforms = None
                    if params.temperature > 0:
                        uniforms = RowStreams([(params.stream(0), 0)], _draw_dtype(model.device), model.device)
                    decode(model, [ids], 1, params, self.stop_ids, pad_id(tok), uniforms=uniforms, interrupt=left.is_set,
                           packed=self.packed, on_token=tokens.put)
            except BaseException as e:  # noqa: BLE001 - raised in the consumer's thread below
                failed.append(e)
            finally:
                tokens.put(None)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        said: list[int] = []
        start = done = 0  # said[start:done] was yielded already; decoding from `start` keeps each call short
        try:
            while (t := tokens.get()) is not None:
                said.append(t)
                before = tok.decode(said[start:done], skip_special_tokens=True)
                now = tok.decode(said[start:], skip_special_tokens=True)
                if len(now) > len(before) and not now.endswith("\ufffd"):  # not a character's first bytes only
                    yield now[len(before):]
                    start, done = done, len(said)
            if failed:
                raise failed[0]
            before = tok.decode(said[start:done], skip_special_tokens=True)
            rest = tok.decode(said[start:], skip_special_tokens=True)[len(before):]
            if rest:
                yield rest
        finally:
            left.set()
            thread.join()


class RowStreams:
    """The uniforms of each output row: row r draws from the stream of sample keys[r] = (stream key, sample).

    Each sample draws from its own stream (numpy's generator seeded by the prompt's 128-bit stream key and the
    sample's index), so its tokens do not depend on the batch it ran in (batch size, rows that stopped), and
    two models sampled with the same keys meet the same uniforms: common random numbers, under which a small
    change of the model changes few samples and a comparison of two checkpoints measures the models rather
    than the draw.

    `at(rows, t)` gives the uniforms of output rows `rows` at step t (t = 0, 1, 2, ... in order). They are
    drawn `block` steps at a time for every row, so memory is rows x block whatever max_new_tokens is; the
    numbers equal one long draw per row (numpy's generators continue their stream across calls).
    """

    def __init__(self, keys: list[tuple[int, int]], dtype=None, device=None, block: int = 64):
        self.streams = [sample_generator(key, sample) for key, sample in keys]
        self.block, self.dtype, self.device = block, dtype, device
        self.start, self.values = 0, None

    def at(self, rows, t: int):
        import numpy as np
        import torch

        if self.values is not None and t >= self.start + self.block:
            self.start, self.values = self.start + self.block, None
        if not self.start <= t < self.start + self.block:
            raise ValueError(f"uniforms are read in step order: step {t} is outside the block from step {self.start}")
        if self.values is None:
            drawn = np.stack([s.random(self.block) for s in self.streams])
            self.values = torch.from_numpy(drawn).to(self.device, self.dtype)
        return self.values[rows, t - self.start]


def sample_generator(key: int, sample: int):
    """numpy's generator of sample `sample` of the prompt whose stream key is `key` (a 128-bit int): the entropy
    is three 64-bit words, always three, so no two (key, sample) pairs share a seed sequence."""
    import numpy as np

    return np.random.default_rng([key & (2**64 - 1), key >> 64, sample])


def _draw_dtype(device):
    """float64 for the CDF and the uniforms (a 200k vocabulary's cumulative sum stays exact), float32 on MPS,
    which has no float64."""
    import torch

    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def pick(logits, params: SamplingParams, u):
    """Next token per row (B,) from logits (B, V) and one uniform per row u (B,): argmax at temperature 0, else
    top-k, top-p and an inverse-CDF draw."""
    import torch

    if params.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs > params.top_p  # the smallest prefix whose mass reaches top_p stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
    # Inverse-CDF draw: one uniform per row (torch.multinomial draws one exponential per vocabulary entry,
    # a tenth of a small model's decode step on CPU). Masked tokens have zero width and are never drawn.
    cdf = logits.softmax(-1, dtype=_draw_dtype(logits.device)).cumsum(-1)
    target = u.to(cdf.device, cdf.dtype).view(-1, 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def decode(model, encoded: list[list[int]], n: int, params: SamplingParams, stop_ids: list[int], pad_id: int, *,
           uniforms=None, min_new_tokens: int | None = None, interrupt=None, lockstep=None,
           packed: dict | None = None, on_token=None) -> list[list[int]]:
    """n continuations of each prompt (token ids, the stop token included), ordered prompt by prompt.
    uniforms: the draws of each output row (`RowStreams`); None when greedy. interrupt: a function checked
    every step; when it returns true the rows end where they are (a server whose clients left). lockstep:
    called with True before each forward (a sharded model's ranks agree on one more: `HFGenerator.done`).
    packed: where the packed decode step (`fast.FastStep`) is kept between calls (its "step"); the step
    is used on CPUs for the models it takes (else transformers' forward), and remade when the weights changed.
    on_token: called with each new token id as it is drawn (one prompt, n = 1: `HFGenerator.stream`).

    The prompts are prefilled once (left-padded, explicit positions) and their KV cache repeated n times;
    each step feeds one token per live row. Rows that stopped get pad and leave the batch once a quarter of
    it has stopped (the cache rows are selected, not recomputed).
    """
    import torch

    device = model.device
    if min_new_tokens is None:
        min_new_tokens = model.generation_config.min_new_tokens or 0
    ids, mask = left_pad(encoded, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = kv_cache(model, ids.shape[1] + params.max_new_tokens)
    reserved = reserved_layer()
    step = lockstep or (lambda going: going)
    with torch.no_grad():
        step(True)
        out, cache = forward_cached(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1, :].float().repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        next_pos = pos[:, -1:].repeat_interleave(n, 0) + 1
        fast = None
        if packed is not None and lockstep is None and all(type(x) is reserved for x in cache.layers):
            from thinkforge.rollout.fast import fast_step

            fast = fast_step(model, cache, ids.shape[1] + params.max_new_tokens, packed)
        total = logits.shape[0]
        rows = torch.arange(total, device=device)  # the output row of each batch row
        alive = torch.ones(total, dtype=torch.bool, device=device)
        tokens = torch.full((total, max(1, params.max_new_tokens)), pad_id, dtype=torch.long, device=device)
        lengths = torch.zeros(total, dtype=torch.long, device=device)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        for t in range(params.max_new_tokens):
            if t < min_new_tokens:
                logits[:, stop] = float("-inf")
            u = uniforms.at(rows, t) if uniforms is not None else None
            nxt = torch.where(alive, pick(logits, params, u), pad_id)
            tokens[rows[alive], t] = nxt[alive]
            if on_token is not None:
                on_token(int(nxt[0]))
            lengths[rows[alive]] = t + 1
            alive = alive & ~torch.isin(nxt, stop)
            live = int(alive.sum())
            if live == 0 or t == params.max_new_tokens - 1 or (interrupt is not None and interrupt()):
                break
            if live <= 0.75 * alive.numel():
                keep = alive.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, alive, nxt, mask, next_pos = rows[keep], alive[keep], nxt[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            step(True)
            if fast is not None:
                logits = fast(nxt, next_pos.view(-1), mask.bool(), cache)
            else:
                out, cache = forward_cached(model, cache, input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=next_pos)
                logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
    return [r[:k] for r, k in zip(tokens.tolist(), lengths.tolist(), strict=True)]


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


def _free_cache(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
