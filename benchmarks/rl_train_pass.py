"""The RL training pass against plain LM training of the same model, in one run.

    python benchmarks/rl_train_pass.py [--model models/smollm2-135m-instruct] [--repeats 3]
    python benchmarks/rl_train_pass.py --tiny      # the smoke test's size

One GRPO micro-batch as the Infused SmolLM2 recipe trains it (recipes/smollm2-infused.yaml: LoRA r 16 on q/k/v/o,
bf16 autocast where the CPU computes bf16 natively (--precision), 2 prompts x 8 completions per micro-batch, dropout off as in every RL pass): prompts of --prompt
tokens, completions of --short..--long tokens (seeded random ids; the recipe's rollouts ran 66-186 after a
150-token prompt). Timed: forward (train/forward.py's forward_logp: the prompt once, the completions on its
cache), the policy loss and its backward, the median of --repeats after a warm-up, three ways:
- `rl`: what rl.py runs for a step's first micro-batch (with the entropy metric: one more pass of the output layer);
- `rl without entropy`: its other micro-batches;
- `rl without entropy, completions padded`: the same with the completions right-padded on the prompt's cache
  repeated per row (the layout before they were packed in one row);
- `lm`: plain LM training on as many real tokens (unpadded rows of --lm-row tokens, log-probs of every token
  from the chunked head): the rate the RL pass is measured against.
Rates count real tokens (prompts once each, completions without padding). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rollout(tok, prompts: int, group: int, prompt_len: int, short: int, long: int, seed: int):
    import torch

    from thinkforge.rollout.types import Rollout

    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    lengths = torch.randint(short, long + 1, (prompts * group,), generator=g).tolist()
    rewards = [float(i % 2) for i in range(prompts * group)]
    return Rollout.build([ids(prompt_len) for _ in range(prompts)], [ids(n) for n in lengths],
                         [i // group for i in range(prompts * group)], tok.pad_token_id, rewards=rewards, temperature=0.8)


def rl_pass(model, batch, group: int, entropy: bool, precision: str = "bf16"):
    from thinkforge.losses import grpo_advantages, normaliser, policy_loss
    from thinkforge.train.forward import forward_logp
    from thinkforge.train.loop import autocast

    n = len(batch.texts)
    mask = batch.completion_mask.float()
    adv = grpo_advantages(batch.rewards, group)
    with autocast("cpu", precision):  # as the stages decide it
        logp, _, _ = forward_logp(model, batch, slice(0, n), with_entropy=entropy)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, normaliser(mask, "sequence"))
    loss.backward()


def lm_pass(model, rows, precision: str = "bf16"):
    from thinkforge.losses import IGNORE
    from thinkforge.train.head import final, hidden_states
    from thinkforge.train.loop import autocast

    with autocast("cpu", precision), hidden_states(model) as head:
        states = final(model(input_ids=rows, use_cache=False))[:, :-1]  # as sft.forward_loss: no KV cache made
        targets = rows[:, 1:].masked_fill(rows[:, 1:] < 0, IGNORE)
        logp, _ = head.logprobs(states, targets)
    (-logp.sum() / logp.numel()).backward()


@contextlib.contextmanager
def padded_layout():
    """The completions right-padded on the prompt's cache repeated per row (the layout before packing)."""
    from thinkforge.train import forward

    packable = forward.packable
    forward.packable = lambda *a: False
    try:
        yield
    finally:
        forward.packable = packable


def tiny_model_dir() -> str:
    """A tiny random Llama folder (the smoke tests' model)."""
    import tempfile

    from thinkforge import tiny
    from thinkforge.config import InitConfig

    return str(tiny.init_model(Path(tempfile.mkdtemp()) / "tiny", InitConfig(arch="llama", hidden=64, layers=2)))


def training_model(path: str, base_dtype: str = "float32"):
    """(model, tokenizer) as the real-model recipes train it: LoRA r 16 on q/k/v/o in float32 on a `base_dtype` base,
    dropout off (as in every DPO and RL pass), the training stages' attention, train mode."""
    from thinkforge import models
    from thinkforge.train.attention import use_document_attention

    model, tok = models.load(path, dtype=base_dtype, device="cpu")
    model = models.add_lora(model, 16, 32, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    for w in model.parameters():  # as loop.load_for_training: the adapter trains in float32 on any base
        if w.requires_grad:
            w.data = w.data.float()
    models.disable_dropout(model)
    use_document_attention(model)  # as loop.load_for_training sets every training stage up
    return model.train(), tok


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, short rows: the smoke test")
    ap.add_argument("--prompt", type=int, default=150)
    ap.add_argument("--short", type=int, default=66)
    ap.add_argument("--long", type=int, default=186)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--lm-row", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the frozen base's weights (model.dtype); the adapter trains in float32 either way")
    ap.add_argument("--precision", default="bf16_if_native", choices=["bf16_if_native", "bf16", "no"],
                    help="mixed_precision as the recipe's stages read it (bf16_if_native: fp32 on a CPU without native bf16)")
    a = ap.parse_args()
    from thinkforge.train.loop import uses_bf16

    torch.set_num_threads(a.threads)
    if a.tiny:
        a.model = tiny_model_dir()
        a.prompt, a.short, a.long, a.lm_row, a.repeats = 12, 4, 20, 32, 1
    model, tok = training_model(a.model, a.base_dtype)
    batch = rollout(tok, a.prompts, a.group, a.prompt, a.short, a.long, seed=0)
    real = int(batch.prompt_mask.sum()) + int(batch.completion_mask.sum())
    padded_positions = a.prompts * a.prompt + batch.completion_ids.numel()
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(10, len(tok), (max(1, real // a.lm_row), a.lm_row), generator=g)
    lm_tokens = rows.numel()
    rate = {
        "rl": real / timed(lambda: rl_pass(model, batch, a.group, True, a.precision), a.repeats),
        "rl without entropy": real / timed(lambda: rl_pass(model, batch, a.group, False, a.precision), a.repeats),
    }
    with padded_layout():
        rate["rl without entropy, completions padded"] = real / timed(lambda: rl_pass(model, batch, a.group, False, a.precision),
                                                                      a.repeats)
    rate["lm"] = lm_tokens / timed(lambda: lm_pass(model, rows, a.precision), a.repeats)
    params = sum(p.numel() for p in model.parameters())
    print(f"CPU, {a.threads} threads, torch {torch.__version__}, {Path(a.model).name} ({params / 1e6:.1f}M parameters), "
          f"LoRA r 16 q/k/v/o, {'bf16 autocast' if uses_bf16('cpu', a.precision) else 'fp32'}; {a.prompts} prompts x {a.group} completions, prompt {a.prompt}, "
          f"completions {a.short}-{a.long}: {real} real tokens ({real / padded_positions:.0%} of the pass's positions)")
    print("| pass | real tokens/s | of LM training |")
    print("|---|---|---|")
    for name, r in rate.items():
        print(f"| {name} | {r:.0f} | {r / rate['lm']:.2f} |")
    print(json.dumps({"metric": "rl_train_pass_tokens_per_s", "rl": round(rate["rl"], 1),
                      "rl_without_entropy": round(rate["rl without entropy"], 1), "lm": round(rate["lm"], 1),
                      "rl_padded_without_entropy": round(rate["rl without entropy, completions padded"], 1),
                      "of_lm": round(rate["rl"] / rate["lm"], 3)}))


if __name__ == "__main__":
    main()
