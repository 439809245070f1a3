"""Several requests on one decoder: Sarathi-Serve's chunked prefill with stall-free batching (arXiv 2403.02310).

Each iteration spends a token budget:
1. decodes first: every running request whose prompt is done gets one token, all in one batched decode call
   (the graph's batch dimension is the number of slots);
2. then the oldest request still in prefill gets a chunk of what is left of the budget.
A long prompt that arrives therefore never stalls the running requests for longer than one chunk. With no budget
(`token_budget=None`) a new prompt is prefilled whole in one iteration, the stall that Sarathi removes.

The KV cache is one shared GroupQueryAttention buffer of (slots, kv_heads, capacity, head_dim) per layer. A prefill
chunk runs at batch 1 on a row's view of that buffer (ORT's GQA takes several new tokens after a past only at
batch 1); the batched decode runs on the whole buffer with each row at its own position. Rows that are not
decoding in an iteration are fed a filler token at their next free position, which their next real write
overwrites before anything reads it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.sampling import Sampler
from onnxlm.runtime.session import DecoderSession


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0  # seconds after the start of `serve`
    sampler: Sampler | None = None  # this request's own token choice (seeded); None: the batch's
    stop_ids: tuple[int, ...] | None = None  # None: the batch's
    on_token: Callable[[Request, int], None] | None = None  # called as each token is chosen (the engine streams)
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated
    token_times: list[float] = dataclasses.field(default_factory=list)  # seconds after the start, per token
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of those, tokens restored from the prefix cache
    row: int | None = None
    finished: bool = False
    cancelled: bool = False  # its client went away: the engine drops it before its next iteration

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.arrival_s

    @property
    def inter_token_s(self) -> list[float]:
        return list(np.diff(self.token_times))


def iteration_plan(requests: list[Request], token_budget: int | None) -> tuple[list[Request], Request | None, int]:
    """(requests to decode, request to prefill, its chunk length) for one iteration, decodes first."""
    live = [r for r in requests if r.row is not None and not r.finished]
    decodes = [r for r in live if r.prefilled == len(r.prompt_ids)]
    prefills = [r for r in live if r.prefilled < len(r.prompt_ids)]
    if not prefills:
        return decodes, None, 0
    target = prefills[0]  # first come, first served
    remaining = len(target.prompt_ids) - target.prefilled
    chunk = remaining if token_budget is None else min(remaining, token_budget - len(decodes))
    return decodes, (target if chunk > 0 else None), max(chunk, 0)


class Batch:
    """Slots of one shared GQA cache and the requests in them. `admit` gives a request a free slot (its prompt's
    cached prefix restored when a prefix cache is given), `iteration` runs one Sarathi iteration, and a finished
    or dropped request frees its slot. Used by `serve` (requests with arrival times) and by the server's engine
    thread (engine.py)."""

    def __init__(self, model: DecoderSession, slots: int, capacity: int, token_budget: int | None = None,
                 stop_ids: tuple[int, ...] = (), sampler: Sampler | None = None, prefix_cache=None):
        if not model.shared_kv:
            raise OnnxlmError("batched serving needs a GroupQueryAttention artifact (recipe fp32 or a quantized one)")
        if token_budget is not None and token_budget <= slots:
            raise OnnxlmError(f"token budget {token_budget} leaves no room for prefill beside {slots} decodes")
        if capacity > model.info.context_length:
            raise OnnxlmError(f"a request needs {capacity} positions; the model's context is "
                              f"{model.info.context_length}")
        self.model, self.slots, self.capacity, self.token_budget = model, slots, capacity, token_budget
        self.stop_ids, self.sampler, self.prefix_cache = stop_ids, sampler or Sampler(), prefix_cache
        self.cache = model.new_cache(batch=slots, capacity=capacity)  # (slots, kv_heads, capacity, head_dim)
        self.rows = [self.cache.row(b) for b in range(slots)]
        self.free = list(range(slots))
        self.running: list[Request] = []
        self.start = time.perf_counter()

    def admit(self, request: Request) -> bool:
        """Give `request` a free slot; False when there is none."""
        if not self.free:
            return False
        request.row = self.free.pop(0)
        self.rows[request.row].length = 0
        if self.prefix_cache is not None:
            request.cached = self.prefix_cache.restore(request.prompt_ids, self.rows[request.row])
            request.prefilled = request.cached
        self.running.append(request)
        return True

    def drop(self, request: Request) -> None:
        """End `request` (finished, or cancelled by its client) and free its slot."""
        request.finished = True
        if request in self.running:
            self.running.remove(request)
            self.free.append(request.row)

    def emit(self, request: Request, logits: np.ndarray) -> None:
        token = (request.sampler or self.sampler)(logits, request.prompt_ids + request.tokens)
        request.tokens.append(token)
        request.token_times.append(time.perf_counter() - self.start)
        stops = self.stop_ids if request.stop_ids is None else request.stop_ids
        if token in stops or len(request.tokens) == request.max_new_tokens:
            self.drop(request)
        if request.on_token:
            request.on_token(request, token)

    def iteration(self) -> bool:
        """One iteration: a batched decode of every running request past its prompt, then a prefill chunk in
        what is left of the token budget. False when there was nothing to run."""
        decodes, prefill, chunk = iteration_plan(self.running, self.token_budget)
        if not decodes and prefill is None:
            return False
        if decodes:
            tokens = np.zeros((self.slots, 1), np.int64)  # (slots, 1): filler for rows that are not decoding
            positions = np.asarray([[row.length] for row in self.rows], np.int64)  # (slots, 1)
            for r in decodes:
                tokens[r.row, 0] = r.tokens[-1]
            logits = self.model.step(tokens, self.cache, positions=positions)  # (slots, 1, vocab)
            for r in decodes:
                self.rows[r.row].length += 1
                self.emit(r, logits[r.row, 0])
        if prefill is not None:
            ids = prefill.prompt_ids[prefill.prefilled : prefill.prefilled + chunk]
            logits = self.model.step(np.asarray([ids], np.int64), self.rows[prefill.row], last_only=True)
            prefill.prefilled += chunk
            if prefill.prefilled == len(prefill.prompt_ids):
                if self.prefix_cache is not None:
                    self.prefix_cache.store(prefill.prompt_ids, self.rows[prefill.row])
                self.emit(prefill, logits[0, -1])  # (vocab,)
        return True


def serve(
    model: DecoderSession,
    requests: list[Request],
    slots: int,
    token_budget: int | None = None,
    stop_ids: tuple[int, ...] = (),
    sampler: Sampler | None = None,
    prefix_cache=None,
) -> list[Request]:
    """Run all requests to completion, admitting each at its arrival time; fills in tokens and token_times."""
    capacity = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    batch = Batch(model, slots, capacity, token_budget, stop_ids, sampler, prefix_cache)
    pending = sorted(requests, key=lambda r: r.arrival_s)
    while pending or batch.running:
        now = time.perf_counter() - batch.start
        while pending and pending[0].arrival_s <= now and batch.admit(pending[0]):
            pending.pop(0)
        if not batch.iteration():  # idle until the next arrival
            time.sleep(max(0.0, pending[0].arrival_s - now))
    return requests
