"""The decode loop that every in-process backend runs (HF rollouts, evaluation, teachers, serve and chat): a
group's prompt prefilled once by the model's forward and its KV cache repeated for the group's samples, one token
per live row per step, rows that stopped leaving the batch, each sample drawing from its own random stream; on a
CPU each step runs the fast step (`engine/fast.py`) for the models it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from thinkforge.draw import SamplingParams, left_pad
from thinkforge.engine.cache import kv_cache
from thinkforge.models import forward_cached


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


def draw_dtype(device):
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
        logits = nucleus(logits, params.top_p)
    return inverse_cdf(logits, u)


def nucleus(logits, top_p: float, first: int = 256):
    """logits (B, V) with -inf outside each row's nucleus: its most likely tokens, in descending order, up to the
    first whose mass before it is at most top_p and with it more than top_p; cut by value, so a token as likely as
    the last kept one stays too (ties at the edge, as top-k keeps them), whatever order a sort would give them.

    The nucleus of a trained model's next token is a few tokens of its vocabulary: each row's `first` most likely
    are taken (topk: one pass over the row); a row that keeps all of them is sorted whole (one that drops some
    drops every token past them: the mass before a token never decreases down the sorted row). The full sort at 49,152 tokens took
    68 ms at 32 rows on our 2-core CPU, as long as a model step; a top-256 3 ms."""

    V = logits.shape[-1]
    k = min(V, first)
    probs = logits.softmax(-1)  # in vocabulary order, as the draw's
    values = probs.topk(k, dim=-1).values  # (B, k), descending
    mass = values.cumsum(-1)
    last = (mass - values <= top_p).sum(-1, keepdim=True).clamp(min=1) - 1  # the last kept, (B, 1)
    out = logits.masked_fill(probs < values.gather(-1, last), float("-inf"))
    # rows that kept all k may keep more (their (k+1)-th's mass before it can round to top_p): sorted whole
    wide = (last.squeeze(-1) == k - 1).nonzero().squeeze(-1) if k < V else last.new_zeros(0)
    if wide.numel():
        out[wide] = nucleus(logits[wide], top_p, V)
    return out


def inverse_cdf(logits, u, block: int = 1024):
    """The token (B,) at which each row's cumulative probability (vocabulary order) first exceeds its uniform u
    (B,): the row's softmax sampled; -inf logits have zero width and are never drawn. A row with no finite mass
    (NaN or +inf logits, every logit -inf) is an error, not a token.

    Two levels: the mass of each block of `block` tokens, their running sum, the block the uniform falls in, then
    the running sum inside that block only, carried in `draw_dtype` (float64: a 200k vocabulary's cumulative sum
    stays exact; float32 on MPS). The weights and the block masses are float32 sums (a float64 copy of the whole
    row cost more than the rest of the draw): their rounding, ~1e-7 relative, moves a boundary between tokens by as
    much. One float64 softmax and cumulative sum over the whole row took 22 ms a step at 32 rows x 49,152 tokens
    on our CPU (as much as a tenth of the model's step); this takes ~4 ms. One uniform per row: torch.multinomial
    draws one exponential per vocabulary entry, a tenth of a small model's decode step on CPU."""
    import torch

    dtype = draw_dtype(logits.device)
    B, V = logits.shape
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()  # (B, V), the largest 1
    if V % block:
        weights = torch.nn.functional.pad(weights, (0, block - V % block))
    blocks = weights.view(B, -1, block)
    sums = blocks.sum(-1).to(dtype)  # (B, nb)
    ends = sums.cumsum(-1)
    total = ends[:, -1]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        bad = (~(torch.isfinite(total) & (total > 0))).nonzero().squeeze(-1).tolist()
        raise ValueError(f"no token to draw in rows {bad[:8]}: their logits are NaN, +inf or all -inf (the model's "
                         "output overflowed or is broken)")
    target = u.to(logits.device, dtype).view(-1, 1) * total[:, None]  # (B, 1)
    # the block holding it (B, 1); a uniform rounded to 1 (float32 draws) lands past the end: the last block with mass
    b = torch.minimum(torch.searchsorted(ends, target, right=True), _last(sums > 0))
    inside = blocks[torch.arange(B, device=logits.device), b.squeeze(-1)]  # (B, block)
    # from the running sum before the block itself (not its end minus its mass, which can round above it and draw
    # a zero-width token first in the block): searchsorted put the target at or past it
    before = torch.cat([ends.new_zeros(B, 1), ends[:, :-1]], -1).gather(-1, b)
    j = torch.searchsorted(inside.to(dtype).cumsum(-1) + before, target, right=True)
    # rounding can leave the target at or past the block's own running total: its last token with mass, never a
    # zero-width one (the block has mass)
    return (b * block + torch.minimum(j, _last(inside > 0))).squeeze(-1)


def _last(has_mass):
    """(B, n) bool -> (B, 1): the index of each row's last True."""
    import torch

    return torch.where(has_mass, torch.arange(has_mass.shape[-1], device=has_mass.device), -1).amax(-1, keepdim=True)


@dataclass(frozen=True)
class Prompts:
    """What one decode call continues: the prompts' token ids, `n` rows per prompt, and what ends a row (a stop
    id, allowed from `min_new_tokens` on: None is the model's generation config's)."""

    ids: list[list[int]]
    n: int
    stop_ids: tuple[int, ...] | list[int]
    pad_id: int
    min_new_tokens: int | None = None


@dataclass(frozen=True)
class Hooks:
    """What a decode call tells its caller and asks it, each optional. interrupt: checked every step; when it
    returns true the rows end where they are (a server whose clients left). lockstep: called with True before each
    forward (a sharded model's ranks agree on one more; a rank whose share is done `join`s the others').
    on_token: each new token id as it is drawn (one prompt, n = 1: `HFGenerator.stream`)."""

    interrupt: Callable[[], bool] | None = None
    lockstep: Callable[[bool], bool] | None = None
    on_token: Callable[[int], None] | None = None


def decode(model, prompts: Prompts, params: SamplingParams, *, uniforms=None, hooks: Hooks = Hooks(),
           fast: dict | None = None) -> list[list[int]]:
    """prompts.n continuations of each prompt (token ids, the stop token included), ordered prompt by prompt.
    uniforms: the draws of each output row (`RowStreams`); None when greedy. fast: where the fast decode
    step (`engine.fast`) is kept between calls; it runs on CPUs for the models `fast.choose` takes (else
    transformers' forward, and the reason is told once per model), and is remade when the weights changed.
    None: transformers' forward, asked for.

    The prompts are prefilled once (left-padded, explicit positions) and their KV cache repeated n times;
    each step feeds one token per live row. Rows that stopped get pad and leave the batch once a quarter of
    it has stopped (the cache rows are selected, not recomputed).
    """
    import torch

    device = model.device
    n, pad_id, interrupt, on_token = prompts.n, prompts.pad_id, hooks.interrupt, hooks.on_token
    min_new_tokens = prompts.min_new_tokens
    if min_new_tokens is None:
        min_new_tokens = model.generation_config.min_new_tokens or 0
    ids, mask = left_pad(prompts.ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    capacity = ids.shape[1] + params.max_new_tokens
    cache = kv_cache(model, capacity)
    agree = hooks.lockstep or (lambda going: going)
    with torch.no_grad():
        agree(True)
        out, cache = forward_cached(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1, :].float().repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        next_pos = pos[:, -1:].repeat_interleave(n, 0) + 1
        fast_step = None  # engine/fast.py's step, where it runs this model
        if fast is not None:
            from thinkforge.engine.fast import choose

            fast_step = choose(model, cache, capacity, fast, lockstep=hooks.lockstep is not None)
        total = logits.shape[0]
        rows = torch.arange(total, device=device)  # the output row of each batch row
        alive = torch.ones(total, dtype=torch.bool, device=device)
        tokens = torch.full((total, max(1, params.max_new_tokens)), pad_id, dtype=torch.long, device=device)
        lengths = torch.zeros(total, dtype=torch.long, device=device)
        stop = torch.tensor(list(prompts.stop_ids), dtype=torch.long, device=device)
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
            agree(True)
            if fast_step is not None:
                logits = fast_step(nxt, next_pos.view(-1), mask.bool(), cache)
            else:
                out, cache = forward_cached(model, cache, input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=next_pos)
                logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
    return [r[:k] for r, k in zip(tokens.tolist(), lengths.tolist(), strict=True)]


def join(model, lockstep: Callable[[bool], bool], pad_id: int) -> None:
    """This rank's share of a generation phase is done: with the ranks of a sharded model (`lockstep`, as
    `Hooks.lockstep`), run stand-in forwards, whose collectives pair with the other ranks', until every rank's
    share is done."""
    import torch

    from thinkforge.models import eval_mode

    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=model.device)
    with eval_mode(model), torch.no_grad():
        while lockstep(False):
            model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False)  # its collectives only
