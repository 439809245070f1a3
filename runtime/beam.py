"""Beam search, step for step the algorithm of transformers' `generate(num_beams=...)` (v4.57, batch 1), in numpy.

Each step scores every (beam, token) continuation by its accumulated log-probability, keeps the best
2 * num_beams (more with several EOS ids, so that num_beams stay alive after some finish), moves the ones that end
in EOS or reach max length into a pool of finished hypotheses (scored by sum log p / generated_length **
length_penalty), and continues the best num_beams unfinished ones. The KV cache rows are reordered in place on
the shared buffer to follow their beams. float32 throughout, as in transformers, so ties break the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.execution import check_lengths
from onnxlm.runtime.session import DecoderSession

NEG = np.float32(-1.0e9)  # transformers' "impossible" score


@dataclasses.dataclass
class BeamResult:
    tokens: list[int]  # the best finished hypothesis, EOS included if it ended on one
    score: float  # its length-penalised log-probability


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)


def top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first."""
    part = np.argpartition(-values, k - 1)[:k]
    return part[np.argsort(-values[part], kind="stable")]


def beam_search(
    model: DecoderSession,
    prompt_ids: list[int],
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_ids: tuple[int, ...] = (),
) -> BeamResult:
    check_lengths(model, prompt_ids, max_new_tokens)
    if num_beams < 1:
        raise OnnxlmError(f"num_beams must be at least 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise OnnxlmError(f"early_stopping must be true, false or 'never', got {early_stopping!r}")
    vocab = model.info.vocab_size
    keep = max(2, 1 + len(eos_ids)) * num_beams  # candidates per step
    prompt_len, max_length = len(prompt_ids), len(prompt_ids) + max_new_tokens
    eos = np.asarray(eos_ids, np.int64)

    running = np.zeros((num_beams, 0), np.int64)  # (beams, generated) tokens of the live beams
    running_scores = np.full(num_beams, NEG, np.float32)
    running_scores[0] = 0.0  # all beams start equal: only the first may expand at step one
    done_tokens: list[list[int]] = [[] for _ in range(num_beams)]
    done_scores = np.full(num_beams, NEG, np.float32)
    done = np.zeros(num_beams, bool)
    can_improve = True

    cache = model.new_cache(batch=num_beams, capacity=max_length)
    prompt = np.tile(np.asarray([prompt_ids], np.int64), (num_beams, 1))  # (beams, prompt)
    logits = model.step(prompt, cache, last_only=True)[:, -1]  # (beams, vocab)
    for cur_len in range(prompt_len, max_length):
        scores = log_softmax(logits) + running_scores[:, None]  # (beams, vocab)
        best = top(scores.reshape(-1), keep)  # (keep,)
        cand_scores = scores.reshape(-1)[best]
        cand_beam, cand_token = best // vocab, best % vocab
        cand_seqs = np.concatenate([running[cand_beam], cand_token[:, None]], axis=1)  # (keep, generated + 1)
        hits = np.isin(cand_token, eos) | (cur_len + 1 >= max_length)  # (keep,) the candidate is finished

        # The best num_beams unfinished candidates continue.
        live_scores = cand_scores + hits.astype(np.float32) * NEG
        nxt = top(live_scores, num_beams)
        running, running_scores, source = cand_seqs[nxt], live_scores[nxt], cand_beam[nxt]

        # Finished candidates among the top num_beams join the pool if they beat its worst.
        final = cand_scores / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        if done.all() and early_stopping is True:
            final = final + NEG
        if not can_improve:
            final = final + NEG
        just_done = hits & (np.arange(keep) < num_beams)
        final = final + (~just_done).astype(np.float32) * NEG
        merged_scores = np.concatenate([done_scores, final])
        merged_tokens = done_tokens + [s.tolist() for s in cand_seqs]
        merged_done = np.concatenate([done, just_done])
        pick = top(merged_scores, num_beams)
        done_scores, done = merged_scores[pick], merged_done[pick]
        done_tokens = [merged_tokens[i] for i in pick]

        # transformers' early-stop heuristic: can a live beam still beat the worst finished one?
        length = (max_length if early_stopping == "never" and length_penalty > 0 else cur_len + 1) - prompt_len
        best_possible = running_scores[0] / np.float32(length**length_penalty)
        worst_done = np.where(done, done_scores.min(), NEG)
        can_improve = can_improve and bool(np.any(best_possible > worst_done))
        if not can_improve or (done.all() and early_stopping is True) or hits.all():
            break
        cache.reorder(source)
        logits = model.step(running[:, -1:], cache)[:, -1]  # (beams, vocab)
    return BeamResult(done_tokens[0], float(done_scores[0]))
