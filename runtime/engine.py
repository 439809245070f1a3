"""The serving engine: continuous batching on the Sarathi policy, one thread that owns the ORT session.

Requests join a bounded queue from any thread (`submit`); the engine thread admits them into free slots of one
shared GQA cache (scheduler.Batch, with the prefix cache), runs iterations (every running decode, then a prefill
chunk in the rest of the token budget) and hands each chosen token to its request's `on_token` callback. Requests
join and leave at any iteration; a cancelled one frees its slot before the next. `stop` ends intake and, with
`drain`, lets the requests in flight finish.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.prefix_cache import PrefixCache
from onnxlm.runtime.sampling import Sampler, SamplingConfig
from onnxlm.runtime.scheduler import Batch, Request
from onnxlm.runtime.session import DecoderSession


class QueueFull(OnnxlmError):
    """The engine's queue is full: try again later (HTTP 429)."""


@dataclasses.dataclass
class EngineConfig:
    slots: int = 8  # requests decoding at once
    token_budget: int | None = 128  # tokens per iteration (Sarathi's chunk budget); None: whole prompts
    max_queue: int = 64  # requests waiting for a slot
    max_context: int = 2048  # positions per slot (prompt + new tokens)
    prefix_cache_mb: float = 0.0  # 0: no prefix cache


@dataclasses.dataclass
class Stats:
    """Counters the server's /metrics reports, written by the engine thread; `ttft` and `itl` receive each
    latency as it happens (the server records them in histograms)."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def ttft(self, seconds: float) -> None:
        pass

    def itl(self, seconds: float) -> None:
        pass


class Engine:
    def __init__(self, model: DecoderSession, config: EngineConfig | None = None, stop_ids: tuple[int, ...] = (),
                 stats: Stats | None = None):
        self.model, self.config = model, config or EngineConfig()
        c = self.config
        capacity = min(c.max_context, model.info.context_length)
        cache = PrefixCache(int(c.prefix_cache_mb * 2**20)) if c.prefix_cache_mb > 0 else None
        self.batch = Batch(model, c.slots, capacity, c.token_budget, stop_ids, Sampler(), cache)
        self.waiting: collections.deque[Request] = collections.deque()
        self.stats = stats or Stats()
        self.wake = threading.Condition()
        self.accepting, self.running = True, True
        self.thread = threading.Thread(target=self._loop, name="onnxlm-engine", daemon=True)
        self.thread.start()

    @property
    def capacity(self) -> int:
        return self.batch.capacity

    def submit(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None,
               on_token: Callable[[Request, int], None], stop_ids: tuple[int, ...] | None = None) -> Request:
        """Queue a request; `on_token(request, token)` runs on the engine thread for each token (and
        request.finished says when it was the last). Raises QueueFull, or OnnxlmError for a request too long."""
        if not prompt_ids:
            raise OnnxlmError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.capacity:
            raise OnnxlmError(f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_new_tokens}) exceeds the "
                              f"server's context of {self.capacity} positions")
        request = Request(list(prompt_ids), max_new_tokens, sampler=Sampler(sampling) if sampling else None,
                          stop_ids=stop_ids, on_token=on_token)
        with self.wake:
            if not self.accepting:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting: the queue is full")
            request.arrival_s = time.perf_counter() - self.batch.start
            self.waiting.append(request)
            self.stats.requests += 1
            self.stats.prompt_tokens += len(prompt_ids)
            self.wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away); its slot is freed before the next iteration."""
        with self.wake:
            if not request.finished:
                request.cancelled = True
                self.wake.notify()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def slots_in_use(self) -> int:
        return len(self.batch.running)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain`, finish those queued and running first."""
        with self.wake:
            self.accepting = False
            if not drain:
                for request in [*self.waiting, *self.batch.running]:
                    request.cancelled = True
            self.running = False
            self.wake.notify()
        self.thread.join(timeout)

    def _loop(self) -> None:
        batch = self.batch
        while True:
            with self.wake:
                self._drop_cancelled()
                while self.waiting and batch.free:
                    batch.admit(self.waiting.popleft())
                if not batch.running:
                    if not self.running and not self.waiting:
                        return
                    self.wake.wait(0.5)
                    continue
            self._observe(batch.iteration)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._end(request)
        for request in [r for r in self.batch.running if r.cancelled]:
            self.batch.drop(request)
            self._end(request)

    def _end(self, request: Request) -> None:
        request.finished = True
        self.stats.cancelled += 1
        if request.on_token:
            request.on_token(request, None)  # None: ended without a token (cancelled)

    def _observe(self, iteration: Callable[[], bool]) -> None:
        """Run one iteration and record the latencies of the tokens it chose."""
        running = [(r, len(r.tokens)) for r in self.batch.running]
        iteration()
        for r, before in running:
            new = len(r.tokens) - before
            if not new:
                continue
            self.stats.generated_tokens += new
            if len(r.tokens) == 1:
                self.stats.ttft(r.ttft_s)
            else:
                self.stats.itl(r.token_times[-1] - r.token_times[-2])
            if r.finished:
                self.stats.finished += 1
