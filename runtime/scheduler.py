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

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.sampling import Sampler
from onnxlm.runtime.session import DecoderSession


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0  # seconds after the start of `serve`
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated
    token_times: list[float] = dataclasses.field(default_factory=list)  # seconds after the start, per token
    prefilled: int = 0  # prompt tokens already in the cache
    row: int | None = None
    finished: bool = False

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


def serve(
    model: DecoderSession,
    requests: list[Request],
    slots: int,
    token_budget: int | None = None,
    stop_ids: tuple[int, ...] = (),
    sampler: Sampler | None = None,
) -> list[Request]:
    """Run all requests to completion, admitting each at its arrival time; fills in tokens and token_times."""
    if not model.shared_kv:
        raise OnnxlmError("batched serving needs a GroupQueryAttention artifact (recipe fp32 or a quantized one)")
    if token_budget is not None and token_budget <= slots:
        raise OnnxlmError(f"token budget {token_budget} leaves no room for prefill beside {slots} decodes")
    choose = sampler or Sampler()
    capacity = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    if capacity > model.info.context_length:
        raise OnnxlmError(f"a request needs {capacity} positions; the model's context is {model.info.context_length}")
    cache = model.new_cache(batch=slots, capacity=capacity)  # (slots, kv_heads, capacity, head_dim) per layer
    rows = [cache.row(b) for b in range(slots)]
    free = list(range(slots))
    pending = sorted(requests, key=lambda r: r.arrival_s)
    start = time.perf_counter()

    def emit(request: Request, logits: np.ndarray) -> None:
        token = choose(logits, request.prompt_ids + request.tokens)
        request.tokens.append(token)
        request.token_times.append(time.perf_counter() - start)
        if token in stop_ids or len(request.tokens) == request.max_new_tokens:
            request.finished = True
            free.append(request.row)

    while pending or any(r.row is not None and not r.finished for r in requests):
        now = time.perf_counter() - start
        while pending and pending[0].arrival_s <= now and free:
            request = pending.pop(0)
            request.row = free.pop(0)
            rows[request.row].length = 0
        decodes, prefill, chunk = iteration_plan(requests, token_budget)
        if not decodes and prefill is None:  # idle until the next arrival
            time.sleep(max(0.0, pending[0].arrival_s - now))
            continue
        if decodes:
            tokens = np.zeros((slots, 1), np.int64)  # (slots, 1): filler for rows that are not decoding
            positions = np.asarray([[row.length] for row in rows], np.int64)  # (slots, 1)
            for r in decodes:
                tokens[r.row, 0] = r.tokens[-1]
            logits = model.step(tokens, cache, positions=positions)  # (slots, 1, vocab)
            for r in decodes:
                rows[r.row].length += 1
                emit(r, logits[r.row, 0])
        if prefill is not None:
            ids = prefill.prompt_ids[prefill.prefilled : prefill.prefilled + chunk]
            logits = model.step(np.asarray([ids], np.int64), rows[prefill.row], last_only=True)  # (1, 1, vocab)
            prefill.prefilled += chunk
            if prefill.prefilled == len(prefill.prompt_ids):
                emit(prefill, logits[0, -1])
    return requests
