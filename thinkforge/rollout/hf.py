"""Generation with Hugging Face transformers: KV cache, left-padded batches, a group's samples together."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from thinkforge.rollout.types import Completion, SamplingParams


class HFGenerator:
    """Generate with a loaded model and tokenizer. `batch_size` counts sequences (prompts x samples)."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)

    def _kwargs(self, params: SamplingParams) -> dict:
        tok = self.tokenizer
        kw = dict(max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> list[Completion]:
        import torch

        tok, model = self.tokenizer, self.model
        prompts_per_batch = max(1, self.batch_size // n)
        out: list[Completion] = []
        torch.manual_seed(params.seed)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(prompts), prompts_per_batch):
                chunk = prompts[start : start + prompts_per_batch]
                # Each prompt repeated n times (a group): works for greedy too, unlike num_return_sequences.
                expanded = [p for p in chunk for _ in range(n)]
                enc = tok(expanded, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                with torch.no_grad():
                    seqs = model.generate(**enc, **self._kwargs(params))
                new = seqs[:, enc["input_ids"].shape[1] :]  # (len(chunk)*n, T)
                for row, ids in enumerate(new.tolist()):
                    ids = _trim(ids, tok.pad_token_id, tok.eos_token_id)
                    stopped = bool(ids) and ids[-1] == tok.eos_token_id
                    text = tok.decode(ids, skip_special_tokens=True)
                    out.append(Completion(start + row // n, text, tuple(ids), "stop" if stopped else "length"))
        finally:
            model.train(was_training)
        return out

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(params.seed)

        def run():
            with torch.no_grad():
                self.model.generate(**enc, streamer=streamer, **self._kwargs(params))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()


def _trim(ids: list[int], pad_id: int, eos_id: int) -> list[int]:
    """Cut after the first eos; drop right padding (generate pads finished rows with pad_id)."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    while ids and ids[-1] == pad_id and pad_id != eos_id:
        ids = ids[:-1]
    return ids
