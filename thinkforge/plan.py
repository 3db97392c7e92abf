"""`thinkforge plan`: each stage's peak memory per device, predicted from the model's config before spending.

    thinkforge plan recipes/phi4-mini-reasoning.yaml --gpus 8 --gpu-memory 80GB

No weights are read: the parameter count comes from the architecture built on the meta device. Per device:
- model state: trained weights (fp32 master weights), their gradients (fp32) and AdamW's two moments (fp32),
  frozen weights (a LoRA base) in the dtype training loads them in (`train.loop.weights_dtype`: model.dtype,
  auto = bf16 on CUDA; 4-bit QLoRA: half a byte per quantized weight and its scales, the rest float32); FSDP2 divides all of
  it by the ranks (plus two gathered layers in flight), DDP keeps it whole; RL's frozen reference (full
  fine-tuning with beta > 0) is a second copy;
- activations: per token and layer, the tensors autograd keeps (about 8 D + 5 I + 3 kv elements; calibrated
  below); with gradient checkpointing only each layer's input plus one layer recomputed; no (T, T) mask
  (train/attention.py), except where the model keeps transformers' own (a sliding window shorter than the row,
  soft-capped scores, and not flash-attention);
- the output head: one chunk of fp32 logits (train/head.py) about twice over in the backward, never
  the (T, V) logits;
- RL: the rollout KV cache of the in-process backend, keys and values in the dtype it stores them in
  (`engine.cache.kv_dtype`; generation and backward do not overlap), or vLLM's share of the device when it is
  started here (`--gpu-memory-utilization`);
- the runtime: CUDA context, or on a CPU the interpreter with torch and transformers.
The largest micro-batch that fits comes from the per-row cost; a stage that does not fit says what to change.
Calibrated on this CPU against the measured peak of one step (BENCHMARKS.md, benchmarks/plan_vs_measured.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from thinkforge.errors import UserError

GB = 1024**3
ACT_D, ACT_I, ACT_KV = 8, 5, 3  # elements kept per token and layer, times D, I and the kv width
RUNTIME = {"cuda": 1.0 * GB, "cpu": 0.55 * GB}  # CUDA context; on a CPU the process with torch + transformers
HEAD_COPIES = 2  # chunk logits and their gradient alive at once in the head's backward (calibrated)
RL_PROMPT = 512  # prompt tokens assumed per RL sample
# Bytes per element of transformers' (T, T) attention mask where a model keeps it: the bool mask and the float
# bias the kernel makes of it (measured on this CPU: DPO at 16K tokens through transformers' mask, BENCHMARKS.md)
MASK_BYTES = {"cpu": 8, "cuda": 3}
# A 4-bit weight (models.four_bit_config): half a byte, its block of 64's scale double-quantized to one byte, and
# a float32 scale of those per 256 blocks (bitsandbytes' quant_state; 1 KB of code tables per layer left out).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Shape:
    """What memory depends on, from the model's config."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # kv heads x head dim
    vocab: int
    tied: bool
    lora_params: int  # the adapter's parameters for the recipe's LoRA targets (0 without LoRA)
    quantizable: int  # weights of the linear layers 4-bit loading quantizes (all but the output layer)

    @property
    def layer_params(self) -> int:
        return self.params // max(self.layers, 1)


def shape_of(config, lora=None) -> Shape:
    """The model's sizes, its parameters counted on the meta device (no weights are made)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = text.to_dict().get("head_dim") or text.hidden_size // heads
    kv = (text.to_dict().get("num_key_value_heads") or heads) * head_dim
    output = model.get_output_embeddings()
    quantizable = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output)
    lora_params = 0
    if lora is not None and lora.enabled:
        from thinkforge.models import default_lora_targets

        targets = set(lora.target_modules or default_lora_targets(model))
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                lora_params += lora.r * (module.in_features + module.out_features)
    return Shape(sum(p.numel() for p in model.parameters()), text.num_hidden_layers, text.hidden_size,
                 text.intermediate_size, kv, text.vocab_size, bool(text.to_dict().get("tie_word_embeddings")), lora_params,
                 quantizable)


@dataclass(frozen=True, kw_only=True)
class Setting:
    """How one stage runs: its tokens per row, rows per micro-batch and what they are."""

    stage: str
    row_tokens: int  # tokens of one row (a sequence, a packed row, prompt + completion)
    rows_per_item: int  # rows of one micro-batch item (DPO: a pair is 2 rows; RL: 1)
    batch: int  # items per micro-batch
    checkpointing: bool
    masks: bool  # transformers' (T, T) mask per row (a biting sliding window or soft-capped scores)
    act_bytes: int  # 2 under bf16 autocast, else 4
    head_chunk: int | None
    reference: bool  # RL: a frozen full copy of the model
    kv_cache: int  # RL in-process rollouts: sequences generated together (0: none / a server)
    kv_tokens: int
    vllm_share: float  # share of the device vLLM takes when started here
    weights: str  # the dtype training loads the weights in (train.loop.weights_dtype)
    in_4bit: bool  # model.load_in_4bit (QLoRA)
    stream_bytes: int  # one element of the residual stream: the embedding's dtype (fp32 master weights: 4)
    kv_bytes: int  # one key or value element in the rollout KV cache (engine.cache.kv_dtype)


def frozen_bytes(shape: Shape, s: Setting) -> float:
    """The frozen weights of a LoRA run: the base in s.weights; in 4 bits, NF4_BYTES per quantized weight and
    float32 for the rest (embeddings, norms, the output layer: PEFT's prepare_model_for_kbit_training casts
    them up). 0 without LoRA: every weight trains."""
    import torch

    if not shape.lora_params:
        return 0.0
    if s.in_4bit:
        return shape.quantizable * NF4_BYTES + (shape.params - shape.quantizable) * 4
    return shape.params * getattr(torch, s.weights).itemsize


def predict(shape: Shape, s: Setting, gpus: int, strategy: str, device: str, batch: int | None = None) -> dict:
    """Bytes per device by component, for `batch` items per micro-batch (default s.batch). The rollout KV cache
    and the training pass are not alive together: the peak is `peak(parts)`."""
    from thinkforge.train.head import chunk_tokens

    b = s.batch if batch is None else batch
    shard = gpus if strategy == "fsdp2" and gpus > 1 else 1
    trained = shape.lora_params or shape.params
    state = trained * (4 + 4 + 8)  # fp32 weights, gradients, AdamW moments
    frozen = frozen_bytes(shape, s)
    # FSDP2 (no mixed-precision policy): two fp32 layers gathered in flight, and the root's embedding and output
    # layer unsharded from forward to backward (weights and gradients); AdamW's foreach step on CUDA: one
    # temporary per trained parameter
    root = shape.hidden * shape.vocab * (1 if shape.tied else 2) * (4 + 4)
    gathered = 2 * shape.layer_params * 4 + root if shard > 1 else 0
    foreach = trained * 4 / shard if device == "cuda" else 0
    out = {"model state": (state + frozen) / shard + gathered + foreach,
           "reference": shape.params * 4 / shard if s.reference and not shape.lora_params else 0.0}
    tokens = b * s.rows_per_item * s.row_tokens
    per_layer = ACT_D * shape.hidden + ACT_I * shape.intermediate + ACT_KV * shape.kv_width
    if s.checkpointing:  # each layer's input is the residual stream (in the embedding's dtype), one layer recomputed
        acts = tokens * (s.stream_bytes * shape.layers * shape.hidden + s.act_bytes * per_layer)
    else:
        acts = tokens * s.act_bytes * shape.layers * per_layer
    acts += tokens * s.act_bytes * 2 * shape.hidden  # embeddings, final norm
    acts += (b * s.rows_per_item * s.row_tokens**2 * MASK_BYTES[device]) if s.masks else 0
    out["activations"] = acts
    out["output head"] = HEAD_COPIES * chunk_tokens(shape.vocab, s.head_chunk) * shape.vocab * 4 + tokens * shape.hidden * 4
    out["rollout KV cache"] = s.kv_cache * s.kv_tokens * shape.layers * 2 * shape.kv_width * s.kv_bytes
    out["runtime"] = RUNTIME[device]
    return out


def peak(parts: dict) -> float:
    """The model state and the runtime, plus the larger of the training pass and the rollout KV cache."""
    static = parts["model state"] + parts["reference"] + parts["runtime"]
    return static + max(parts["activations"] + parts["output head"], parts["rollout KV cache"])


def settings_for(recipe, stage: str, device: str, config=None) -> Setting:
    """How `stage` runs: from the recipe, and from the model's config whether its attention keeps transformers'
    (T, T) masks (a sliding window shorter than the row, soft-capped scores: train/attention.py). The dtypes
    are the ones the code takes: the weights' from `train.loop.weights_dtype`, the KV cache's from
    `engine.cache.kv_dtype` (after 4-bit loading the unquantized weights, the embedding first, are float32)."""
    import torch

    from thinkforge.engine.cache import kv_dtype
    from thinkforge.train.loop import uses_bf16, weights_dtype

    cfg = getattr(recipe, stage)
    m = recipe.model
    bf16 = uses_bf16(device, cfg.mixed_precision)
    text = config.get_text_config().to_dict() if config is not None else {}
    weights = weights_dtype(recipe, device)
    stream = torch.float32 if m.load_in_4bit else getattr(torch, weights)  # the embedding's: the first weight
    # bitsandbytes' 4-bit layers hand back their input's dtype, the float32 stream, even under autocast
    common = {"stage": stage, "checkpointing": m.gradient_checkpointing, "act_bytes": 2 if bf16 and not m.load_in_4bit else 4,
              "head_chunk": cfg.head_chunk, "weights": weights, "in_4bit": m.load_in_4bit, "stream_bytes": stream.itemsize,
              "kv_bytes": kv_dtype(stream, torch.bfloat16 if bf16 else None).itemsize}
    none = {"reference": False, "kv_cache": 0, "kv_tokens": 0, "vllm_share": 0.0}  # no reference, no rollouts

    def masked(row: int, padded: bool) -> bool:  # everything else attends without a mask (train/attention.py)
        window = text.get("sliding_window")
        return (m.attn_implementation != "flash_attention_2" and padded
                and bool(text.get("attn_logit_softcapping") or (window and window < row)))

    if stage in ("midtrain", "sft"):
        return Setting(row_tokens=cfg.max_len, rows_per_item=1, batch=cfg.batch_size,
                       masks=masked(cfg.max_len, cfg.packing or cfg.batch_size > 1), **none, **common)
    if stage == "dpo":
        return Setting(row_tokens=cfg.max_len, rows_per_item=2, batch=cfg.batch_size, masks=masked(cfg.max_len, True),
                       **none, **common)
    row = RL_PROMPT + cfg.max_new_tokens
    in_process = recipe.rollout.backend == "hf"
    share = 0.0
    if recipe.rollout.backend == "vllm" and recipe.rollout.base_url is None:
        found = re.search(r"--gpu-memory-utilization[ =]([0-9.]+)", recipe.rollout.vllm_args)
        share = float(found.group(1)) if found else 0.9
    return Setting(row_tokens=row, rows_per_item=1, batch=cfg.micro_batch, masks=masked(row, True), reference=cfg.beta > 0,
                   kv_cache=cfg.gen_batch if in_process else 0, kv_tokens=row, vllm_share=share, **common)


def plan(recipe, gpus: int, memory: float, strategy: str = "auto", config=None) -> list[dict]:
    """One row per training stage of the recipe: predicted peak, the largest micro-batch that fits, advice."""
    from thinkforge.config import _Stage
    from thinkforge.train.loop import check_trainable

    check_trainable(recipe)  # a stage that cannot run has no memory to plan
    device = "cuda" if gpus > 0 else "cpu"
    config = config or _config(recipe)
    shape = shape_of(config, recipe.lora)
    rows = []
    for stage in [s for s in recipe.pipeline.stages if isinstance(getattr(recipe, s), _Stage)]:
        strat = strategy if strategy != "auto" else ("fsdp2" if gpus > 1 else "ddp")
        s = settings_for(recipe, stage, device, config)
        budget = memory * (1 - s.vllm_share)
        parts = predict(shape, s, max(gpus, 1), strat, device)
        zero = predict(shape, s, max(gpus, 1), strat, device, batch=0)
        one = predict(shape, s, max(gpus, 1), strat, device, batch=1)
        fixed = zero["model state"] + zero["reference"] + zero["runtime"] + zero["activations"] + zero["output head"]
        per_item = one["activations"] + one["output head"] - zero["activations"] - zero["output head"]
        fits = max(0, math.floor((budget - fixed) / per_item))
        per_sequence = parts["rollout KV cache"] / max(s.kv_cache, 1)
        gen_fits = math.floor((budget - fixed + zero["activations"] + zero["output head"]) / per_sequence) if per_sequence else None
        rows.append({"stage": stage, "strategy": strat, "tokens": s.row_tokens, "batch": s.batch, "peak": peak(parts),
                     "budget": budget, "parts": parts, "largest_batch": fits, "largest_gen_batch": gen_fits,
                     "advice": _advice(recipe, stage, s, strat, fits=(fits, gen_fits), fixed=fixed, budget=budget,
                                           per_item=per_item)})
    return rows


def _advice(recipe, stage: str, s: Setting, strategy: str, *, fits: tuple, fixed: float, budget: float,
            per_item: float) -> str:
    train, gen = fits
    if train >= s.batch and (gen is None or gen >= s.kv_cache):
        return "fits"
    tips = []
    if gen is not None and gen < s.kv_cache:
        tips.append(f"rollouts: rl.gen_batch={max(gen, 1)} (the in-process KV cache of {s.kv_cache} x {s.kv_tokens} tokens "
                    f"does not fit) or rollout.backend=vllm")
    length = "rl.max_new_tokens" if stage == "rl" else f"{stage}.max_len"
    if 1 <= train < s.batch and stage == "rl":
        tips.append(f"rl.micro_batch={train} (rl.prompts_per_step stays the batch)")
    elif 1 <= train < s.batch:
        cfg = getattr(recipe, stage)
        b = max(d for d in range(1, train + 1) if s.batch % d == 0)  # a divisor: the same batch per step
        tips.append(f"{stage}.batch_size={b} with {stage}.grad_accum={cfg.grad_accum * s.batch // b} (the same "
                    f"{s.batch * cfg.grad_accum} per step)")
    if train < s.batch and s.masks and s.row_tokens**2 * s.rows_per_item > per_item / 2:
        tips.append(f"a shorter {stage}.max_len or model.attn_implementation=flash_attention_2 (CUDA): a {s.row_tokens}-token "
                    f"row's (T, T) attention mask alone is {s.row_tokens**2 / GB:.1f} GB")
    if train < s.batch and not s.checkpointing:
        tips.append("model.gradient_checkpointing=true")
    if fixed > budget and strategy != "fsdp2":
        tips.append("FSDP2 over more GPUs (recipes/accelerate/fsdp2.yaml) to shard the model state")
    if train < 1:
        tips.append(f"a shorter {length}")
    if (fixed > budget or train < 1) and not recipe.lora.enabled:
        tips.append("lora.enabled=true (only the adapter trains: no fp32 master copy, gradients or AdamW state of the base)")
    if s.vllm_share and train < s.batch:
        tips.append("a smaller vLLM share (--gpu-memory-utilization in rollout.vllm_args) or a vLLM server elsewhere (rollout.base_url)")
    return "does not fit: " + "; ".join(tips or [f"a shorter {length}"])


def _config(recipe):
    from transformers import AutoConfig

    source = recipe.model.name_or_path
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of {source} ({str(e).splitlines()[0][:160]}); pass a local model folder "
                        f"(`thinkforge plan RECIPE model.name_or_path=FOLDER`) or make the hub reachable") from None


def machine_memory() -> float:
    """This machine's memory, or the address-space limit the process runs under where that is lower."""
    import os
    import resource

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return min(total, limit) if limit != resource.RLIM_INFINITY else total


def parse_memory(text: str) -> float:
    """'80GB', '80 GiB', '24G' -> bytes (binary gigabytes, as GPUs are sold)."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([GgMmTt])i?[Bb]?\s*", text)
    if not found:
        raise UserError(f"--gpu-memory {text!r} is not a size; write e.g. 80GB")
    return float(found.group(1)) * {"m": 1024**2, "g": GB, "t": 1024**4}[found.group(2).lower()]


def render(rows: list[dict], gpus: int, memory: float) -> str:
    where = f"{gpus} GPU(s) of {memory / GB:.0f} GB" if gpus else f"this machine ({memory / GB:.0f} GB)"
    lines = [f"Peak memory per device, {where}:", "",
             "| stage | strategy | tokens/row | micro-batch | model state | reference | activations | output head | "
             "KV cache | runtime | peak | fits | largest micro-batch |", "|" + "---|" * 13]
    for r in rows:
        p = {k: f"{v / GB:.1f}" for k, v in r["parts"].items()}
        lines.append(f"| {r['stage']} | {r['strategy']} | {r['tokens']} | {r['batch']} | {p['model state']} | {p['reference']} | "
                     f"{p['activations']} | {p['output head']} | {p['rollout KV cache']} | {p['runtime']} | "
                     f"{r['peak'] / GB:.1f} GB | {'yes' if r['advice'] == 'fits' else 'no'} | {r['largest_batch']} |")
    lines.append("")
    lines += [f"- {r['stage']}: {r['advice']}" for r in rows if r["advice"] != "fits"]
    return "\n".join(lines)
