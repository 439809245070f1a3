"""Run a graph under plain ONNX Runtime for the pass manager and the calibrating passes: feeds, probe, PPL.

No IO binding and no shared buffers here: each call feeds an empty past and reads the outputs it asks for,
which works on every graph form (plain, lowered to GroupQueryAttention, quantized).
"""

from __future__ import annotations

import numpy as np

from onnxlm.backends.base import kv_dtype
from onnxlm.errors import OnnxlmError
from onnxlm.interface import Interface
from onnxlm.metrics import perplexity, windows_of
from onnxlm.model_info import ModelInfo

PROBE_PAST, PROBE_SEQ = 3, 4


def feeds_for(session, info: ModelInfo, tokens: np.ndarray, start: int, past: dict | None,
              fed_elsewhere: set[str] = frozenset(), interface: Interface | None = None) -> dict:
    """The inputs of one forward over `tokens` (1, seq) at positions start.., with `past` (name -> array) or an
    empty cache. Inputs that passes added (`interface`) get their neutral default when the graph needs them fed;
    `fed_elsewhere`: inputs the caller feeds itself (weights made inputs)."""
    names = [i.name for i in session.get_inputs()]
    if past is None:
        dtype = kv_dtype(session)  # float16 after convert_float16
        past = {n: np.zeros((1, info.num_kv_heads, 0, info.head_dim), dtype)  # (batch, kv_heads, 0, hd)
                for n in names if n.startswith("past_key_values.")}
    seq = tokens.shape[1]
    feeds = {"input_ids": tokens.astype(np.int64), **past}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((1, start + seq), np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(start, start + seq, dtype=np.int64)[None]
    dims = {"batch": 1, "seq": seq, "past": start, "total": start + seq, "layers": info.num_layers,
            "heads": info.num_heads}
    for port in (interface or Interface()).required_inputs():
        if port.name in names:
            feeds[port.name] = port.fill(dims)
    unknown = set(names) - set(feeds) - fed_elsewhere
    if unknown:
        raise OnnxlmError(f"the graph has inputs that no pass declared: {sorted(unknown)}")
    return feeds


def probe_logits(session, info: ModelInfo, interface: Interface | None = None) -> np.ndarray:
    """Logits of random tokens in two steps: a prefill of 3 tokens from an empty cache, then 4 more tokens on
    the cache it produced. Both the no-past and the with-past paths are exercised, on realistic K/V values. A
    model with sliding windows prefills one token more than its widest window, so that the 4 tokens after it
    attend across the window's edge and a pass that moved the edge shows in their logits."""
    rng = np.random.default_rng(0)
    outputs = [o.name for o in session.get_outputs()]
    past, start = None, 0
    for seq in (max(PROBE_PAST, info.sliding_window + 1), PROBE_SEQ):
        tokens = rng.integers(0, info.vocab_size, (1, seq), dtype=np.int64)
        result = dict(zip(outputs, session.run(outputs, feeds_for(session, info, tokens, start, past,
                                                                  interface=interface))))
        past = {n.replace("present.", "past_key_values."): v for n, v in result.items() if n.startswith("present.")}
        start += seq
    return result["logits"].astype(np.float32)  # (1, PROBE_SEQ, vocab); float16 after convert_float16


def decode_step_seconds(sessions: list, info: ModelInfo, context: int = 32, steps: int = 16, rounds: int = 3
                        ) -> list[float]:
    """Median seconds of one decode step (one token after a `context`-token prompt) for each session, timed
    round-robin in `rounds` rounds of `steps` steps, so that the machine's drift hits every session alike."""
    import statistics
    import time

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, info.vocab_size, (1, context), dtype=np.int64)
    token = rng.integers(0, info.vocab_size, (1, 1), dtype=np.int64)
    pasts = []
    for session in sessions:  # the prompt's cache, once per session
        outputs = [o.name for o in session.get_outputs()]
        result = dict(zip(outputs, session.run(outputs, feeds_for(session, info, prompt, 0, None))))
        pasts.append({n.replace("present.", "past_key_values."): v for n, v in result.items()
                      if n.startswith("present.")})
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            feeds = feeds_for(session, info, token, context, pasts[i])
            session.run(["logits"], feeds)  # warm
            start = time.perf_counter()
            for _ in range(steps):
                session.run(["logits"], feeds)
            times[i].append((time.perf_counter() - start) / steps)
    return [statistics.median(t) for t in times]


def session_perplexity(session, info: ModelInfo, ids: list[int], window: int = 512, extra: dict | None = None,
                       interface: Interface | None = None) -> float:
    """PPL over non-overlapping windows, each from an empty cache (metrics.perplexity, the one PPL loop).
    `extra`: inputs of the graph beyond a decoder's own (a probe graph's switches), fed to every window."""
    extra = extra or {}

    def window_logits(w: list[int]):
        feeds = feeds_for(session, info, np.asarray([w], np.int64), 0, None, set(extra), interface)
        yield session.run(["logits"], {**feeds, **extra})[0][0].astype(np.float32, copy=False)  # (seq, vocab)

    return perplexity(windows_of(ids, window), window_logits)["ppl"]


def open_session(path, threads: int | None = None, backend=None, as_written: bool = False):
    """A plain session for the manager's checks and the passes' measurements: on `backend`, default the CPU;
    `as_written`: without ORT's EP-specific fusions (Backend.session)."""
    from onnxlm.backends import CPU
    from onnxlm.backends.base import SessionSettings

    return (backend or CPU).session(path, SessionSettings(threads=threads), as_written=as_written)
