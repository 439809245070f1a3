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


def halting_logits(model, ids: list[int], threshold: float, min_layer: int, skip_kv: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """QuickSilver token halting computed layer by layer in torch: (logits (seq, vocab), halted (layers, seq)).

    Before layer l >= min_layer a token (not the first) halts for good when ||r_l - r_{l-1}|| / ||r_{l-1}|| <
    threshold; a halted token keeps its residual, and (skip_kv) its keys are masked out of the layers it skips."""
    import torch

    inner = model.model
    with torch.no_grad():
        x = torch.tensor([ids])
        seq = len(ids)
        h = inner.embed_tokens(x)  # (1, seq, hidden)
        position_ids = torch.arange(seq)[None]
        rotary = inner.rotary_emb(h, position_ids)
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        halted, previous, record = torch.zeros(seq, dtype=torch.bool), None, []
        for layer_index, layer in enumerate(inner.layers):
            if layer_index >= min_layer:
                drift = (h - previous).norm(dim=-1)[0] / previous.norm(dim=-1)[0]
                halted = halted | ((drift < threshold) & (position_ids[0] > 0))
            record.append(halted.clone())
            visible = causal & ~halted[None, :] if skip_kv else causal
            mask = torch.where(visible, 0.0, -1e9)[None, None]  # (1, 1, seq, seq)
            out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
            out = out[0] if isinstance(out, tuple) else out
            previous, h = h, torch.where(halted[None, :, None], h, out)
        logits = model.lm_head(inner.norm(h))[0]
    return logits.numpy(), torch.stack(record).numpy()


def exit_reference(model, ids: list[int], layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(full logits (seq, vocab), logits of the exit after `layer` layers: final norm + head on that stream,
    drift ||r_layer - r_{layer-1}|| / ||r_{layer-1}|| (seq,)), from transformers' hidden states."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        states = out.hidden_states  # embeddings, then each layer's output (the last one already normed)
        exit_logits = model.lm_head(model.model.norm(states[layer]))[0]
        drift = (states[layer] - states[layer - 1]).norm(dim=-1)[0] / states[layer - 1].norm(dim=-1)[0]
    return out.logits[0].numpy(), exit_logits.numpy(), drift.numpy()
