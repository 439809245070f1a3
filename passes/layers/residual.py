"""Removing whole decoder layers from the residual stream (passes/decoder_structure.py finds it).

Layer l maps r_{2l} to r_{2l+2}; bypassing it replaces every use of r_{2l+2} by r_{2l}, which leaves its nodes
dead, and its KV inputs and outputs go with them.
"""

from __future__ import annotations

from onnxlm.passes.decoder_structure import find_decoder

KV_KINDS = ("key", "value")


def remove_layers(model, info, drop: list[int]) -> None:
    """Bypass the layers `drop` (their output residual is replaced by their input), delete their KV inputs and
    outputs, drop the dead nodes, and renumber the remaining KV names 0..L-len(drop)-1."""
    import onnx_ir.passes.common as common

    graph, num_layers = model.graph, info.num_layers
    stream = find_decoder(graph, info).stream
    for layer in sorted(drop, reverse=True):  # from the top, so r_{2l} is still the stream value when used
        stream[2 * layer + 2].replace_all_uses_with(stream[2 * layer])
    inputs = {v.name: v for v in graph.inputs}
    kept = [i for i in range(num_layers) if i not in set(drop)]
    for layer in drop:
        for kind in KV_KINDS:
            out = next(v for v in graph.outputs if v.name == f"present.{layer}.{kind}")
            graph.outputs.remove(out)
    common.RemoveUnusedNodesPass()(model)
    for layer in drop:
        for kind in KV_KINDS:
            past = inputs[f"past_key_values.{layer}.{kind}"]
            # A shared computation (the past length for the mask) may read any layer's past: read a kept one.
            past.replace_all_uses_with(inputs[f"past_key_values.{kept[0]}.{kind}"])
            graph.inputs.remove(past)
    outputs = {v.name: v for v in graph.outputs}
    for new, old in enumerate(kept):  # old >= new, and increasing: renaming in order never collides
        for kind in KV_KINDS:
            inputs[f"past_key_values.{old}.{kind}"].name = f"past_key_values.{new}.{kind}"
            outputs[f"present.{old}.{kind}"].name = f"present.{new}.{kind}"
