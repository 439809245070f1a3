"""The residual stream of a llama-style decoder graph (plain and lowered), and removing whole layers from it.

In the exported graph the stream is a chain of Adds: the embedding Gather's output r_0 (times a constant, where
the family scales its embedding), then for layer l
r_{2l+1} = r_{2l} + attention(...) and r_{2l+2} = r_{2l+1} + mlp(...). Each r is read by its RMSNorm (Pow, Mul)
and by exactly one Add, the next residual sum, which is how the chain is found without relying on node names.
"""

from __future__ import annotations

from onnxlm.errors import OnnxlmError

KV_KINDS = ("key", "value")


def residual_stream(graph, num_layers: int) -> list:
    """[r_0, ..., r_2L]: the values entering each sub-block, r_2L the last layer's output."""
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    gathers = [u.node for u in ids.uses() if u.node.op_type == "Gather"] if ids is not None else []
    if len(gathers) != 1:
        raise OnnxlmError("cannot find the embedding Gather of input_ids: remove_layers needs the plain export")
    stream = [gathers[0].outputs[0]]
    uses = stream[0].uses()
    if len(uses) == 1 and uses[0].node.op_type == "Mul" and any(  # a scaled embedding (Gemma, Granite) starts it
            v is not None and v.const_value is not None for v in uses[0].node.inputs):
        stream = [uses[0].node.outputs[0]]
    while True:
        adds = [u.node for u in stream[-1].uses() if u.node.op_type == "Add"]
        if len(adds) != 1:
            break
        stream.append(adds[0].outputs[0])
    if len(stream) != 2 * num_layers + 1:
        raise OnnxlmError(
            f"found {len(stream) - 1} residual additions, expected {2 * num_layers} for {num_layers} layers: "
            "remove_layers runs on the plain export, before the lowering passes fuse the residual adds"
        )
    return stream


def remove_layers(model, num_layers: int, drop: list[int]) -> None:
    """Bypass the layers `drop` (their output residual is replaced by their input), delete their KV inputs and
    outputs, drop the dead nodes, and renumber the remaining KV names 0..L-len(drop)-1."""
    import onnx_ir.passes.common as common

    graph = model.graph
    stream = residual_stream(graph, num_layers)
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


def fused_residual_chain(graph) -> list:
    """The lowered graph's SkipSimplifiedLayerNormalization nodes along the residual stream, in order: 2 per
    layer, node 2l adds layer l's attention output, node 2l+1 its MLP output (and normalizes for the next block);
    output 3 is the stream after the addition."""
    chain = []
    node = next((n for n in graph if n.op_type == "SimplifiedLayerNormalization"), None)
    stream = node.inputs[0] if node is not None else None
    while stream is not None:
        nxt = [u.node for u in stream.uses() if u.node.op_type == "SkipSimplifiedLayerNormalization" and u.idx == 1]
        if len(nxt) != 1:
            break
        chain.append(nxt[0])
        stream = nxt[0].outputs[3] if len(nxt[0].outputs) > 3 else None
    return chain
