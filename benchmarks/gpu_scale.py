"""The recipe's steps at their own scale on one GPU: random-init models of Phi-4-mini and Phi-2 shapes built
from their configs (benchmarks/configs/, no downloads), through thinkforge's own step functions.

    python benchmarks/gpu_scale.py                 # one GPU (torch, transformers, peft, accelerate only)
    python benchmarks/gpu_scale.py --tiny          # the same code on tiny shapes on a CPU (make test runs it)

Three measurements, each a fresh model (fp32 master weights, bf16 autocast on CUDA, AdamW):
- sft: Phi-4-mini, full fine-tuning, gradient checkpointing, one packed row of 16,384 tokens
  (`sft.forward_loss`, the chunked output head), backward, optimizer step;
- dpo: Phi-4-mini, full fine-tuning, gradient checkpointing, one pair of 8,192-token sequences sharing a
  512-token prompt (`dpo.pair_logprobs`), the DPO loss, backward, step;
- grpo_lora: Phi-2 in bf16 with LoRA r 16 / alpha 32 on q, k, v, dense (the Infused Phi-2 card), 4 prompts x
  G 8 samples of exactly 384 new tokens through the in-process decode loop, then the GRPO loss pass
  (`forward.forward_logp`), backward, step.
Seconds (after one warm-up step for sft and dpo), peak allocated memory (torch.cuda.max_memory_allocated) and
MFU: model FLOPs (6 x parameters x tokens + 6 x layers x hidden x tokens^2 for causal attention; generation
2 x parameters per new token; a frozen LoRA base 4 x parameters per trained token; the recompute of
checkpointing not counted) over seconds, against 989 TFLOP/s, an H100/H200's dense bf16 peak. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONFIGS = Path(__file__).resolve().parent / "configs"
PEAK_FLOPS = 989e12


def model_of(name: str, a, **lora):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIGS / name)
    if a.tiny:  # the same architecture, CPU-sized
        config.update({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2 if config.model_type == "phi3" else 4, "vocab_size": 1024,
                       "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if lora else torch.float32  # LoRA: a bf16 base; full fine-tuning: fp32 master weights
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(a.device)
    if lora:
        from thinkforge.models import add_lora

        model = add_lora(model, 16, 32, 0.05, ["q_proj", "k_proj", "v_proj", "dense"])
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    elif not a.tiny:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _ids(n, vocab, g):
    import torch

    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _timed(a, fn):
    import torch

    if a.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = fn()
    if a.device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None
    return time.time() - t0, peak, out


def _autocast(a):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if a.device == "cuda" else torch.autocast("cpu", enabled=False)


def sft_step(a) -> dict:
    import torch

    from thinkforge.data.packing import Example, collate_packed
    from thinkforge.losses import normaliser
    from thinkforge.train import sft
    from thinkforge.train.attention import use_document_attention

    model = model_of("phi-4-mini", a)
    use_document_attention(model)  # as sft.main runs packed rows: no (T, T) mask
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    T, g = a.sft_tokens, torch.Generator().manual_seed(0)
    doc = min(4096, T)  # documents of 4K tokens (256 of prompt), packed into one row
    docs = [Example(tuple(_ids(doc // 16, model.config.vocab_size, g)), tuple(_ids(doc - doc // 16, model.config.vocab_size, g)))
            for _ in range(T // doc)]
    x, labels, pos = collate_packed([docs], T, 0)
    batch = {"input_ids": x.to(a.device), "labels": labels.to(a.device), "position_ids": pos.to(a.device)}
    norm = normaliser((labels != -100).float(), "token")

    def step():
        with _autocast(a):
            loss = sft.forward_loss(model, batch, norm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    seconds, peak, _ = _timed(a, step)
    n, cfg = sum(p.numel() for p in model.parameters()), model.config
    flops = 6 * n * T + 6 * cfg.num_hidden_layers * cfg.hidden_size * doc * T  # causal attention within documents
    return {"seconds": seconds, "peak_gb": peak, "tokens": T, "flops": flops, "params": n}


def dpo_step(a) -> dict:
    import torch

    from thinkforge.data.packing import Example
    from thinkforge.losses import dpo_loss
    from thinkforge.train import dpo

    model = model_of("phi-4-mini", a)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-7)
    T, g, v = a.dpo_tokens, torch.Generator().manual_seed(0), model.config.vocab_size
    p = min(512, T // 4)
    prompt = tuple(_ids(p, v, g))
    pair = (Example(prompt, tuple(_ids(T - p, v, g))), Example(prompt, tuple(_ids(T - p, v, g))))

    def step():
        with _autocast(a):
            chosen, rejected = dpo.pair_logprobs(model, [pair], 0)
        loss = dpo_loss(chosen.float(), rejected.float(), chosen.detach().float() - 0.1, rejected.detach().float(), 0.1,
                        "sigmoid")[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    seconds, peak, _ = _timed(a, step)
    n, cfg = sum(p.numel() for p in model.parameters()), model.config
    flops = 6 * n * 2 * T + 6 * cfg.num_hidden_layers * cfg.hidden_size * 2 * T * T
    return {"seconds": seconds, "peak_gb": peak, "tokens": 2 * T, "flops": flops, "params": n}


def grpo_lora_step(a) -> dict:
    import torch

    from thinkforge.losses import normaliser, policy_loss
    from thinkforge.rollout.hf import HFGenerator
    from thinkforge.rollout.types import Rollout, SamplingParams
    from thinkforge.tiny import build_tokenizer
    from thinkforge.train.forward import forward_logp

    model = model_of("phi-2", a, lora=True)
    tok = build_tokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.min_new_tokens = a.new_tokens  # every sample exactly new_tokens long
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    prompts = [f"Question {i}: what is {i} + {2 * i}? Think step by step." for i in range(a.prompts)]
    G = a.group

    def step():
        model.eval()
        with _autocast(a):
            comps = HFGenerator(model, tok, batch_size=len(prompts) * G).generate(
                prompts, G, SamplingParams(a.new_tokens, 1.0, 1.0, 0, 0))
        model.train()
        ro = Rollout.build([tok(p, add_special_tokens=False).input_ids for p in prompts], [list(c.token_ids) for c in comps],
                           [i // G for i in range(len(comps))], 0, rewards=[float(i % 2) for i in range(len(comps))])
        mask = ro.completion_mask.float()
        adv = (torch.tensor([float(i % 2) - 0.5 for i in range(len(comps))])[:, None] * mask).to(a.device)
        for i in range(0, len(comps), 8):  # micro-batches of 8
            rows = slice(i, i + 8)
            with _autocast(a):
                logp, _, _ = forward_logp(model, ro, rows)
            m = mask[rows].to(a.device)
            loss, _ = policy_loss(logp, logp.detach(), adv[rows], m, normaliser(mask, "token"), kind="ppo_clip",
                                  clip=(0.2, 0.28))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ro

    seconds, peak, ro = _timed(a, step)
    n = sum(p.numel() for p in model.parameters())
    new = int(ro.completion_mask.sum())  # generated tokens, as sampled
    # generation (2N a token) + the loss pass over the frozen base: forward 2N and input gradients 2N a token
    # (no weight gradients but the adapter's), the prompt once per group
    flops = 2 * n * new + 4 * n * (new + ro.prompt_mask.sum().item())
    return {"seconds": seconds, "peak_gb": peak, "tokens": new, "flops": flops, "params": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the test in make test)")
    p.add_argument("--only", nargs="+", default=["sft", "dpo", "grpo_lora"])
    a = p.parse_args()
    import torch

    a.device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    a.sft_tokens, a.dpo_tokens = (512, 256) if a.tiny else (16384, 8192)
    a.new_tokens, a.prompts, a.group = (16, 2, 4) if a.tiny else (384, 4, 8)
    steps = {"sft": sft_step, "dpo": dpo_step, "grpo_lora": grpo_lora_step}
    res = {}
    for name in a.only:
        r = steps[name](a)
        r["mfu"] = r["flops"] / r["seconds"] / PEAK_FLOPS
        res[name] = r
        if a.device == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(f"device: {device}; MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s dense bf16\n")
    print("| step | parameters | tokens | seconds | peak GB | MFU |\n|---|---|---|---|---|---|")
    for name, r in res.items():
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        print(f"| {name} | {r['params'] / 1e9:.2f}B | {r['tokens']} | {r['seconds']:.2f} | {peak} | {100 * r['mfu']:.1f}% |")
    print(json.dumps({"metric": "gpu_scale", "device": device,
                      **{k: {m: float(f"{v:.4g}") if isinstance(v, float) else v for m, v in r.items() if m != "flops"}
                         for k, r in res.items()}}))


if __name__ == "__main__":
    main()
