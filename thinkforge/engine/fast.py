"""The decode step on a CPU: one new token per row of a Llama-family or Phi-2 model, over weights packed for oneDNN.

Where a CPU decode step's time went (SmolLM2-135M, 2 cores, dev/LOG.md 2026-11-29): transformers' forward runs
~45 module calls and ~60 tensor ops per layer (9-25 ms of framework work per step before any arithmetic), its
matrix-vector products read fp32 weights at 16 GB/s of this machine's ~46, under bf16 autocast every weight is
converted again at every step, and CPU sdpa with a padding mask takes ~1 ms per call at 32 rows. Here a step is
~20 ops per layer: q/k/v and gate/up are one matrix product each, over weights reordered once into oneDNN's
blocked layout (`mkldnn._reorder_linear_weight`: read 1.5-2.8x faster than by `F.linear`), in the dtype the
model computes in (autocast's bf16 where it is on: converted once, not at every step); the residual stream and
the norms stay float32; attention is two batched products per layer (sdpa where no row is padded).

A float32 decode that starts with at most `kernels.ROWS` rows (chat, serve's single requests, a one-row eval) runs
engine/kernels.py's C++ instead: matrix-vector products over the weights where they are (no copy), the norms, the
residual adds, the SiLU gate and the attention step fused, a Llama step's layers in one call (1.4-1.5x the oneDNN
step at one row, BENCHMARKS.md). Both layouts are kept once made (`choose`).

The packed copy is keyed (`key`) by every parameter's identity, storage and in-place version (an optimizer
step, `load_state_dict`, `copy_` bump it) and by every adapter layer's state, so a step does not run on weights
older than the model's: no sync to forget. A LoRA adapter is merged into the packed copy (delta W = B A scale);
the model is not touched.

Two kinds of layer (arch.Arch.fast_step): Llama's (RMS norms; attention, then a SiLU-gated MLP) and Phi-2's (one
LayerNorm with a bias feeding attention and a GELU MLP in parallel; every projection and the output layer with a
bias; rotary on part of each head, as every kind may have).

The prefill, and every model `refuses(...)` names a reason for (a GPU, a sharded model, an activation its kind of
layer does not compute (ACTIVATIONS), q/k LayerNorms, a sliding window that bites, DoRA or an adapter on the embedding, an architecture whose row in arch.ARCHS
is not marked `fast_step`, remote code, a dtype oneDNN does not run here), stay transformers' forward. `refuses` is
the one place that decides; `choose` tells the reason once per model on a CPU, where the fast step is the fast
path.
"""

from __future__ import annotations

import warnings
import weakref

from thinkforge.arch import ARCHS, row_of
from thinkforge.engine import kernels


def _unwrapped(model):
    from thinkforge.models import is_adapter

    return model.get_base_model() if is_adapter(model) else model


def refuses(model, capacity: int, cache=None, lockstep: bool = False) -> str | None:
    """Why the fast step cannot run `model` for a cache of `capacity` positions (`cache`: the decode loop's,
    whose full-attention layers it writes; lockstep: the ranks of a sharded model decode together), or None when
    it can."""
    import torch

    if lockstep:
        return "the ranks of a sharded model decode in lockstep: each forward is a collective"
    if cache is not None:
        from thinkforge.engine.cache import reserved_layer

        if not all(type(x) is reserved_layer() for x in cache.layers):
            return "a cache layer is not a reserved full-attention layer (sliding or chunked attention)"
    base = _unwrapped(model)
    name = type(base).__name__
    config = base.config
    row = row_of(base)
    if row is None or not row.fast_step:
        return f"{name} is not one of {', '.join(r.model_class for r in ARCHS.values() if r.fast_step)}"
    if base.device.type != "cpu":
        return f"the model is on {base.device.type}, the fast step is for CPUs"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if not type(base).__module__.startswith("transformers.models."):
        return f"{type(base).__module__}.{name} is not transformers' own class (remote code)"
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return "the model is sharded (FSDP2): each forward is a collective"
    if why := _layers_refused(base):
        return why
    settings = config.to_dict()
    if settings.get("hidden_act") not in ACTIVATIONS[row.fast_step]:
        return (f"activation {settings.get('hidden_act')} (the fast step's {row.fast_step} layers have "
                f"{', '.join(ACTIVATIONS[row.fast_step])})")
    if settings.get("qk_layernorm"):
        return "query/key LayerNorms (qk_layernorm)"
    window = settings.get("sliding_window") if settings.get("use_sliding_window", True) else None
    if window and window < capacity:
        return f"a sliding window of {window} positions bites within {capacity}"
    if settings.get("pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    dtype = compute_dtype(model)
    if dtype not in (torch.float32, torch.bfloat16):
        return f"it computes in {str(dtype).removeprefix('torch.')} (the fast step runs float32 or bfloat16)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU's oneDNN has no bfloat16 kernels"
    return None


# The activations each kind of layer computes (arch.Arch.fast_step), by transformers' name: Phi-2's gelu_new is the
# tanh approximation of GELU (transformers' NewGELUActivation), as gelu_pytorch_tanh is.
ACTIVATIONS = {"llama": {"silu": None}, "phi": {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}}


def compute_dtype(model):
    """The dtype the model computes in: autocast's where it is on over float32 weights, else the parameters'."""
    import torch

    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled("cpu") and dtype == torch.float32:
        dtype = torch.get_autocast_dtype("cpu")
    return dtype


def _layers_refused(base) -> str | None:
    """Why the model's layers cannot be read into packed weights: a linear layer that is not a plain Linear
    (4-bit / 8-bit quantized, custom), LoRA on anything but a Linear (an embedding, trainable tokens), DoRA,
    LoRA biases, other variants; None when they can."""
    import torch
    from peft.tuners.lora import LoraLayer

    inner = base.model
    if type(inner.embed_tokens) is not torch.nn.Embedding:
        return f"the embedding is wrapped ({type(inner.embed_tokens).__name__}: an adapter or trainable tokens)"
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            if "Linear" in type(module).__name__ and type(module) is not torch.nn.Linear:
                return f"{name} is a {type(module).__name__} (quantized or custom), not a plain Linear"
            continue
        if type(module.get_base_layer()) is not torch.nn.Linear:
            return f"{name} has an adapter on a {type(module.get_base_layer()).__name__}"
        for adapter in module.active_adapters:
            if module.use_dora.get(adapter) or module.lora_bias.get(adapter) or module.lora_variant.get(adapter):
                return f"{name}'s adapter {adapter} is DoRA, has a bias or is another LoRA variant"
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


def _stacked(parts):
    """One (weight, bias) of Linears stacked by output rows (`_stacked_bias`)."""
    import torch

    return torch.cat([w for w, _ in parts]), _stacked_bias(parts)


def _stacked_bias(parts):
    """The biases of Linears ((weight, bias) each) stacked by output rows, or None where none has one; a part
    without a bias adds zeros (never drops the others' biases)."""
    import torch

    if all(b is None for _, b in parts):
        return None
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])


def key(model, dtype) -> tuple:
    """What the packed copy was made from: the dtype; every parameter's identity, storage and in-place version
    (an optimizer step, `load_state_dict`, `copy_` bump it; `p.data = ...` moves the storage); every adapter
    layer's state (disabled, active adapters, merged, scaling: `disable_adapter()`, `set_adapter`). A write
    through `p.data` in place (`p.data.copy_(...)`) bumps nothing and is not seen: torch records no change."""
    from peft.tuners.lora import LoraLayer

    params = tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())
    adapters = tuple((m.disable_adapters, tuple(m.active_adapters), m.merged, tuple(sorted(m.scaling.items())))
                     for m in model.modules() if isinstance(m, LoraLayer))
    return (dtype, params, adapters)


class FastStep:
    """`step(ids (B,), positions (B,), keys (B, K) bool, cache)` -> logits (B, V) float32, writing each layer's new
    key and value into the reserved cache layers (`engine.cache.reserved_layer()`) at their current length."""

    def __init__(self, model, dtype, plain: bool = False):
        import torch

        base = _unwrapped(model)
        config = base.config
        row = row_of(base)
        self.dtype = dtype
        self.key = key(model, dtype)
        # plain: float32 weights in their own layout for engine/kernels.py's matrix-vector products (a decode of
        # a few rows), else oneDNN's blocked layout
        self.plain = plain
        self.kernels = kernels.ops() if plain else None
        self.lists = None  # a Llama step's tensors for kernels.llama_layers, where it runs (below)
        inner = base.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = config.to_dict().get("head_dim") or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach()  # gathered as stored (fp32 under autocast), no copy
        self.head = self._product([_linear_weight(base.lm_head)])
        self.layers = []
        self.parallel = row.fast_step == "phi"
        with torch.no_grad():
            if self.parallel:  # Phi-2: LayerNorms with biases, one per layer, feeding attention and the MLP alike
                self.gelu = ACTIVATIONS["phi"][config.hidden_act]
                self.eps = config.layer_norm_eps
                self.norm = _norm(inner.final_layernorm)
                for layer in inner.layers:
                    attn, mlp = layer.self_attn, layer.mlp
                    qkv = self._product([_linear_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
                    self.layers.append((_norm(layer.input_layernorm), qkv, self._product([_linear_weight(attn.dense)]),
                                        self._product([_linear_weight(mlp.fc1)]), self._product([_linear_weight(mlp.fc2)])))
                return
            self.eps = config.rms_norm_eps
            self.norm = _norm(inner.norm)
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if row.fused_qkv:  # Phi-3: q/k/v and gate/up are one matrix each in the checkpoint already
                    qkv = [_linear_weight(attn.qkv_proj)]
                    gate_up = _linear_weight(mlp.gate_up_proj)
                    half = gate_up[0].shape[0] // 2
                    bias = gate_up[1]
                    gate_up = [(gate_up[0][:half], None if bias is None else bias[:half]),
                               (gate_up[0][half:], None if bias is None else bias[half:])]
                else:
                    qkv = [_linear_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
                    gate_up = [_linear_weight(mlp.gate_proj), _linear_weight(mlp.up_proj)]
                self.layers.append((
                    _norm(layer.input_layernorm), self._product(qkv), self._product([_linear_weight(attn.o_proj)]),
                    _norm(layer.post_attention_layernorm), self._product(gate_up),
                    self._product([_linear_weight(mlp.down_proj)]),
                ))
        # the layers' tensors as kernels.llama_layers takes them: the whole step's layers in one call (no MLP biases)
        if self.plain and all(gu[1] is None and down[1] is None for _, _, _, _, gu, down in self.layers):
            n1, qkv, o, n2, gu, down = zip(*self.layers, strict=True)
            parts = len(qkv[0][0])
            self.lists = ([n[0] for n in n1], [w for ws, _ in qkv for w in ws], parts, [b for _, b in qkv],
                          [ws[0] for ws, _ in o], [b for _, b in o], [n[0] for n in n2], [ws[0] for ws, _ in gu],
                          [ws[1] for ws, _ in gu], [ws[0] for ws, _ in down])

    def _product(self, parts):
        """One matrix product of Linears stacked by output rows ((weight, bias) each): plain, the weights as they are
        (a float32 parameter is read where it is: no copy) and their biases stacked; else one matrix packed for
        oneDNN."""
        import torch

        if self.plain:
            bias = _stacked_bias(parts)
            return ([w.detach().to(self.dtype).contiguous() for w, _ in parts],
                    None if bias is None else bias.detach().to(self.dtype).contiguous())
        weight, bias = _stacked(parts)
        weight = weight.detach().to(self.dtype).contiguous()
        bias = bias.detach().to(self.dtype) if bias is not None else None
        return torch.ops.mkldnn._reorder_linear_weight(weight, 32), bias

    def _linear(self, x, packed, residual=None, norm=None):
        """x @ weight.T + bias, plus `residual` (added as `residual + product`) where given; x the residual stream,
        normed first (`_normed`), where `norm` is given."""
        import torch

        weight, bias = packed
        if self.plain:
            if norm is not None and self.parallel:  # a LayerNorm: not fused
                x, norm = self._normed(x, norm), None
            return self.kernels.linear(x.contiguous(), weight, bias, residual, norm and norm[0], self.eps)
        if norm is not None:
            x = self._normed(x, norm)
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return y if residual is None else residual + y

    def _gated(self, h, norm, packed):
        """SiLU(gate) x up of a Llama MLP's stacked gate/up product, of the residual stream h's `norm`."""
        import torch.nn.functional as F

        if self.plain and packed[1] is None:
            return self.kernels.gated_silu(h.contiguous(), *packed[0], norm[0], self.eps)
        gate, up = self._linear(h, packed, norm=norm).chunk(2, dim=-1)
        return F.silu(gate) * up

    def __call__(self, ids, positions, keys, cache):
        import torch

        # inference mode: ~5% at one row (no version counters); the step's tensors never reach autograd
        with torch.autocast("cpu", enabled=False):  # the weights are in self.dtype already
            with torch.inference_mode():
                h = self._step(ids, positions, keys, cache)
            return self._linear(h, self.head, norm=self.norm).float()  # outside: the decode loop edits the logits in place

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

    def _normed(self, h, norm):
        """The norm of the float32 residual stream, in the weights' dtype for the matrix product it feeds."""
        import torch.nn.functional as F

        weight, bias = norm
        if self.parallel:
            return F.layer_norm(h, (h.shape[-1],), weight, bias, self.eps).to(self.dtype)
        return F.rms_norm(h, (h.shape[-1],), weight, self.eps).to(self.dtype)

    def _attend(self, qkv, rotation, layer, keys, hidden):
        """(B, heads x head_dim) attention output of one layer for its fused q/k/v projection (B, ...): q and k
        rotated (`rotation`: `_rotation`'s matrices, or the (cos, sin) they are made of), the new key and value
        written at the cache layer's length, every cached position attended but the left padding (`keys` (B, T) true
        where a position counts, None when all do; `hidden`, its negation (B, 1, 1, T))."""
        import torch
        import torch.nn.functional as F

        b = qkv.shape[0]
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        if self.plain and layer.k_buf.dtype == torch.float32 and layer.k_buf.is_contiguous():  # one op: kernels.py's
            at = layer.length
            o = self.kernels.attend(qkv, *rotation, layer.k_buf, layer.v_buf, at, keys, hq, hkv, self.scale)
            layer.length = at + 1
            layer.keys, layer.values = layer.k_buf[:, :, : at + 1], layer.v_buf[:, :, : at + 1]
            return o
        if isinstance(rotation, tuple):
            rotation = self._rotation(*rotation, d)
        qk = torch.bmm(qkv[:, : (hq + hkv) * d].view(b, hq + hkv, d).float(), rotation)  # query heads, then key heads
        at = layer.length
        layer.k_buf[:, :, at] = qk[:, hq:]
        layer.v_buf[:, :, at] = qkv[:, (hq + hkv) * d :].view(b, hkv, d)
        layer.length = at + 1
        keys_, values = layer.k_buf[:, :, : at + 1], layer.v_buf[:, :, : at + 1]
        layer.keys, layer.values = keys_, values
        q = qk[:, :hq].to(keys_.dtype).view(b, hkv, hq // hkv, d)  # query head i reads kv head i // group (repeat_kv)
        if hidden is None:  # every key counts: sdpa, a group's heads as its queries
            o = F.scaled_dot_product_attention(q, keys_, values, scale=self.scale)
        else:  # two batched products, softmax in float32 (CPU sdpa with a mask: ~1 ms per call at 32 rows)
            scores = torch.matmul(q, keys_.transpose(-1, -2)).float().mul_(self.scale).masked_fill_(hidden, float("-inf"))
            o = torch.matmul(scores.softmax(-1).to(values.dtype), values)  # (B, hkv, group, d)
        return o.reshape(b, hq * d).to(self.dtype)

    @staticmethod
    def _one_call(cache) -> bool:
        """Every cache layer can be written by kernels.py's attention at one position: float32, contiguous."""
        import torch

        at = cache.layers[0].length
        return all(x.length == at and x.k_buf.dtype == torch.float32 and x.k_buf.is_contiguous() and x.v_buf.is_contiguous()
                   for x in cache.layers)

    def _step(self, ids, positions, keys, cache):
        import torch.nn.functional as F

        b = ids.shape[0]
        # The residual stream stays float32 (as under autocast); the norms run on it and hand the matrix products
        # their input in the weights' dtype.
        h = F.embedding(ids, self.embed).float()  # (B, H)
        cos, sin = self.rotary(h, positions.view(b, 1))  # (B, 1, rotated), the model's own rope and its scaling
        rotation = cos.view(b, -1).float().contiguous(), sin.view(b, -1).float().contiguous()
        if not self.plain:
            rotation = self._rotation(*rotation, self.head_dim)  # (B, d, d)
        keys = None if bool(keys.all()) else keys.contiguous()
        hidden = None if keys is None else ~keys.view(b, 1, 1, -1)  # left padding
        if self.parallel:  # Phi-2: h + attention(x) + fc2(gelu(fc1(x))), x = one LayerNorm of h
            for (n, qkv_w, dense_w, fc1_w, fc2_w), layer in zip(self.layers, cache.layers, strict=True):
                x = self._normed(h, n)
                o = self._attend(self._linear(x, qkv_w), rotation, layer, keys, hidden)
                h = self._linear(F.gelu(self._linear(x, fc1_w), approximate=self.gelu), fc2_w, self._linear(o, dense_w, h))
        elif self.lists is not None and self._one_call(cache):  # Llama, the whole step in one kernels.py call
            at = cache.layers[0].length
            h = self.kernels.llama_layers(h, *self.lists, *rotation, [x.k_buf for x in cache.layers],
                                          [x.v_buf for x in cache.layers], at, keys, self.heads, self.kv_heads,
                                          self.scale, self.eps)
            for layer in cache.layers:
                layer.length = at + 1
                layer.keys, layer.values = layer.k_buf[:, :, : at + 1], layer.v_buf[:, :, : at + 1]
        else:  # Llama: h + attention(norm1(h)), then + down(silu(gate) * up) of norm2 of that
            for (n1, qkv_w, o_w, n2, gu_w, down_w), layer in zip(self.layers, cache.layers, strict=True):
                o = self._attend(self._linear(h, qkv_w, norm=n1), rotation, layer, keys, hidden)
                h = self._linear(o, o_w, h)
                h = self._linear(self._gated(h, n2, gu_w), down_w, h)
        return h  # the final norm: in the head's product


def _norm(module) -> tuple:
    """(weight, bias or None) of a norm layer, in float32: the residual stream's dtype. An RMS norm has no bias."""
    import torch

    bias = module.bias if isinstance(module, torch.nn.LayerNorm) else None
    return module.weight.detach().float(), None if bias is None else bias.detach().float()


_TOLD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the reason it was told


def choose(model, cache, capacity: int, held: dict, lockstep: bool = False) -> FastStep | None:
    """The fast step for this decode: `held`'s when it was made from the model's current weights in the dtype
    it computes in, a new one otherwise (outdated ones are dropped before the new one is packed); None where `refuses` names a reason, told once per model when it is on a CPU (where transformers'
    forward is the slow path). held: where the step is kept between calls. A float32 decode that starts with at most
    `kernels.ROWS` rows (the cache's) reads plain weights with engine/kernels.py's products; more rows, oneDNN's."""
    import torch

    why = refuses(model, capacity, cache, lockstep)
    if why is not None:
        if _unwrapped(model).device.type == "cpu" and model not in _TOLD:  # once: a reason may name a length
            _TOLD[model] = why
            warnings.warn(f"{type(_unwrapped(model)).__name__} decodes with transformers' forward, not the fast CPU "
                          f"step: {why}", stacklevel=3)
        return None
    dtype = compute_dtype(model)
    rows = cache.layers[0].k_buf.shape[0]  # after the prefill (refuses: every layer a reserved one)
    plain = dtype == torch.float32 and rows <= kernels.ROWS and kernels.ops() is not None
    now = key(model, dtype)
    for outdated in [s for s, step in held.items() if step.key != now]:  # dropped before anything is packed anew
        del held[outdated]
    slot = "plain" if plain else "packed"  # both kept: a server's batches cross kernels.ROWS back and forth
    if slot not in held:
        held[slot] = FastStep(model, dtype, plain)
    return held[slot]
