"""Latency and throughput of one artifact: TTFT, greedy decode tok/s, prefill time. Medians of N runs.

Definitions (shared with bench/, so numbers from both sides compare):
- ttft_s: a 32-token prompt (or `context` tokens), from the call to the first new token chosen (prefill +
  argmax). The KV cache is allocated before the clock starts, as onnxruntime-genai allocates its buffers when
  a generator is made.
- decode_tok_s: 128 new tokens after that prompt; (128 - 1) / (time of token 128 - time of token 1).
- prefill_s: the prefill of a 512-token prompt from an empty cache (prefill_tokens; fewer on a static artifact
  whose cache holds fewer), as a generation runs it (one forward pass; a static artifact's P-token chunks);
  prefill512_s repeats it when it is 512 tokens.
"""

from __future__ import annotations

import statistics
import time

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.decoding import executor_for
from onnxlm.runtime.execution import Executor
from onnxlm.runtime.generate import greedy
from onnxlm.runtime.kv_policy import KVPolicyConfig
from onnxlm.runtime.session import DecoderSession

# Fixed English text so that every run and every system sees the same prompt tokens.
BENCH_TEXT = (
    "The history of computing is a story of ideas that became machines. Early mechanical calculators could add "
    "and subtract, and later designs stored instructions as well as numbers. In the twentieth century, "
    "electronic computers replaced gears with vacuum tubes, then with transistors, and finally with integrated "
    "circuits holding billions of switches. Each step made computers smaller, cheaper and faster, and each step "
    "opened new uses: scientific simulation, business records, personal writing, games, networks that joined "
    "the world, and today models that read and write language. "
)


def bench_prompt(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(BENCH_TEXT, add_bos=False)
    return (ids * (length // len(ids) + 1))[:length]


def time_generation(executor: Executor, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Return (ttft seconds, decode tok/s) for one greedy run that ignores EOS, on `executor` (the full cache, a
    KV policy, early exit: decoding.executor_for)."""
    executor.begin(len(prompt) + new_tokens)  # the cache, before the clock
    # on a device the greedy choice is made there (execution.Plain.decode_greedy); elsewhere on the host logits
    step = getattr(executor, "decode_greedy", None) or (lambda t: greedy(executor.decode(t)))
    start = time.perf_counter()
    token = greedy(executor.prefill(prompt))
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = step(token)
    last = time.perf_counter()
    return first - start, (new_tokens - 1) / (last - first)


def time_prefill(executor: Executor, prompt: list[int]) -> float:
    """Seconds of one prefill of `prompt` from an empty cache on `executor`, as a generation's prefill runs (a
    static artifact: its P-token chunks); the cache is allocated before the clock."""
    executor.begin(len(prompt))
    start = time.perf_counter()
    executor.prefill(prompt)
    return time.perf_counter() - start


PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS = 32, 128, 512


def bench(model: DecoderSession, tokenizer, runs: int = 5, on_run=None, context: int = PROMPT_TOKENS,
          kv_policy: KVPolicyConfig | None = None, halt_threshold: float | None = None,
          exits: tuple | None = None) -> dict:
    segments, threshold = exits or (None, None)
    executor = executor_for(model, kv_policy, halt_threshold, threshold, segments)
    limit = executor.max_tokens()  # the context length; a static artifact's cache slots
    if context + NEW_TOKENS > limit and (kv_policy is None or kv_policy.name == "full"):
        slots = " (the static KV cache's slots)" if limit != model.info.context_length else ""
        raise OnnxlmError(f"--context {context} + {NEW_TOKENS} timed tokens exceed the context length {limit}{slots}")
    if PREFILL_TOKENS > model.info.context_length:
        raise OnnxlmError(f"the {PREFILL_TOKENS}-token prefill exceeds the model's context length "
                          f"{model.info.context_length}")
    prefill_tokens = min(PREFILL_TOKENS, limit)  # a static cache smaller than 512 slots: as many as it holds
    short, long = bench_prompt(tokenizer, context), bench_prompt(tokenizer, prefill_tokens)
    time_generation(executor, short, 4)  # warm-up: first-run allocations
    ttft, decode, prefill_s = [], [], []
    for i in range(runs):
        t, d = time_generation(executor, short, NEW_TOKENS)
        ttft.append(t)
        decode.append(d)
        prefill_s.append(time_prefill(executor, long))
        if on_run:
            on_run(i + 1, runs)
    return {
        "ttft_s": statistics.median(ttft),
        "decode_tok_s": statistics.median(decode),
        "prefill_s": statistics.median(prefill_s),
        "prefill_tokens": prefill_tokens,
        **({"prefill512_s": statistics.median(prefill_s)} if prefill_tokens == PREFILL_TOKENS else {}),
        "runs": runs,
        "threads": model.threads,
        "session": model.settings.to_dict(),  # the session options it ran with (recorded, explicit or default)
        "context": context,
        "kv_policy": (kv_policy or KVPolicyConfig()).name,
        "halt_threshold": halt_threshold,
        "exit_threshold": exits[1] if exits else None,
    }
