"""The model architectures thinkforge knows, one row each, keyed by transformers' `model_type`.

A row says what `init-model` makes of it (tiny.py), which modules LoRA adapts by default (models.py), whether
the fast CPU decode step runs it (engine/fast.py) and how `thinkforge export` writes it for llama.cpp
(export.py); `init.arch` (config.py) and `init-model --arch` (cli.py) offer the rows. Every row makes a tiny
model, and the tests parametrize over the rows (tests/test_models.py: init, load, LoRA; tests/test_fast_step.py:
the fast step's logits for every row marked `fast_step`; tests/test_export.py: llama.cpp's logits for every row
with a `gguf` name), so a row is tested as it is added; tests/test_layout.py checks that they read the table.

A new architecture whose layers the fast step and the exporter already compute (a Llama-style decoder: RMS
norms, rotary q/k, SiLU-gated MLP, separate or fused q/k/v) is one row here and its key in config.InitConfig's
`arch` Literal: two source files. One with another part in its layers (Qwen3's per-head q/k norms, which the
fast step does not compute yet) also changes engine/fast.py or export.py.

This module stays light (no torch, no transformers): classes are named, and looked up where they are used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Arch:
    model_class: str  # transformers' causal-LM class (the fast step and the exporter check it)
    config_class: str  # transformers' config class of init-model's tiny model
    tiny: Callable  # InitConfig -> the tiny config's own settings, over the sizes every architecture shares
    lora_targets: tuple[str, ...]  # the modules LoRA adapts when lora.target_modules is unset
    gguf: str | None = None  # llama.cpp's architecture in an exported file; None: export refuses it
    pairwise_rope: bool = False  # llama.cpp's graph for `gguf` rotates adjacent pairs: q/k rows are reordered
    # the fast CPU decode step runs it, with layers of this kind (engine/fast.py): "llama" = RMS norms, attention then
    # a SiLU-gated MLP; "phi" = one LayerNorm (with bias) feeding attention and a GELU MLP in parallel, biases
    fast_step: str | None = None
    fused_qkv: bool = False  # q/k/v and gate/up are one matrix each in the checkpoint


def _half_kv_heads(size) -> int:
    """The tiny model's key/value heads where the architecture groups queries: half the query heads."""
    return max(1, size.heads // 2)


_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

ARCHS: dict[str, Arch] = {
    "phi": Arch(model_class="PhiForCausalLM", config_class="PhiConfig",
                tiny=lambda size: dict(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0),
                lora_targets=("q_proj", "k_proj", "v_proj", "dense"), gguf="phi2", fast_step="phi"),  # the Infused Phi-2 card's
    "phi3": Arch(model_class="Phi3ForCausalLM", config_class="Phi3Config",  # Phi-3 and Phi-4-mini
                 tiny=lambda size: dict(num_key_value_heads=size.heads, tie_word_embeddings=False),
                 lora_targets=("qkv_proj", "o_proj"), gguf="phi3", fast_step="llama", fused_qkv=True),
    "llama": Arch(model_class="LlamaForCausalLM", config_class="LlamaConfig",
                  tiny=lambda size: dict(num_key_value_heads=_half_kv_heads(size)),
                  lora_targets=_QKVO, gguf="llama", pairwise_rope=True, fast_step="llama"),
    "mistral": Arch(model_class="MistralForCausalLM", config_class="MistralConfig",
                    tiny=lambda size: dict(num_key_value_heads=_half_kv_heads(size), sliding_window=None),
                    lora_targets=_QKVO, gguf="llama", pairwise_rope=True, fast_step="llama"),
    "qwen2": Arch(model_class="Qwen2ForCausalLM", config_class="Qwen2Config",
                  tiny=lambda size: dict(num_key_value_heads=_half_kv_heads(size), tie_word_embeddings=True),
                  lora_targets=_QKVO, gguf="qwen2", fast_step="llama"),
    "qwen3": Arch(model_class="Qwen3ForCausalLM", config_class="Qwen3Config",  # heads wider than hidden/heads, as the real ones (0.6B: 16 x 128 > 1,024)
                  tiny=lambda size: dict(num_key_value_heads=_half_kv_heads(size), head_dim=2 * size.hidden // size.heads,
                                         tie_word_embeddings=True),
                  lora_targets=_QKVO, gguf="qwen3"),
}


def row_of(model) -> Arch | None:
    """The row of `model` (a transformers model, not a PEFT wrapper) when both its config's model_type and its
    class are the row's (a classifier head over a known model_type has none), else None."""
    row = ARCHS.get(model.config.model_type)
    return row if row is not None and type(model).__name__ == row.model_class else None
