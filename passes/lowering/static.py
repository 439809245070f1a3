"""`static_kv`: the NPU-class form: a prefill graph of P tokens and a decode graph of 1, on a C-slot KV cache.

NPU execution providers (OpenVINO's NPU, QNN's HTP, VitisAI) compile a graph for fixed shapes and run no dynamic
control flow and no com.microsoft LLM ops (GroupQueryAttention). So this pass starts from the portable graph (the
plain export after cleanup, optionally QDQ-quantized) and, when the artifact is written, specializes it twice
(`write_pair`): every input gets a fixed shape, the present outputs become the new tokens' K/V only (the runtime
copies them into the cache, as onnxruntime-genai does for its static QNN models), and onnxscript's optimizer folds
every Shape computation away. The two graphs reference the weights in model.onnx.data, so the artifact stores
them once. The layout is static_layout.py's.

Why the plain graph and not GroupQueryAttention: the export's attention already takes an attention mask and
position_ids, so padding slots and padded chunk tokens are masked by the graph's own mask logic (a padded batch,
as transformers builds it), and the K/V update needs no ScatterND. GQA would tie the form to ORT's CPU/CUDA op.

The pass itself leaves the graph's computation as it is (model.onnx stays the dynamic graph, which the CPU
runtime and onnxruntime-genai still run): it records the static shape in the graph's metadata, refuses what a
static graph cannot hold (If/Loop/Scan, ORT-only ops, extra inputs, sliding windows), and checks the pair: onnx
shape inference must give every value a fully static shape, and a chunked prefill (a full chunk and a padded
one) followed by decode steps must give the dynamic graph's logits within the lossless tolerance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, FUSED, PLAIN, UNSLICED_HEAD, Pass, PassContext
from onnxlm.static_layout import DECODE_FILE, METADATA_KEY, PREFILL_FILE, StaticFeeds, StaticShape, static_step

CONTROL_FLOW = {"If", "Loop", "Scan"}
ORT_OPS_ALLOWED = {"QuantizeLinear", "DequantizeLinear"}  # com.microsoft ops a static graph may keep (16-bit QDQ)
DECODER_INPUTS = {"input_ids", "attention_mask", "position_ids"}


@dataclasses.dataclass
class StaticOptions:
    context_length: int = 2048  # C: KV cache slots
    prefill_chunk: int = 128  # P: tokens per prefill call


class StaticKV(Pass):
    name = "static_kv"
    Options = StaticOptions
    requires = (FOLDED, UNSLICED_HEAD)  # constants folded, the LM head on every row of a chunk
    excludes = (FUSED,)  # GroupQueryAttention is an ORT op that NPU EPs do not run: the portable graph
    # The pair is specialized from the final graph: nothing that needs a graph form may change it afterwards.
    removes = (PLAIN, FLOAT_WEIGHTS, UNSLICED_HEAD)

    def validate(self) -> None:
        c, p = self.options.context_length, self.options.prefill_chunk
        if c < 2 or not 1 <= p <= c:
            raise OnnxlmError(f"static_kv: context_length must be >= 2 and prefill_chunk in 1..context_length, "
                              f"got {c} and {p}")

    def check_fits(self, info) -> None:
        if self.options.context_length > info.context_length:
            raise OnnxlmError(f"static_kv: context_length {self.options.context_length} exceeds the model's "
                              f"context length {info.context_length}")
        if info.sliding_window:
            raise OnnxlmError("static_kv: models with sliding-window layers are not supported yet (the static "
                              "cache's slots are not positions)")
        if info.moe:
            raise OnnxlmError(f"static_kv: this {info.architecture} model's mixture-of-experts blocks export as "
                              "com.microsoft::MoE, which NPU execution providers do not run; static artifacts of "
                              "MoE models are not supported yet")

    def features(self) -> list[str]:
        return ["static"]

    @property
    def shape(self) -> StaticShape:
        return StaticShape(self.options.context_length, self.options.prefill_chunk)

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        refuse_dynamic(model.graph)
        model.metadata_props[METADATA_KEY] = json.dumps(self.shape.to_dict())
        where = ctx.scratch / "static"
        where.mkdir(parents=True, exist_ok=True)
        ir.save(model, where / "model.onnx", external_data="model.onnx.data")
        paths = write_pair(where / "model.onnx", self.shape, ctx.info)
        for path in paths.values():
            not_static = non_static_values(path)
            if not_static:
                raise OnnxlmError(f"static_kv: {path.name} has values without a static shape: "
                                  f"{', '.join(not_static[:3])}")
        c, p = self.shape.context_length, self.shape.prefill_chunk
        notes = [f"{PREFILL_FILE} ({p} tokens) and {DECODE_FILE} (1 token) on a {c}-slot cache are written with the "
                 f"artifact, sharing model.onnx.data"]
        diff, agree, total, scale = compare_with_dynamic(where / "model.onnx", paths, self.shape, ctx)
        bypassed = where / "float" / "model.onnx"
        if without_activation_qdq(where / "model.onnx", bypassed):
            # Rounding makes a QDQ graph discontinuous: fp32 reassociation (the attention over C + S slots instead
            # of S) can flip an activation's rounding, which the layers amplify. The specialization is checked with
            # the activation Q/DQ pairs bypassed (it commutes with them); the quantized pair's own agreement is
            # recorded.
            ctx.metrics.update({"static_qdq_max_abs_logit_diff": diff, "static_qdq_argmax_agreement": agree})
            notes.append(f"checked with the activation Q/DQ pairs bypassed; with them, the pair's argmax agrees with "
                         f"the dynamic graph's on {agree:.1%} of {total} tokens (max |dlogit| {diff:.3g})")
            diff, agree, total, scale = compare_with_dynamic(bypassed, write_pair(bypassed, self.shape, ctx.info),
                                                             self.shape, ctx)
        bound = self.atol + self.rtol * scale
        if not diff <= bound:
            raise OnnxlmError(f"static_kv: the static graphs moved the logits by {diff:.3g} (> {bound:.3g}) from "
                              f"the dynamic graph")
        ctx.metrics.update({"static_max_abs_logit_diff": diff, "static_tolerance": bound,
                            "static_tokens_checked": total})
        return True, {"graphs": 2}, notes


def refuse_dynamic(graph) -> None:
    """One-line errors for what a static graph cannot hold."""
    ops = {n.op_type for n in graph}
    flow = sorted(ops & CONTROL_FLOW)
    if flow:
        raise OnnxlmError(f"static_kv: the graph has dynamic control flow ({', '.join(flow)}, e.g. La RoSA's "
                          f"topk_sparsify): NPU-class graphs take none; build without --sparsity")
    ort_only = sorted({f"{n.domain}::{n.op_type}" for n in graph if n.domain not in ("", "ai.onnx")
                       and n.op_type not in ORT_OPS_ALLOWED})
    if ort_only:
        raise OnnxlmError(f"static_kv: the graph has ORT-only ops ({', '.join(ort_only)}) that NPU execution "
                          f"providers do not run: start from the portable graph (recipe static)")
    extra = [v.name for v in graph.inputs if v.name not in DECODER_INPUTS and not v.name.startswith("past_key_values.")]
    if extra:
        raise OnnxlmError(f"static_kv: the graph has inputs beyond a decoder's own ({', '.join(extra)}); a static "
                          f"graph takes none")


def specialize(model_path: Path, shape: StaticShape, seq: int, info):
    """model.onnx (dynamic) -> an onnx_ir.Model with `seq` new tokens on a C-slot cache, present = new K/V only.
    Its weights stay references into model.onnx's external data."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript

    model = ir.load(model_path)
    graph = model.graph
    c, kv, hd = shape.context_length, info.num_kv_heads, info.head_dim
    dims = {"input_ids": [1, seq], "position_ids": [1, seq], "attention_mask": [1, c + seq]}
    for value in graph.inputs:
        value.shape = ir.Shape(dims.get(value.name, [1, kv, c, hd]))
    for node in graph:  # forget the symbolic shapes: the optimizer infers the static ones
        for value in node.outputs:
            value.shape = None
    for i, output in enumerate(list(graph.outputs)):
        if output.name == "logits":
            output.shape = ir.Shape([1, seq, info.vocab_size])
            continue
        concat = output.producer()
        past = output.name.replace("present.", "past_key_values.")
        if concat is None or concat.op_type != "Concat" or concat.inputs[0] is None or concat.inputs[0].name != past:
            raise OnnxlmError(f"static_kv: {output.name} is not the Concat of {past} and the new K/V")
        new, name = concat.inputs[1], output.name
        output.name = f"{name}.all"
        new.name = name
        new.shape = ir.Shape([1, kv, seq, hd])
        graph.outputs[i] = new
    drop_nan_guards(graph)
    onnxscript.optimizer.optimize(model)
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
    return model


def drop_nan_guards(graph) -> int:
    """Where(IsNaN(p), 0, p) on a Softmax's p -> p: the export's guard for an attention row whose every key is
    masked (a left-padded batch row). The static runtime's mask always leaves a row its real tokens (a padded
    chunk's padding comes last, and causality lets it see the real tokens before it), so the guard never fires;
    and OpenVINO's EP does not take IsNaN: with it, each layer's guard ran on the CPU EP between 31 OpenVINO
    subgraphs. The pair's check against the dynamic graph (which keeps the guard) covers the removal."""
    import onnx_ir as ir

    removed = 0
    for node in list(graph):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
            continue
        condition, fill, probs = node.inputs
        isnan = condition.producer() if condition is not None else None
        softmax = probs.producer() if probs is not None else None
        zero = ir.convenience.get_const_tensor(fill) if fill is not None else None
        if (isnan is None or isnan.op_type != "IsNaN" or isnan.inputs[0] is not probs or softmax is None
                or softmax.op_type != "Softmax" or zero is None or np.any(zero.numpy() != 0)):
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], probs)
        removed += 1
    return removed


def write_pair(model_path: Path, shape: StaticShape, info) -> dict[str, Path]:
    """Write prefill.onnx and decode.onnx beside `model_path`, referencing its external data (weights once)."""
    import onnx
    import onnx_ir as ir

    paths = {}
    for name, seq in ((PREFILL_FILE, shape.prefill_chunk), (DECODE_FILE, 1)):
        static = specialize(model_path, shape, seq, info)
        static.metadata_props.pop(METADATA_KEY, None)
        paths[name] = model_path.parent / name
        onnx.save(ir.to_proto(static), paths[name])  # initializers loaded from model.onnx.data stay references
    return paths


def non_static_values(path: Path) -> list[str]:
    """Values of the graph at `path` whose shape onnx shape inference does not know as fully static."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    known = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        known[vi.name] = t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)
    return [out for node in inferred.graph.node for out in node.output if out and not known.get(out, False)]


def without_activation_qdq(model_path: Path, out_path: Path) -> bool:
    """Write the graph at `model_path` to `out_path` with each activation's QuantizeLinear -> DequantizeLinear pair
    bypassed (the DequantizeLinear's readers read the float input); False, writing nothing, if it has none."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    model = ir.load(model_path)
    graph, bypassed = model.graph, 0
    for q in [n for n in graph if n.op_type == "QuantizeLinear"]:
        for dq, _ in list(q.outputs[0].uses()):
            if dq.op_type != "DequantizeLinear":
                continue
            out, x = dq.outputs[0], q.inputs[0]
            if out.is_graph_output():  # e.g. quantized logits: the float input takes the output's name
                index, name = graph.outputs.index(out), out.name
                out.name = f"{name}.dequantized"
                x.name = name
                graph.outputs[index] = x
            else:
                out.replace_all_uses_with(x)
            bypassed += 1
    if not bypassed:
        return False
    common.RemoveUnusedNodesPass()(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, out_path, external_data=out_path.name + ".data")
    return True


def compare_with_dynamic(model_path: Path, paths: dict[str, Path], shape: StaticShape, ctx: PassContext
                         ) -> tuple[float, float, int, float]:
    """Logits of the static pair (a full prefill chunk, a padded one, then decode steps) against one forward of
    the dynamic graph over the same tokens: (max abs difference, argmax agreement, tokens, max |logit|)."""
    from onnxlm.passes.evaluate import feeds_for, open_session

    c, p = shape.context_length, shape.prefill_chunk
    total = min(c, p + max(1, p // 2) + 4)
    decode = min(4, total - 1)
    tokens = np.random.default_rng(0).integers(0, ctx.info.vocab_size, total)
    # As written: ORT's extended CPU fusions turn a blocked or per-channel DequantizeLinear + MatMul into MatMulNBits
    # with int8 activations for some shapes and not others (on SmolLM2's int4 pair that alone moved the logits by
    # 2.5); the check is of the graphs, not of those fusions.
    dynamic = open_session(model_path, backend=ctx.probe, as_written=True)
    reference = dynamic.run(["logits"], feeds_for(dynamic, ctx.info, tokens[None], 0, None))[0][0]  # (T, vocab)
    sessions = {p: open_session(paths[PREFILL_FILE], backend=ctx.probe, as_written=True),
                1: open_session(paths[DECODE_FILE], backend=ctx.probe, as_written=True)}
    feeds = {size: StaticFeeds(c, size) for size in sessions}
    names = [o.name for o in sessions[1].get_outputs()]  # logits, present.* (same order in both graphs)
    cache = [np.zeros((1, ctx.info.num_kv_heads, c, ctx.info.head_dim), np.float32) for _ in names[1:]]

    def run(size: int):
        session = sessions[size]
        pasts = {n.replace("present.", "past_key_values."): a for n, a in zip(names[1:], cache)}
        out = session.run(names, {**feeds[size].as_dict(), **pasts})
        return out[0], out[1:]

    prefill = total - decode
    steps = [tokens[i : min(i + p, prefill)] for i in range(0, prefill, p)]  # the last chunk padded
    steps += [tokens[i : i + 1] for i in range(prefill, total)]  # decode steps
    logits, length = [], 0
    for chunk in steps:
        logits.append(static_step(run, feeds, cache, chunk, length, length, p))
        length += len(chunk)
    got = np.concatenate(logits)
    agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
    return float(np.abs(got - reference).max()), agree, int(total), float(np.abs(reference).max())
