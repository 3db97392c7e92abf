"""The in-process rollout backend: a loaded transformers model sampled by the CPU engine's decode loop
(`engine/decode.py`: each distinct prompt prefilled once and its cache repeated for the n samples of its group,
rows that stopped leaving the batch; on a CPU the packed step, `engine/packed.py`, for the models it takes). A
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
    """Generate with a loaded model and tokenizer. `batch_size` counts sequences (prompts x samples).

    peers: the ranks of a sharded (FSDP2) model, whose every forward is a collective. Each rank generates its
    own share, and before each forward all ranks agree that one more runs (`Dist.lockstep`); a rank whose
    share is done calls `done()`, which runs stand-in forwards until every rank's share is done. The ranks'
    shares need not match in prompts, chunks or lengths."""

    def __init__(self, model, tokenizer, batch_size: int = 16, peers=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        cache_argument(model)  # a model the decode loop cannot run is refused here, in one line
        self.stop_ids = stop_ids(tokenizer, model.generation_config)
        self.interrupt = None  # a function checked every decode step; true ends the rows (the server sets it)
        self.peers = peers if peers is not None and peers.sharded else None
        self.version = 0  # load_weights calls: the training model's optimizer steps since the run (re)started
        self.packed = {}  # the decode loop's packed step (engine/packed.py), remade whenever the weights changed

    def done(self) -> None:
        """This rank's generation is over: with sharded peers, join their forwards until theirs is too."""
        if self.peers is None:
            return
        import torch

        model = self.model
        ids = torch.full((1, 1), pad_id(self.tokenizer), dtype=torch.long, device=model.device)
        with eval_mode(model), torch.no_grad():
            while self.peers.lockstep(False):
                model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False)  # its collectives only

    def load_weights(self, model) -> dict[str, float]:
        """Generation runs on the training model itself: its weights are always the current ones."""
        if model is not self.model:
            self.model, self.stop_ids = model, stop_ids(self.tokenizer, model.generation_config)
            self.packed.clear()  # the old model's packed step: its parameters' ids may be reused by the new one
        self.version += 1
        return {}

    def prove(self, model) -> dict[str, float]:
        """The training model itself samples: nothing to prove."""
        return {}

    def close(self) -> None:
        pass

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
                    if not is_out_of_memory(e) or len(chunk) == 1 or self.peers is not None:  # peers wait in a collective
                        raise
                    self.batch_size = max(n, self.batch_size // 2)
                    _free_cache(model.device)
                    continue
                for row, ids in enumerate(rows):
                    stopped = bool(ids) and ids[-1] in stops
                    text = tok.decode(ids, skip_special_tokens=True)
                    out.append(Completion(start + row // n, text, tuple(ids), "stop" if stopped else "length",
                                          version=self.version))
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
        hooks = Hooks(interrupt=self.interrupt, lockstep=self.peers.lockstep if self.peers is not None else None)
        return decode(model, Prompts(encoded, n, stops, pad_id(tok)), params, uniforms=uniforms, hooks=hooks,
                      packed=self.packed)

    def stream(self, prompt, params: SamplingParams) -> Iterator[str]:
        """The text of one completion piece by piece: the decode loop of `generate` (the same tokens as
        `generate([prompt], 1, params)`: the same stream, the packed step) in a thread, each new token's text
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
                           hooks=Hooks(interrupt=left.is_set, on_token=tokens.put), packed=self.packed)
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
