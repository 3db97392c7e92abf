"""Compiled training where it pays: `model.compile` = off (the default) | on | auto.

- Regional: each decoder layer's forward is compiled (torch.compile, inductor), not the whole model. The layers
  run one code object, so one graph serves all of them, and it is compiled with dynamic shapes: rows of any
  length and count reuse it (a handful of graphs a stage, not one per length; a shape dynamo specialises, such as
  a single row, adds one). Attention (train/attention.py, whose layout depends on the data) runs eagerly between
  the compiled regions, and so does a pass over a KV cache (RL's and DPO's prompt pass).
- Only where gradients are taken: generation and the no-grad log-prob passes (reference, old policy) run the
  eager layers. The decode loop's reserved cache cannot be compiled (AOTAutograd rejects inputs that are views
  of one buffer), and a no-grad graph would be a second compile. So the training pass and a reference pass
  round differently in low precision: step-1 KL is ~1e-3, not exactly 0, with compile on.
- auto compiles when the stage's planned tokens amortise the compile time:

      planned tokens x (1 / eager rate - 1 / compiled rate) > compile seconds

  from the figures measured for the kind of pass on the device kind (`MEASURED`, by benchmarks/compile_train.py).
  A pair without measurements does not compile on auto (on: always). On an AMX CPU under bf16 autocast: SFT 1.19x after 15 s
  (from ~38K planned tokens), DPO 1.06x after 29 s (~143K), RL 1.09x (~102K). The figures are one model's
  (SmolLM2-135M, LoRA, bf16 autocast): a model that runs at another rate breaks even elsewhere (a tiny fp32 model:
  ~1M tokens), which is why model.compile defaults to off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measured:
    """One device kind's compile figures (benchmarks/compile_train.py, SmolLM2-135M, LoRA, bf16 autocast)."""

    compile_seconds: float  # the first step's extra time
    eager_rate: float  # tokens/s
    compiled_rate: float  # tokens/s

    def break_even(self) -> float:
        """Planned tokens above which compiling saves time."""
        saved = 1 / self.eager_rate - 1 / self.compiled_rate  # seconds per token
        return float("inf") if saved <= 0 else self.compile_seconds / saved


RECOMPILE_LIMIT = 32
CACHE_ARGUMENTS = ("past_key_values", "cache")  # the KV cache's name in a layer's forward (transformers 5.24 renamed it)
# (device kind, precision, pass kind) -> figures; benchmarks/compile_train.py on SmolLM2-135M (BENCHMARKS.md, 2026-12-07, second
# run). The script compiles SFT's pass, then DPO's, then GRPO's in one process: RL's compile seconds are DPO's first
# call (the same graphs: the packed completions, the prompt pass eager), not GRPO's 8.3 s after it.
# Measured under bf16 autocast (an AMX CPU): a pass that computes fp32 has no figures (auto does not compile).
MEASURED = {("cpu", "bf16", "sft"): Measured(compile_seconds=14.7, eager_rate=420.4, compiled_rate=501.5),
            ("cpu", "bf16", "dpo"): Measured(compile_seconds=29.0, eager_rate=268.3, compiled_rate=283.7),
            ("cpu", "bf16", "rl"): Measured(compile_seconds=29.0, eager_rate=280.5, compiled_rate=304.8)}


def decide(setting: str, device: str, kind: str, planned_tokens: float, precision: str) -> tuple[bool, str]:
    """(compile, the reason in words) for a stage whose passes are of `kind` planning `planned_tokens` on `device`,
    computing in `precision` ("bf16" under autocast, else "fp32")."""
    if setting == "off":
        return False, "model.compile=off"
    if setting == "on":
        return True, "model.compile=on"
    where = device.split(":")[0]
    figures = MEASURED.get((where, precision, kind))
    if figures is None:
        return False, f"auto: no compile figures measured for {precision} {kind} passes on {where}"
    speed = figures.compiled_rate / figures.eager_rate
    need = figures.break_even()
    if need == float("inf"):
        return False, f"auto: compiled {kind} passes ran at {speed:.2f}x eager on {where}: compiling never repays"
    verdict = planned_tokens > need
    return verdict, (f"auto: {planned_tokens:,.0f} planned tokens {'>' if verdict else '<='} {need:,.0f}, the break-even "
                     f"of {figures.compile_seconds:.0f} s of compiling at {speed:.2f}x on {where}")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' GradientCheckpointingLayer subclasses, one per block)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model, backend: str = "inductor") -> int:
    """Compile each decoder layer's forward for the passes that take gradients (see the module docstring);
    -> how many layers. Attention stays eager: train/attention.py's function is registered un-traced."""
    from transformers import AttentionInterface

    from thinkforge.train import attention

    layers = decoder_layers(model)
    # Graphs a stage makes: the first layer (its input needs no gradient under an adapter) and the rest, a single
    # row (packed completions) and several, and their resumes after the eager attention; dynamo's default stops at
    # 8 and runs the rest eagerly. A pass over a KV cache (a prompt's, before its completions) runs eager: dynamo
    # guards on each layer's cache entry, one graph per layer.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    AttentionInterface.register(attention.NAME, torch.compiler.disable(attention.document_attention))
    for layer in layers:
        if getattr(layer, "thinkforge_compiled", False):
            continue
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True, backend=backend)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            cached = any(kwargs.get(k) is not None for k in CACHE_ARGUMENTS)  # a prompt pass: one graph per layer
            return (_compiled if torch.is_grad_enabled() and not cached else _eager)(*args, **kwargs)

        layer.forward = forward
        layer.thinkforge_compiled = True
    return len(layers)


def setup(model, setting: str, device: str, kind: str, planned_tokens: float, precision: str) -> dict:
    """Compile the model's layers when `decide` says so; -> the start row's entries (compile, compile_rule).
    What cannot compile is refused under on and declined, with its reason, under auto: gradient checkpointing
    (dynamo makes no graph of transformers' checkpointing wrapper, torch 2.13; the recipe refuses on with it), a
    model without transformers' decoder layers, a CPU without a C++ compiler (inductor writes C++)."""
    from thinkforge.errors import UserError
    from thinkforge.train.forward import uses_checkpointing

    if setting == "off":
        return {"compile": False, "compile_rule": "model.compile=off"}
    why = cannot_compile(model, device)
    if why:
        if setting == "on":
            raise UserError(f"model.compile=on: {why}; set model.compile=off")
        return {"compile": False, "compile_rule": f"auto: {why}"}
    if setting == "auto" and uses_checkpointing(model):
        return {"compile": False, "compile_rule": "auto: not with gradient checkpointing"}
    on, rule = decide(setting, device, kind, planned_tokens, precision)
    if on:
        compile_layers(model)
        rule += ("; the no-grad passes (reference, old log-probs) run eager: step-1 KL and ratio differ from 0 and 1 by "
                 f"{precision} rounding")
    return {"compile": on, "compile_rule": rule}


def cannot_compile(model, device: str) -> str | None:
    """Why this model cannot be compiled here, or None."""
    import shutil

    if not decoder_layers(model):
        return f"{type(model).__name__} has no transformers decoder layers to compile"
    if device.startswith("cpu") and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler on PATH (torch.compile's inductor builds C++ on a CPU); install g++"
    return None
