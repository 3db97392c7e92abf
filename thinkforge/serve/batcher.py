"""The batcher: one thread owns the model and generates concurrent requests with the same settings together."""

from __future__ import annotations

import collections
import functools
import threading
import time
from dataclasses import replace

from thinkforge.rollout.types import Completion
from thinkforge.serve.protocol import Request

BATCH_WINDOW_S = 0.003  # how long the batcher waits for more requests after the first


class Batcher:
    """The one thread that runs the model: it takes the oldest request and every queued one with the same
    settings (n, temperature, top-p, top-k, max tokens) up to `max_rows` sequences, and generates them in one
    call; each prompt keeps its request's random stream (seed, position). `lock` is held while the model runs
    (streams take it too)."""

    def __init__(self, generator, max_rows: int):
        self.generator, self.max_rows = generator, max(1, max_rows)
        self.lock = threading.Lock()
        self.pending: collections.deque[Request] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        self.batches: collections.deque[int] = collections.deque(maxlen=10_000)  # requests per batch (recent)
        self.thread = threading.Thread(target=self._run, name="thinkforge-batcher", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.ready:
            self.pending.append(req)
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join(timeout=30)

    @staticmethod
    def _key(req: Request):
        p = req.params
        return req.n, p.temperature, p.top_p, p.top_k, p.max_new_tokens

    def _take(self) -> list[Request] | None:
        with self.ready:
            while not self.pending and not self.closed:
                self.ready.wait()
            if self.closed:
                return None
        time.sleep(BATCH_WINDOW_S)  # let requests that arrive together meet
        with self.ready:
            first = self.pending[0]
            batch, rest, rows = [], collections.deque(), 0
            while self.pending:
                req = self.pending.popleft()
                size = len(req.prompts) * req.n
                if self._key(req) == self._key(first) and (not batch or rows + size <= self.max_rows):
                    batch.append(req)
                    rows += size
                else:
                    rest.append(req)
            self.pending = rest
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            for r in batch:
                if r.cancelled.is_set():  # its client left while it waited
                    r.done.set()
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            self.batches.append(len(batch))
            prompts, streams = [], []
            for r in batch:
                prompts += r.prompts
                streams += [r.params.stream(i) for i in range(len(r.prompts))]
            params = replace(batch[0].params, streams=tuple(streams))
            try:
                with self.lock:
                    self.generator.interrupt = functools.partial(_all_cancelled, batch)
                    try:
                        out = self.generator.generate(prompts, batch[0].n, params) if params.max_new_tokens else \
                            [Completion(i, "", (), "length") for i in range(len(prompts)) for _ in range(batch[0].n)]
                    finally:
                        self.generator.interrupt = None
            except Exception as e:  # noqa: BLE001 - answered as a 500 to each of the batch's clients
                for r in batch:
                    r.error = e
                    r.done.set()
                continue
            offset = 0
            for r in batch:
                k = len(r.prompts)
                r.result = [replace(c, prompt_index=c.prompt_index - offset) for c in out
                            if offset <= c.prompt_index < offset + k]
                offset += k
                r.done.set()


def _all_cancelled(batch: list[Request]) -> bool:
    return all(r.cancelled.is_set() for r in batch)
