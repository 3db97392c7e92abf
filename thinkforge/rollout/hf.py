"""The in-process rollout backend: a loaded transformers model sampled by the CPU engine's decode loop
(`engine/decode.py`: each distinct prompt prefilled once and its cache repeated for the n samples of its group,
rows that stopped leaving the batch; on a CPU the fast step, `engine/fast.py`, for the models it takes). A
model whose forward takes no explicit positions or KV cache is refused with one line (`models.cache_argument`):
there is no quiet fallback that would lose per-sample streams.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from thinkforge.engine.decode import Hooks, Prompts, RowStreams, decode, draw_dtype
from thinkforge.models import cache_argument, eval_mode
from thinkforge.rollout.types import Completion, SamplingParams, encode, is_out_of_memory, pad_id, stop_ids


class HFGenerator:
    """The Sampler and Streamer interfaces over a loaded model and tokenizer, which it samples as they are now
    (no policy sync: an RL trainer's optimizer steps reach it at once). `batch_size` counts sequences
    (prompts x samples).

    lockstep: for the ranks of a sharded (FSDP2) model, whose every forward is a collective, the trainer's
    agreement that one more forward runs (`engine.decode.Hooks.lockstep`); each rank generates its own share,
    and the trainer joins the other ranks' forwards once its share is done (`engine.decode.join`)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, *, lockstep=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        cache_argument(model)  # a model the decode loop cannot run is refused here, in one line
        self.stop_ids = stop_ids(tokenizer, model.generation_config)
        self.interrupt = None  # a function checked every decode step; true ends the rows (the server sets it)
        self.lockstep = lockstep
        self.fast = {}  # the decode loop's fast step (engine/fast.py), remade whenever the weights changed

    def close(self) -> None:
        """Drop the fast step's packed copies of the weights."""
        self.fast.clear()

    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> list[Completion]:
        tok, model = self.tokenizer, self.model
        stops = self.stop_ids
        out: list[Completion] = []
        with eval_mode(model):
            start = 0
            while start < len(prompts):
                chunk = prompts[start : start + max(1, self.batch_size // n)]
                try:
                    rows = self._rows(chunk, start, n, params, stops)
                except RuntimeError as e:  # out of memory: halve the batch and retry; a bug propagates
                    if not is_out_of_memory(e) or len(chunk) == 1 or self.lockstep is not None:  # peers wait in a collective
                        raise
                    self.batch_size = max(n, self.batch_size // 2)
                    _free_cache(model.device)
                    continue
                for row, ids in enumerate(rows):
                    stopped = bool(ids) and ids[-1] in stops
                    text = tok.decode(ids, skip_special_tokens=True)
                    out.append(Completion(start + row // n, text, tuple(ids), "stop" if stopped else "length"))
                start += len(chunk)
        return out

    def _rows(self, chunk: list[str], start: int, n: int, params: SamplingParams, stops: list[int]) -> list[list[int]]:
        """The generated ids of prompts chunk (the first is prompt `start` of the call), n rows per prompt."""
        tok, model = self.tokenizer, self.model
        encoded = [encode(tok, p) for p in chunk]
        uniforms = None
        if params.temperature > 0:
            keys = [(params.stream(start + p), j) for p in range(len(chunk)) for j in range(n)]
            uniforms = RowStreams(keys, draw_dtype(model.device), model.device)
        hooks = Hooks(interrupt=self.interrupt, lockstep=self.lockstep)
        return decode(model, Prompts(encoded, n, stops, pad_id(tok)), params, uniforms=uniforms, hooks=hooks,
                      fast=self.fast)

    def stream(self, prompt, params: SamplingParams) -> Iterator[str]:
        """The text of one completion piece by piece: the decode loop of `generate` (the same tokens as
        `generate([prompt], 1, params)`: the same stream, the fast step) in a thread, each new token's text
        yielded as soon as it is whole (a character split over tokens waits for its last byte). Generation stops
        at the next token when the consumer stops iterating (closing the iterator: a client that left)."""
        import queue

        tok, model = self.tokenizer, self.model
        ids = encode(tok, prompt)
        tokens: queue.Queue = queue.Queue()
        left = threading.Event()
        failed: list[BaseException] = []

        def run():
            try:
                with eval_mode(model):
                    uniforms = None
                    if params.temperature > 0:
                        uniforms = RowStreams([(params.stream(0), 0)], draw_dtype(model.device), model.device)
                    decode(model, Prompts([ids], 1, self.stop_ids, pad_id(tok)), params, uniforms=uniforms,
                           hooks=Hooks(interrupt=left.is_set, on_token=tokens.put), fast=self.fast)
            except BaseException as e:  # noqa: BLE001 - raised in the consumer's thread below
                failed.append(e)
            finally:
                tokens.put(None)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        said: list[int] = []
        start = done = 0  # said[start:done] was yielded already; decoding from `start` keeps each call short
        try:
            while (t := tokens.get()) is not None:
                said.append(t)
                before = tok.decode(said[start:done], skip_special_tokens=True)
                now = tok.decode(said[start:], skip_special_tokens=True)
                if len(now) > len(before) and not now.endswith("\ufffd"):  # not a character's first bytes only
                    yield now[len(before):]
                    start, done = done, len(said)
            if failed:
                raise failed[0]
            before = tok.decode(said[start:done], skip_special_tokens=True)
            rest = tok.decode(said[start:], skip_special_tokens=True)[len(before):]
            if rest:
                yield rest
        finally:
            left.set()
            thread.join()


def _free_cache(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
