"""transformers as the reference: logits, greedy tokens and perplexity computed with torch."""

from __future__ import annotations

import math

import numpy as np


def torch_logits(model, ids: list[int]) -> np.ndarray:
    """Full-sequence logits (seq, vocab) from one forward pass."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def torch_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )
    return out[0, len(ids):].tolist()


def torch_perplexity(model, ids: list[int], window: int) -> float:
    """Same definition as onnxlm eval: non-overlapping windows, each from an empty cache."""
    import torch

    nll, scored = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        scored += len(chunk) - 1
    return math.exp(nll / scored)
