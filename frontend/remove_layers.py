"""Remove decoder layers from a torch llama-family model, chosen by ShortGPT's Block Influence (arXiv 2403.03853).

BI_l = 1 - mean over tokens of cos(h_in, h_out) of layer l on calibration text: a layer that barely turns the
residual stream matters least. Used to build an artifact's self-speculation draft (`optimize --self-draft-layers`).
"""

from __future__ import annotations

import dataclasses

from onnxlm.errors import OnnxlmError
from onnxlm.model_info import ModelInfo


def block_influence(model, ids: list[int], max_tokens: int = 1024) -> list[float]:
    """One BI value per decoder layer, from one forward pass over the first `max_tokens` of `ids`."""
    import torch

    layers = model.model.layers
    seen: dict[int, tuple] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            seen[index] = (h_in, h_out)
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(torch.tensor([ids[:max_tokens]]))
    finally:
        for h in handles:
            h.remove()
    cos = torch.nn.functional.cosine_similarity
    return [float(1 - cos(seen[i][0][0].double(), seen[i][1][0].double(), dim=-1).mean()) for i in range(len(layers))]


def least_influential(influence: list[float], count: int) -> list[int]:
    if not 0 < count < len(influence):
        raise OnnxlmError(f"can remove 1 to {len(influence) - 1} of {len(influence)} layers, not {count}")
    return sorted(sorted(range(len(influence)), key=lambda i: influence[i])[:count])


def remove_layers(model, info: ModelInfo, drop: list[int]) -> ModelInfo:
    """Drop the layers `drop` in place; the kept layers are renumbered for the KV cache. Returns the new info."""
    import torch

    kept = [layer for i, layer in enumerate(model.model.layers) if i not in set(drop)]
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in set(drop)]
    return dataclasses.replace(info, num_layers=len(kept))
