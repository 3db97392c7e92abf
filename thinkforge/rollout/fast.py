"""The decode step on a CPU: one new token per row of a Llama-family model, over weights packed for oneDNN.

Where a CPU decode step's time goes (SmolLM2-135M, 2 cores, dev/LOG.md 2026-11-29): transformers' forward is
~45 module calls and ~60 tensor ops per layer, 9-25 ms of framework work per step before any arithmetic; its
matrix-vector products reach 16 GB/s (fp32) of this machine's 45 GB/s; and under bf16 autocast every weight is
converted again at every step. Here the step is ~20 tensor ops per layer: q/k/v and gate/up are each one matrix
product, the weights are reordered once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`), which
reads them 1.7-2.8x faster than `F.linear`, in the precision of the KV cache the prefill wrote (bf16 under
autocast: converted once, not every step).

The packed copy is keyed by every parameter's identity and in-place version counter (`Tensor._version`, which
an optimizer step, `load_state_dict` or `copy_` bumps), so a step never runs on weights older than the model's:
there is no sync to forget. A LoRA adapter is merged into the packed copy (delta W = B A scale); the model is
not touched.

The prefill and everything the fast step does not cover stay transformers' forward: `FastStep.refuses(model)`
says why not in one line (a sharded model, a GPU, an activation other than SiLU, a sliding window that bites,
an architecture outside Llama / Mistral / Qwen2 / Phi-3).
"""

from __future__ import annotations

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")


def _unwrapped(model):
    from thinkforge.models import is_adapter

    return model.get_base_model() if is_adapter(model) else model


def refuses(model, capacity: int) -> str | None:
    """Why the fast step cannot run `model` for a cache of `capacity` positions, or None when it can."""
    import torch

    base = _unwrapped(model)
    name = type(base).__name__
    config = base.config
    if name not in SUPPORTED:
        return f"{name} is not one of {', '.join(SUPPORTED)}"
    if base.device.type != "cpu":
        return f"the model is on {base.device.type}, the packed step is for CPUs"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return "the model is sharded (FSDP2): each forward is a collective"
    settings = config.to_dict()
    if settings.get("hidden_act") != "silu":
        return f"activation {settings.get('hidden_act')} (the packed step has SiLU)"
    window = settings.get("sliding_window") if settings.get("use_sliding_window", True) else None
    if window and window < capacity:
        return f"a sliding window of {window} positions bites within {capacity}"
    if settings.get("pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    return None


def _linear_weight(module):
    """(weight, bias) of a Linear as the model computes it: a LoRA layer's active adapters added in."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        weight = base.weight
        if not module.merged and not module.disable_adapters:
            for name in module.active_adapters:
                if name in module.lora_A:
                    weight = weight + module.get_delta_weight(name)
        return weight, base.bias
    return module.weight, module.bias


def key(model, dtype) -> tuple:
    """What the packed copy was made from: every parameter's identity and in-place version, and the dtype."""
    return (dtype, *((id(p), p._version) for p in model.parameters()))


class FastStep:
    """`step(ids (B,), positions (B,), keys (B, K) bool, cache)` -> logits (B, V) float32, writing each layer's new
    key and value into the reserved cache layers (`hf.reserved_layer()`) at their current length."""

    def __init__(self, model, dtype):
        import torch

        base = _unwrapped(model)
        config = base.config
        self.dtype = dtype
        self.key = key(model, dtype)
        inner = base.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = config.to_dict().get("head_dim") or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach().to(dtype)
        self.norm = inner.norm.weight.detach().float()
        head_weight, head_bias = _linear_weight(base.lm_head)
        self.head = self._pack(head_weight, head_bias)
        self.layers = []
        fused = type(base).__name__ == "Phi3ForCausalLM"
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if fused:  # Phi-3: q/k/v and gate/up are one matrix each in the checkpoint already
                    qkv = _linear_weight(attn.qkv_proj)
                else:
                    parts = [_linear_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
                    biases = [b for _, b in parts]
                    qkv = (torch.cat([w for w, _ in parts]), torch.cat(biases) if all(b is not None for b in biases) else None)
                if fused:
                    gate_up = _linear_weight(mlp.gate_up_proj)
                else:
                    (g, gb), (u, ub) = _linear_weight(mlp.gate_proj), _linear_weight(mlp.up_proj)
                    gate_up = (torch.cat([g, u]), torch.cat([gb, ub]) if gb is not None else None)
                self.layers.append((
                    layer.input_layernorm.weight.detach().float(), self._pack(*qkv), self._pack(*_linear_weight(attn.o_proj)),
                    layer.post_attention_layernorm.weight.detach().float(), self._pack(*gate_up),
                    self._pack(*_linear_weight(mlp.down_proj)),
                ))

    def _pack(self, weight, bias):
        import torch

        weight = weight.detach().to(self.dtype).contiguous()
        bias = bias.detach().to(self.dtype) if bias is not None else None
        return torch.ops.mkldnn._reorder_linear_weight(weight, 32), bias, weight.shape[0]

    @staticmethod
    def _linear(x, packed):
        import torch

        weight, bias, _ = packed
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    def __call__(self, ids, positions, keys, cache):
        import torch

        # inference mode: ~5% at one row (no version counters); the step's tensors never reach autograd
        with torch.autocast("cpu", enabled=False):  # the weights are in self.dtype already
            with torch.inference_mode():
                last = self._step(ids, positions, keys, cache)
            return self._linear(last, self.head).float()  # outside: the decode loop edits the logits in place

    @staticmethod
    def _rotation(cos, sin, d: int):
        """(B, d, d) matrices R with x @ R = transformers' rotation of x (B rows of one head, d wide): the first
        `rotated` dims turn in two halves, x1 * cos - x2 * sin and x2 * cos + x1 * sin; the rest pass."""
        import torch

        b, half = cos.shape[0], cos.shape[-1] // 2
        c, s = cos[:, :half], sin[:, :half]
        r = torch.zeros(b, d, d, dtype=cos.dtype, device=cos.device)
        i = torch.arange(half, device=cos.device)
        r[:, i, i] = c  # x1 -> first half
        r[:, i + half, i] = -s  # -x2 -> first half
        r[:, i + half, i + half] = c  # x2 -> second half
        r[:, i, i + half] = s  # x1 -> second half
        j = torch.arange(2 * half, d, device=cos.device)
        r[:, j, j] = 1.0
        return r

    def _step(self, ids, positions, keys, cache):
        import torch
        import torch.nn.functional as F

        b = ids.shape[0]
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        w = self.dtype
        # The residual stream stays float32 (as under autocast); the norms run on it and hand the matrix products
        # their input in the weights' dtype.
        h = F.embedding(ids, self.embed).float()  # (B, H)
        cos, sin = self.rotary(h, positions.view(b, 1))  # (B, 1, rotated), the model's own rope and its scaling
        rotation = self._rotation(cos.view(b, -1), sin.view(b, -1), d).to(w)  # (B, d, d)
        padded = not bool(keys.all())
        hidden = ~keys.view(b, 1, 1, -1)  # left padding
        width, group = h.shape[-1], hq // hkv
        for (n1, qkv_w, o_w, n2, gu_w, down_w), layer in zip(self.layers, cache.layers, strict=True):
            qkv = self._linear(F.rms_norm(h, (width,), n1, self.eps).to(w), qkv_w)
            qk = torch.bmm(qkv[:, : (hq + hkv) * d].view(b, hq + hkv, d), rotation)  # query heads, then key heads
            at = layer.length
            cached = layer.k_buf.dtype
            layer.k_buf[:, :, at] = qk[:, hq:]
            layer.v_buf[:, :, at] = qkv[:, (hq + hkv) * d :].view(b, hkv, d)
            layer.length = at + 1
            keys_, values = layer.k_buf[:, :, : at + 1], layer.v_buf[:, :, : at + 1]
            layer.keys, layer.values = keys_, values
            q = qk[:, :hq].to(cached).view(b, hkv, group, d)  # query head i reads kv head i // group (repeat_kv)
            if not padded:  # every key counts: sdpa, the group's query heads as its query positions
                o = F.scaled_dot_product_attention(q, keys_, values, scale=self.scale)
            else:  # two batched products and a float32 softmax (CPU sdpa with a mask: ~1 ms per call at 32 rows)
                scores = torch.matmul(q, keys_.transpose(-1, -2)).float().mul_(self.scale).masked_fill_(hidden, float("-inf"))
                o = torch.matmul(scores.softmax(-1).to(cached), values)  # (B, hkv, group, d)
            h = h + self._linear(o.reshape(b, hq * d).to(w), o_w)
            gate, up = self._linear(F.rms_norm(h, (width,), n2, self.eps).to(w), gu_w).chunk(2, dim=-1)
            h = h + self._linear(F.silu(gate) * up, down_w)
        return F.rms_norm(h, (width,), self.norm, self.eps).to(w)


def fast_step(model, cache, capacity: int, held: FastStep | None = None):
    """A FastStep for `model` (its cache prefilled, reserved layers), its weights in the dtype the model computes
    in (autocast's where it is on, else the parameters'): `held` when it was made from the model's current
    weights in that dtype, a new one otherwise; None when the model is refused."""
    import torch

    if refuses(model, capacity) is not None:
        return None
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled("cpu") and dtype == torch.float32:
        dtype = torch.get_autocast_dtype("cpu")
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    if held is not None and held.key == key(model, dtype):
        return held
    return FastStep(model, dtype)
