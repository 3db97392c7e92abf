"""The policy's forward pass over a Rollout: log-probs of the completion tokens, their entropy, the values.

Shared by the RL stage (training, reference and old log-probs) and PPO's critic. Log-probs are taken at the
sampler's temperature (PITFALLS 5): `Rollout.temperature`.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import NamedTuple

import torch

from thinkforge.losses import IGNORE
from thinkforge.models import eval_mode, forward_cached
from thinkforge.rollout.types import Rollout
from thinkforge.train.attention import NAME, Packed, packed_completions
from thinkforge.train.dist import Dist
from thinkforge.train.head import final, hf_model, hidden_states


def uses_checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def forward_logp(model, batch: Rollout, rows: slice, value_head=None, *, share_prompt: bool | None = None,
                 with_entropy: bool = False, chunk: int | None = None):
    """Log-probs of the completion tokens (n, C) at the sampler's temperature, with_entropy their policy's
    entropy (n, C) (a metric), and with a value head the values before each of them (n, C) (PPO); None for
    what is not asked. The output layer runs a chunk of completion tokens at a time (train/head.py): never
    the (n, C, V) logits.

    A group's prompt is run once; its completions run on top of its KV cache (gradients flow into the prompt
    pass through the cache): packed in one row without padding where the model runs thinkforge's attention
    (`packed_states`), else right-padded on the cache repeated for each. Under gradient checkpointing, which drops the
    cache in training, each row runs prompt + completion in one pass instead, and so do the reference and
    old log-prob passes of such a model (in eval mode), so that in low precision both round alike.
    """
    dev = model.device
    comp = batch.completion_ids[rows].to(dev)
    c_mask = batch.completion_mask[rows].to(dev)
    needed, row_prompt = torch.unique(batch.group[rows], return_inverse=True)  # the prompts these rows continue
    p_ids, p_mask = batch.prompt_ids[needed].to(dev), batch.prompt_mask[needed].to(dev)
    row_prompt = row_prompt.to(dev)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    if share_prompt is None:  # one layout for the training pass and the no-grad passes it is compared with
        share_prompt = not uses_checkpointing(model)
    with hidden_states(model, chunk) as head:  # the forwards below return final hidden states (D wide)
        if share_prompt:
            from transformers import DynamicCache

            first, cache = forward_cached(model, DynamicCache(config=model.config), input_ids=p_ids,
                                          attention_mask=p_mask, position_ids=p_pos, logits_to_keep=1)
            last = final(first)[:, -1]  # (B, D): each prompt's last position predicts its completions' first token
            if packable(model, p_mask, c_mask):
                states = packed_states(model, Prompts(cache, last, p_mask, row_prompt), comp, c_mask)
            else:
                cache.batch_select_indices(row_prompt)  # each completion row gets its prompt's keys and values
                c_pos = p_pos[row_prompt, -1:] + 1 + torch.arange(comp.shape[1], device=dev)
                out, _ = forward_cached(model, cache, input_ids=comp, attention_mask=torch.cat([p_mask[row_prompt], c_mask], -1),
                                        position_ids=c_pos)
                states = torch.cat([last[row_prompt, None], final(out)[:, :-1]], 1)  # (n, C, D)
        else:
            mask = torch.cat([p_mask[row_prompt], c_mask], -1)
            out = model(input_ids=torch.cat([p_ids[row_prompt], comp], -1), attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
            start = p_ids.shape[1] - 1  # the last prompt position predicts the first completion token
            states = final(out)[:, start:-1]  # (n, C, D)
    got = head.logprobs(states, comp.masked_fill(c_mask == 0, IGNORE), batch.temperature, with_entropy)  # (n, C)
    return got[0], got[2] if with_entropy else None, value_head(states) if value_head is not None else None


def packable(model, p_mask: torch.Tensor, c_mask: torch.Tensor) -> bool:
    """Whether the completions can run packed (`packed_states`); where not, the padded layout runs (the same
    numbers, slower) and why is said once per reason."""
    why = unpackable(model, p_mask, c_mask)
    if why:
        warnings.warn(f"{type(hf_model(model)).__name__}: the completions run right-padded on their prompts' cache, "
                      f"not packed: {why}", stacklevel=2)
    return why is None and bool(c_mask.sum())


def unpackable(model, p_mask: torch.Tensor, c_mask: torch.Tensor) -> str | None:
    """Why the completions cannot run packed, or None: the model must run train/attention.py's attention, with
    no window shorter than the rows and every layer's own keys and values, the prompts left-padded and the
    completions right-padded."""
    config = hf_model(model).config
    text = config.get_text_config()
    P, C = p_mask.shape[1], c_mask.shape[1]
    if config._attn_implementation != NAME:
        return f"its attention is {config._attn_implementation!r}, not {NAME!r} (train/attention.py)"
    window = getattr(text, "sliding_window", None)  # configs without a window have no such key
    if window is not None and window < P + C:
        return f"a sliding window of {window} keys, shorter than some prompt + completion rows"
    if getattr(text, "num_kv_shared_layers", 0):  # layers that read an earlier layer's keys and values
        return f"{text.num_kv_shared_layers} layers share another layer's keys and values"
    p_len, c_len = p_mask.sum(-1, keepdim=True), c_mask.sum(-1, keepdim=True)
    if not torch.equal(p_mask.bool(), torch.arange(P, device=p_mask.device) >= P - p_len):
        return "the prompts are not left-padded"
    if not torch.equal(c_mask.bool(), torch.arange(C, device=c_mask.device) < c_len):
        return "the completions are not right-padded"
    return None


class Prompts(NamedTuple):
    """The prompt pass the completions continue: its KV cache, its last hidden states (B, D), the prompts' mask
    (B, P) (left-padded) and each completion's prompt row (n,)."""

    cache: object
    last: torch.Tensor
    mask: torch.Tensor
    of_row: torch.Tensor


def packed_states(model, prompts: Prompts, comp: torch.Tensor, c_mask: torch.Tensor) -> torch.Tensor:
    """The completions' real tokens packed in one row (1, N), no padding, run on their prompts' cache (`Packed`);
    -> the hidden state before each completion token (n, C, D), zeros at padding: the prompt's last state before a
    completion's first token, the packed row's own states after."""
    cache, last, p_mask, row_prompt = prompts
    valid = c_mask.bool()  # (n, C), right-padded
    lengths = valid.sum(-1)
    P = p_mask.shape[1]
    p_len = p_mask.sum(-1)
    first_key = (P - p_len)[row_prompt]  # each completion's prompt's first valid key
    offsets = lengths.cumsum(0) - lengths
    packed = Packed(cache, [tuple(r) for r in torch.stack([row_prompt, first_key, offsets, lengths], -1).tolist()])
    ids = comp[valid][None]  # (1, N)
    pos = (p_len[row_prompt, None] + torch.arange(comp.shape[1], device=comp.device))[valid][None]
    with packed_completions(packed):
        out = model(input_ids=ids, position_ids=pos, use_cache=False)
    layers = hf_model(model).config.get_text_config().num_hidden_layers
    if packed.calls != layers:  # a model whose layers do not all call the attention interface: never silently
        raise RuntimeError(f"{type(hf_model(model)).__name__}: {packed.calls} of {layers} layers ran thinkforge's "
                           "packed attention (the others are not attention layers over a KV cache); train it with "
                           "model.gradient_checkpointing=true (each row's prompt and completion in one pass)")
    h = final(out)[0]  # (N, D)
    before = torch.cat([h.new_zeros(1, h.shape[-1]), h[:-1]])  # (N, D): each token's predecessor in the row
    starts = offsets[lengths > 0]
    before = before.index_put((starts,), last[row_prompt[lengths > 0]].to(before.dtype))
    return h.new_zeros(*valid.shape, h.shape[-1]).masked_scatter(valid[..., None], before)  # (n, C, D)


@torch.no_grad()
def logp_no_grad(model, batch: Rollout, micro: int, disable_adapter: bool = False, chunk: int | None = None,
                 dist: Dist = Dist()) -> torch.Tensor:
    """(N, C) log-probs in eval mode, `micro` rows at a time; with disable_adapter the LoRA base's. On sharded
    ranks every rank runs as many passes as the busiest (repeats of its last, dropped)."""
    outs = []
    with eval_mode(model), model.disable_adapter() if disable_adapter else nullcontext():
        for k, weight in no_grad_rounds(len(batch.texts), micro, dist):
            got = forward_logp(model, batch, slice(k * micro, (k + 1) * micro), chunk=chunk)[0]
            if weight:
                outs.append(got.float().cpu())
    return torch.cat(outs)


def no_grad_rounds(rows: int, micro: int, dist: Dist) -> list[tuple[int, float]]:
    """(micro-batch index, weight) of a no-grad pass over `rows`: each micro-batch once, and on sharded ranks
    zero-weight repeats up to the busiest rank's count (its forwards are collectives)."""
    n = -(-rows // micro)
    return dist.rounds(n) if dist.sharded else [(i, 1.0) for i in range(n)]
