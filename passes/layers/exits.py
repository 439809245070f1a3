"""Dynamic early exit (AdaInfer, arXiv 2403.02181): one exit after layer k, exposed by the graph, taken by the
runtime (runtime/early_exit.py).

The `early_exit` pass (lossless) adds two outputs to the lowered graph:
- `exit_hidden` (batch, seq, hidden): the residual stream r_k after layer k-1;
- `exit_drift` (batch, seq): ||r_k - r_{k-1}|| / ||r_{k-1}||, how much layer k-1 moved the stream. This is the
  exit signal: it costs two norms, where an LM-head signal (AdaInfer's gap / top-prob) costs as much as about 8
  of SmolLM2's layers.
`split_at_exit` cuts such a graph into the segments the runtime runs in decode, written to the artifact's
`exits/` directory:
- `lower`: input_ids, position_ids, the KV of layers < k -> exit_hidden, exit_drift, their presents;
- `upper`: `hidden` (batch, seq, hidden), position_ids, the KV of layers >= k -> logits, their presents;
- `head`: `hidden` -> logits (the final norm and the LM head).
KV names stay those of the full graph, so the segments bind the same cache buffers as model.onnx.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.artifact import EXIT_DRIFT as DRIFT
from onnxlm.artifact import EXIT_HIDDEN as HIDDEN
from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FUSED, Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.decoder_structure import SKIP_NORM, find_decoder


@dataclasses.dataclass
class EarlyExitOptions:
    layer: int = 20  # the exit: after layers 0..layer-1


class EarlyExit(Pass):
    name = "early_exit"
    requires = (FUSED,)
    Options = EarlyExitOptions

    def features(self):
        return ["early_exit"]  # the artifact's exits/ segments (runtime/early_exit.py)

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        graph, k = model.graph, self.options.layer
        if not 1 <= k < ctx.info.num_layers:
            raise OnnxlmError(f"early_exit layer must be in 1..{ctx.info.num_layers - 1}, got {k}")
        decoder = find_decoder(graph, ctx.info)
        after, before = decoder.attn(k).stream_in, decoder.attn(k - 1).stream_in  # r entering layers k and k-1
        axis = add_initializer(graph, "early_exit.axis", np.array([-1], np.int64))
        nodes = [ir.node("Sub", [after, before])]
        nodes.append(ir.node("ReduceL2", [nodes[-1].outputs[0], axis], attributes={"keepdims": 0}))
        nodes.append(ir.node("ReduceL2", [before, axis], attributes={"keepdims": 0}))
        nodes.append(ir.node("Div", [nodes[1].outputs[0], nodes[2].outputs[0]]))
        graph.extend(nodes)
        drift = nodes[-1].outputs[0]
        drift.name, drift.dtype, drift.shape = DRIFT, ir.DataType.FLOAT, ir.Shape(["batch", "seq"])
        hidden = ir.node("Identity", [after]).outputs[0]
        graph.append(hidden.producer())
        hidden.name, hidden.dtype = HIDDEN, ir.DataType.FLOAT
        hidden.shape = ir.Shape(["batch", "seq", ctx.info.hidden_size])
        graph.outputs.extend([hidden, drift])
        graph.sort()
        return True, {"exits": 1}, [f"exit after layer {k - 1} of {ctx.info.num_layers}"]


def has_exit(model) -> bool:
    return any(v.name == HIDDEN for v in model.graph.outputs)


def split_at_exit(model, info) -> dict:
    """{"lower", "upper", "head"} -> onnx_ir.Model, cut from a graph with the early_exit outputs."""
    k = exit_layer(model.graph, info)
    return {"lower": _lower(model.clone(), k), "upper": _upper(model.clone(), info, k),
            "head": _head(model.clone(), info)}


def exit_layer(graph, info) -> int:
    """k such that exit_hidden is the stream entering layer k."""
    hidden = next(v for v in graph.outputs if v.name == HIDDEN)
    stream = find_decoder(graph, info).stream
    return stream.index(hidden.producer().inputs[0]) // 2


def _keep_outputs(model, keep) -> None:
    """Make `keep` (predicate on names) the graph's outputs; drop what no longer feeds them, and unused inputs."""
    import onnx_ir.passes.common as common

    graph = model.graph
    for value in [v for v in graph.outputs if not keep(v.name)]:
        graph.outputs.remove(value)
    common.RemoveUnusedNodesPass()(model)
    for value in [v for v in graph.inputs if not v.uses()]:
        graph.inputs.remove(value)


def _kv_layer(name: str) -> int:
    return int(name.split(".")[1])  # present.{l}.key


def _lower(model, k: int):
    _keep_outputs(model, lambda n: n in (HIDDEN, DRIFT) or (n.startswith("present.") and _kv_layer(n) < k))
    return model


def _hidden_input(model, hidden_size):
    import onnx_ir as ir

    value = ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", hidden_size]))
    model.graph.inputs.append(value)
    return value


def _enter_at(model, info, j: int):
    """Make the graph start from a `hidden` input at stream value r_j (r_{2L}: the final norm's input). The join
    that wrote r_j goes: an Add's output becomes `hidden`; a SkipSimplifiedLayerNormalization's sum becomes
    `hidden` and its normalized output a SimplifiedLayerNormalization of `hidden` with its gamma and epsilon."""
    import onnx_ir as ir

    graph = model.graph
    join = find_decoder(graph, info).blocks[j - 1].join
    hidden = _hidden_input(model, info.hidden_size)
    if join.op_type == SKIP_NORM:
        epsilon = join.attributes["epsilon"].value if "epsilon" in join.attributes else 1e-5
        node = ir.node("SimplifiedLayerNormalization", [hidden, join.inputs[2]],
                       attributes={"axis": -1, "epsilon": epsilon, "stash_type": 1})
        graph.append(node)
        join.outputs[0].replace_all_uses_with(node.outputs[0])
        if len(join.outputs) > 3:
            join.outputs[3].replace_all_uses_with(hidden)
    else:
        join.outputs[0].replace_all_uses_with(hidden)


def _upper(model, info, k: int):
    _enter_at(model, info, 2 * k)  # after layer k-1's MLP output is added
    _keep_outputs(model, lambda n: n == "logits" or (n.startswith("present.") and _kv_layer(n) >= k))
    model.graph.sort()
    return model


def _head(model, info):
    _enter_at(model, info, 2 * info.num_layers)  # the last MLP's addition, before the final norm
    _keep_outputs(model, lambda n: n == "logits")
    model.graph.sort()
    return model
