"""Peak memory and seconds of one training step at the recipe's lengths, on a narrow model with Phi-4-mini's
vocabulary (200,064 tokens, tied embeddings): the output head is then most of the step's memory.

    python benchmarks/long_context_memory.py                       # after: 4K, 16K, 32K for sft, dpo, grpo
    python benchmarks/long_context_memory.py --path full --tokens 1024 2048 4096   # before: the full logits

Each (stage, length) runs in its own process (peak resident memory is that process's `ru_maxrss`), under
an address-space limit (`--limit-gb`) so that a configuration that does not fit fails instead of swapping.
One step, through the stage's own functions:
- sft: one packed row of `tokens` (documents of 2,048 tokens, 64 of prompt each), `sft.forward_loss`;
- dpo: one pair whose chosen and rejected are each `tokens` long (64 of prompt), `dpo.pair_logprobs`;
- grpo: one prompt (64 tokens) and G = 2 completions of `tokens - 64`, `forward.forward_logp` + policy loss;
then backward and an AdamW step, with the attention every stage uses (train/attention.py). `--path full` runs
what thinkforge did before train/head.py (the model's (T, V) logits, then the loss; transformers' masks). The
per-token cost is the slope of the peak between the two longest lengths.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = 64
DOC = 2048


def build_model(vocab: int, hidden: int, layers: int, max_len: int):
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_len,
                        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def one_step(stage: str, path: str, tokens: int, a) -> dict:
    import torch

    from thinkforge.data.packing import Example, collate_packed
    from thinkforge.losses import normaliser, policy_loss, sft_loss
    from thinkforge.rollout.types import Rollout

    model = build_model(a.vocab, a.hidden, a.layers, 2 * tokens)
    if path == "head":  # as every stage loads its model (loop.load_for_training): no (T, T) or (Q, K) mask
        from thinkforge.train.attention import use_document_attention

        use_document_attention(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, a.vocab, (n,), generator=g).tolist()

    t0 = time.time()
    if stage == "sft":
        from thinkforge.train import sft

        docs, left = [], tokens
        while left > 0:
            n = min(DOC, left)
            docs.append(Example(tuple(ids(min(PROMPT, n - 1))), tuple(ids(n - min(PROMPT, n - 1)))))
            left -= n
        x, labels, pos = collate_packed([docs], tokens, 0)
        batch = {"input_ids": x, "labels": labels, "position_ids": pos}
        norm = normaliser((labels != -100).float(), "token")
        if path == "full":
            loss = sft_loss(model(input_ids=x, position_ids=pos, use_cache=False).logits, labels, norm)
        else:
            loss = sft.forward_loss(model, batch, norm, a.chunk)
    elif stage == "dpo":
        from thinkforge.losses import dpo_loss
        from thinkforge.train import dpo

        prompt = tuple(ids(PROMPT))
        pair = (Example(prompt, tuple(ids(tokens - PROMPT))), Example(prompt, tuple(ids(tokens - PROMPT))))
        if path == "full":
            from thinkforge.data.packing import collate_padded
            from thinkforge.losses import sequence_logprobs

            x, labels, attn = collate_padded(list(pair), 0)
            lp = sequence_logprobs(model(input_ids=x, attention_mask=attn, use_cache=False).logits, labels)
            chosen, rejected = lp[:1], lp[1:]
        else:
            chosen, rejected = dpo.pair_logprobs(model, [pair], 0, a.chunk)
        loss = dpo_loss(chosen, rejected, chosen.detach() - 0.1, rejected.detach(), 0.1, "sigmoid")[0].mean()
    else:  # grpo: one group of two
        from thinkforge.train.forward import forward_logp

        ro = Rollout.build([ids(PROMPT)], [ids(tokens - PROMPT), ids(tokens - PROMPT)], [0, 0], 0, rewards=[1.0, -1.0])
        mask = ro.completion_mask.float()
        adv = torch.tensor([[1.0], [-1.0]]).expand_as(mask)
        if path == "full":
            from thinkforge.losses import token_logprobs

            full = torch.cat([ro.prompt_ids.repeat(2, 1), ro.completion_ids], -1)
            logits = model(input_ids=full, use_cache=False).logits[:, PROMPT - 1 : -1]
            logp, _ = token_logprobs(logits, ro.completion_ids)
        else:
            logp, _, _ = forward_logp(model, ro, slice(0, 2), chunk=a.chunk)
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, normaliser(mask, "token"), kind="ppo_clip", clip=(0.2, 0.28))
    loss.backward()
    opt.step()
    return {"seconds": time.time() - t0, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "loss": float(loss.detach())}


def child(a) -> None:
    limit = int(a.limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        out = one_step(a.stage, a.path, a.one, a)
    except (MemoryError, RuntimeError) as e:  # an allocation beyond the limit
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        out = {"seconds": None, "peak_gb": None, "error": f"out of memory under {a.limit_gb:g} GB"}
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=["sft", "dpo", "grpo"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384, 32768])
    p.add_argument("--path", choices=["head", "full"], default="head")
    p.add_argument("--vocab", type=int, default=200_064)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=None, help="head_chunk (default: train/head.py's)")
    p.add_argument("--limit-gb", type=float, default=20.0)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        return child(a)
    rows = []
    for stage in a.stages:
        for n in a.tokens:
            cmd = [sys.executable, __file__, "--stage", stage, "--one", str(n), "--path", a.path, "--vocab", str(a.vocab),
                   "--hidden", str(a.hidden), "--layers", str(a.layers), "--limit-gb", str(a.limit_gb)]
            cmd += ["--chunk", str(a.chunk)] if a.chunk else []
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            last = (res.stdout.strip().splitlines() or ["{}"])[-1]
            got = json.loads(last) if res.returncode == 0 else {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
            rows.append({"stage": stage, "tokens": n, **got})
            print(rows[-1], file=sys.stderr, flush=True)
    print("| stage | tokens | path | peak GB | seconds |\n|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") else r.get("error", "?")
        secs = f"{r['seconds']:.1f}" if r.get("seconds") else ""
        print(f"| {r['stage']} | {r['tokens']} | {a.path} | {peak} | {secs} |")
    slopes = {}
    for stage in a.stages:
        ok = [r for r in rows if r["stage"] == stage and r.get("peak_gb")]
        if len(ok) >= 2:
            lo, hi = ok[-2], ok[-1]
            slopes[stage] = round((hi["peak_gb"] - lo["peak_gb"]) * 2**30 / (hi["tokens"] - lo["tokens"]) / 2**20, 3)
    print(json.dumps({"metric": "peak_mb_per_token", "path": a.path, **slopes,
                      "peak_gb": {f"{r['stage']}@{r['tokens']}": r.get("peak_gb") and round(r["peak_gb"], 2) for r in rows}}))


if __name__ == "__main__":
    main()
