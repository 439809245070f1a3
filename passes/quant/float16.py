"""`convert_float16`: the graph in float16, for GPU execution providers (the `fp16` and `int4-cuda` recipes).

The conversion is ONNX Runtime's own (`onnxruntime.transformers.float16.convert_float_to_float16`, what ORT's
transformer optimizer and genai's builder use): float initializers, activations, graph inputs and outputs become
float16, a Cast is inserted where a kept-float32 node meets a float16 one, and initializers are clamped to the
float16 range. What this pass adds is the choice of what stays float32, from what ORT's kernels expect:
- GroupQueryAttention: q/k/v, the KV cache and the cos/sin caches all float16 (its CUDA kernel requires cos/sin of
  q's type); the subgraph that computes the rotary angles (positions x inverse frequencies, Cos, Sin) stays
  float32 and is cast after Cos/Sin: positions above 2048 are not even integers in float16, and the angles of a
  long context would be wrong. (After the cuda lowering those caches are constants, computed in float32.)
- SkipSimplifiedLayerNormalization / SimplifiedLayerNormalization: float16 in and out, gamma float16; ORT
  accumulates in float32 (stash_type 1).
- MatMulNBits: float16 activations and scales (its CUDA kernel's T1; 4 and 8 bits, with or without zero points).
- The KV cache is float16 (half the bytes of a decode step's cache reads) and so are the logits (what the LM head
  computes; the runtime widens only the rows it reads to float32).
- ORT's default list of ops without float16 kernels (Range, TopK, CumSum, Min, Max, ...) stays float32.

Input: a decoder graph (lowered, quantized or not). Guarantees: every float tensor the model computes with is
float16 except the blocked ones above; inputs and outputs keep their names. Lossy: the manager reports PPL and
the probe's logit drift against the graph before. Where the probe runs on ORT's CPU EP, MatMul (and other ops
without a CPU float16 kernel) is computed in float32 between casts, which ORT inserts; the pass records which ops
those were (`probe_float32_ops`), so the report says what its numbers measured.
"""

from __future__ import annotations

from collections import Counter

from onnxlm.passes.base import FOLDED, Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.quant.linears import drop_unused, initializer_bytes
from onnxlm.passes.quant.weight_only import replace_graph

def rotary_angle_nodes(graph) -> list:
    """The float nodes that compute the rotary cos/sin: every Cos and Sin and, through their float inputs, the
    nodes they are computed from, up to the Cast that turns the integer positions into floats (integer and shape
    computations stay as they are). On a lowered graph these make GroupQueryAttention's cos/sin caches (none when
    the caches are constants); on the plain export they feed the rotate-half Muls."""
    import onnx_ir as ir

    found, stack = {}, [n for n in graph if n.op_type in ("Cos", "Sin")]
    while stack:
        node = stack.pop()
        if node is None or id(node) in found:
            continue
        found[id(node)] = node
        if node.op_type != "Cast":
            stack.extend(v.producer() for v in node.inputs if v is not None and v.dtype == ir.DataType.FLOAT)
    return list(found.values())


def is_cast(node, to) -> bool:
    return node is not None and node.op_type == "Cast" and node.attributes["to"].as_int() == to


def keep_float32_between(graph, blocked: set[str], originals: dict) -> int:
    """ORT's converter casts every edge of a blocked (float32) node to float16 and back, also between two blocked
    nodes and from a float32 initializer: the rotary angles would still pass through float16. Rewire those edges
    to the float32 value itself (`originals`: the float32 initializers by name, from before the conversion).
    Returns the edges rewired."""
    import onnx_ir as ir

    rewired = 0
    for node in [n for n in graph if n.name in blocked]:
        for i, value in enumerate(node.inputs):
            widen = value.producer() if value is not None else None
            if not is_cast(widen, ir.DataType.FLOAT):
                continue
            narrowed = widen.inputs[0]
            narrow = narrowed.producer()
            if is_cast(narrow, ir.DataType.FLOAT16) and narrow.inputs[0].producer() is not None \
                    and narrow.inputs[0].producer().name in blocked:
                node.replace_input_with(i, narrow.inputs[0])  # blocked -> blocked: float32 throughout
            elif narrow is None and narrowed.name in originals:
                node.replace_input_with(i, add_initializer(graph, f"{narrowed.name}.float32", originals[narrowed.name]))
            else:
                continue
            rewired += 1
    return rewired


def cpu_float32_ops(path, scratch) -> dict[str, int]:
    """Op types that ORT's CPU EP runs in float32 in the float16 graph at `path`: those its InsertCastTransformer
    put between its casts (read from the optimized graph ORT writes)."""
    import onnx
    import onnxruntime as ort

    optimized = scratch / "float16.cpu-optimized.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     "float16.cpu-optimized.onnx.data")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized), load_external_data=False).graph

    def inserted(node, to) -> bool:
        return node.name.startswith("InsertedPrecisionFreeCast_") and any(
            a.name == "to" and a.i == to for a in node.attribute)

    # the float32 regions ORT made: from its widening casts to its narrowing ones (the graph is sorted)
    wide, counts = set(), Counter()
    for node in graph.node:
        if inserted(node, onnx.TensorProto.FLOAT):
            wide.update(node.output)
        elif wide & set(node.input) and not inserted(node, onnx.TensorProto.FLOAT16):
            wide.update(node.output)
            counts[node.op_type] += 1
    for leftover in scratch.glob("float16.cpu-optimized.onnx*"):
        leftover.unlink()
    return dict(sorted(counts.items()))


class ConvertFloat16(Pass):
    """Float16 weights, activations, KV cache and logits (ORT's converter), rotary angles kept float32."""

    name = "convert_float16"
    requires = (FOLDED,)
    lossless = False

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir
        import onnx_ir.passes.common as common
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        ir.external_data.load_to_model(model)  # ORT's converter reads a proto with every tensor inline
        size_before = initializer_bytes(model.graph)
        blocked = rotary_angle_nodes(model.graph)
        originals = {v.name: v.const_value.numpy() for n in blocked for v in n.inputs
                     if v is not None and v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT}
        proto = convert_float_to_float16(ir.to_proto(model), keep_io_types=False, disable_shape_infer=True,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST,
                                         node_block_list=[n.name for n in blocked])
        replace_graph(model, ir.from_proto(proto))
        rewired = keep_float32_between(model.graph, {n.name for n in blocked}, originals)
        drop_unused(model)
        common.TopologicalSortPass()(model)  # the converter appends the casts it puts on graph inputs
        halves = sum(1 for v in model.graph.initializers.values()
                     if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16)
        ctx.metrics.update({"bytes_before": size_before, "bytes_after": initializer_bytes(model.graph),
                            "kept_float32": dict(Counter(n.op_type for n in blocked))})
        if ctx.probe is None or ctx.probe.device == "cpu":
            path = ctx.scratch / "float16.onnx"
            ir.save(model, path, external_data="float16.onnx.data")
            ctx.metrics["probe_float32_ops"] = cpu_float32_ops(path, ctx.scratch)
        notes = [f"rotary angles kept in float32 ({len(blocked)} nodes, {rewired} edges)"] if blocked else []
        return halves > 0, {"float16_initializers": halves}, notes
