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


def block_influence(model, ids: list[int]) -> list[float]:
    """ShortGPT's BI_l = 1 - mean_t cos(h_in, h_out) of each decoder layer, from torch forward hooks."""
    import torch

    seen = {}

    def hook(index):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            seen[index] = (h_in, output[0] if isinstance(output, tuple) else output)
        return record

    layers = model.model.layers
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    cos = torch.nn.functional.cosine_similarity
    return [float(1 - cos(seen[i][0][0].double(), seen[i][1][0].double(), dim=-1).mean()) for i in range(len(layers))]


def drop_layers(model, drop: list[int]) -> None:
    """Remove decoder layers from a torch llama in place, renumbering the kept ones for the KV cache."""
    import torch

    kept = [layer for i, layer in enumerate(model.model.layers) if i not in set(drop)]
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
