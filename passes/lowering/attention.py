"""GroupQueryAttention with what onnxscript's rule leaves out: the softmax scale, logit soft-capping and a
sliding window.

onnxscript's GQA rule writes GroupQueryAttention without `scale`, `softcap` or `local_window_size` and accepts a
sliding-window causal mask as if it were a plain one (its mask check passes whatever mask it is given): on Gemma 2
(query_pre_attn_scalar, soft-capping, sliding layers), Granite (attention_multiplier) or Mistral (a window) it
would fuse wrongly. This rule is that rule with the three written back: the scale from the SDPA it matched, the
cap from a `cap * tanh(scores / cap)` that `SoftcapSDPA` folded into that SDPA, the window from the family's
description of the layer (ModelInfo.layer_windows); the pass manager's probe, which prefills past the widest
window, checks all three.
"""

from __future__ import annotations

import math
import re

import numpy as np


def _attr(node, name: str):
    attr = node.attributes.get(name)
    return None if attr is None else attr.value


def rules(layer_windows: list[int]):
    """The SDPA rules (soft-capped first, then onnxscript's) and our GQA rule, as onnxscript RewriteRuleSets.
    `layer_windows`: each layer's sliding window (ModelInfo.layer_windows; empty: none)."""
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern
    from onnxscript.rewriter.ort_fusions import gqa as ort_gqa
    from onnxscript.rewriter.ort_fusions.sdpa import SDPA, sdpa_rules

    class SoftcapSDPA(SDPA):
        """transformers' eager attention with soft-capping: Softmax(cap * tanh(scale * q k^T / cap) + mask) v."""

        def pattern(self, op, query, key, value, mask, query_scale, key_scale, qk_scale, cap, uncap):
            scores = op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2]))
            scores = op.Mul(scores, qk_scale)
            capped = op.Mul(op.Tanh(op.Div(scores, cap)), uncap)
            weights = op.Softmax(op.Add(capped, mask), axis=-1)
            return op.MatMul(weights, value)

        def check(self, context, query, key, value, mask, qk_scale, cap, uncap, **_):
            result = pattern.MatchResult()
            scale, softcap = _ir_utils.get_singleton_value(qk_scale), _ir_utils.get_singleton_value(cap)
            if scale is None or softcap is None or _ir_utils.get_singleton_value(uncap) != softcap:
                return result.fail("the scale or the cap is not one constant", [qk_scale, cap, uncap])
            self._scale, self._softcap = float(scale), float(softcap)
            return result

        def rewrite(self, op, query, key, value, mask, **_):
            return op.SDPA(query, key, value, mask, scale=self._scale, softcap=self._softcap, key_format="BHSd",
                           _domain="ai.onnxruntime._fusion")

    class GroupQueryAttention(ort_gqa.GroupQueryAttention):
        def check(self, context, query_BHSDh_rope, mask, **kwargs):
            result = super().check(context, query_BHSDh_rope=query_BHSDh_rope, mask=mask, **kwargs)
            if not result:
                return result
            sdpa = next(u.node for u in query_BHSDh_rope.uses() if u.node.op_type == "SDPA")
            head_dim = query_BHSDh_rope.shape[-1] if query_BHSDh_rope.shape is not None else None
            scale = _attr(sdpa, "scale")
            if scale is not None and isinstance(head_dim, int) and math.isclose(scale, head_dim ** -0.5,
                                                                                 rel_tol=1e-6):
                scale = None
            self._extra = {}
            if scale is not None:
                self._extra["scale"] = float(scale)
            if _attr(sdpa, "softcap"):
                self._extra["softcap"] = float(_attr(sdpa, "softcap"))
            # transformers' mask (And of causal, window and padding terms) is not the one onnxscript's rule
            # parses, and the rule takes any mask: the window comes from the family's description, per layer.
            name = kwargs["past_key"].name if kwargs.get("past_key") is not None else ""
            layer = re.fullmatch(r"past_key_values\.(\d+)\.key", name)
            if layer is None:
                return result.fail("cannot tell the layer of this attention", kwargs.get("past_key"))
            window = layer_windows[int(layer.group(1))] if layer_windows else 0
            if window:
                # transformers' sliding_window and GQA's local_window_size agree (measured: the probe prefills
                # past the window; window - 1 moves the logits).
                self._extra["local_window_size"] = window
            return result

        def rewrite(self, op, **kwargs):
            outputs = super().rewrite(op, **kwargs)
            node = outputs[0].producer()
            for name, value in self._extra.items():
                node.attributes[name] = (ir.AttrFloat32 if isinstance(value, float) else ir.AttrInt64)(name, value)
            return outputs

    sdpa = pattern.RewriteRuleSet([SoftcapSDPA.rule(), *sdpa_rules.rules])
    return sdpa, pattern.RewriteRuleSet([GroupQueryAttention.rule()])


def expand_leftover_sdpa(model) -> int:
    """Write every SDPA that no GQA took back as plain ops (MatMul, scale, cap, mask, Softmax, MatMul): the SDPA
    rule's op lives in onnxscript's scratch domain, which no runtime has. Returns how many were expanded."""
    import onnx_ir as ir

    graph = model.graph
    leftovers = [n for n in graph if n.op_type == "SDPA" and n.domain == "ai.onnxruntime._fusion"]
    for node in leftovers:
        query, key, value, *mask = node.inputs
        perm = [0, 1, 3, 2] if _attr(node, "key_format") in (None, "BHSd") else [0, 2, 3, 1]
        head_dim = query.shape[-1] if query.shape is not None else None
        scale = _attr(node, "scale")
        if scale is None:
            scale = head_dim ** -0.5

        def constant(value_, name):
            return ir.node("Constant", [], attributes={"value": ir.tensor(np.float32(value_), name=name)})

        nodes = [ir.node("Transpose", [key], attributes={"perm": perm})]
        nodes.append(ir.node("MatMul", [query, nodes[-1].outputs[0]]))
        nodes.append(constant(scale, "scale"))
        nodes.append(ir.node("Mul", [nodes[-2].outputs[0], nodes[-1].outputs[0]]))
        scores = nodes[-1].outputs[0]
        cap = _attr(node, "softcap")
        if cap:
            nodes.append(constant(cap, "cap"))
            c = nodes[-1].outputs[0]
            nodes.append(ir.node("Div", [scores, c]))
            nodes.append(ir.node("Tanh", [nodes[-1].outputs[0]]))
            nodes.append(ir.node("Mul", [nodes[-1].outputs[0], c]))
            scores = nodes[-1].outputs[0]
        if mask and mask[0] is not None:
            nodes.append(ir.node("Add", [scores, mask[0]]))
            scores = nodes[-1].outputs[0]
        nodes.append(ir.node("Softmax", [scores], attributes={"axis": -1}))
        nodes.append(ir.node("MatMul", [nodes[-1].outputs[0], value]))
        graph.insert_before(node, nodes)
        out = nodes[-1].outputs[0]
        out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
        node.outputs[0].replace_all_uses_with(out)
        graph.remove(node, safe=True)
    return len(leftovers)


def identity_rotary_for_nope(model) -> int:
    """Give each attention without RoPE (SmolLM3's NoPE layers) a RotaryEmbedding by cos = 1, sin = 0 on its new
    query and key, so that the GQA rule, which fuses RoPE into GroupQueryAttention, takes these layers too and
    every layer shares its KV buffer. One identity pair (cos * 0 + 1, sin * 0) serves them all. Returns the layers
    given one."""
    import onnx_ir as ir

    graph = model.graph
    rotary = next((n for n in graph if n.op_type == "RotaryEmbedding" and n.domain == "com.microsoft"), None)
    if rotary is None:
        return 0
    count, caches = 0, None
    for sdpa in [n for n in graph if n.op_type == "SDPA" and n.domain == "ai.onnxruntime._fusion"]:
        query = sdpa.inputs[0]
        concat = _through(sdpa.inputs[1], ("Reshape", "Expand", "Unsqueeze", "Concat"))
        if query.producer() is None or query.producer().op_type != "Transpose" or concat is None:
            continue
        key = concat.inputs[1]
        if key.producer() is None or key.producer().op_type != "Transpose":
            continue
        if caches is None:  # cos * 0 + 1 and sin * 0: the RoPE layers' cos/sin shape, constant or computed
            zero, one = (ir.node("Constant", [], attributes={"value": ir.tensor(np.float32(v), name=f"nope_{v}")})
                         for v in (0, 1))
            cos0, sin0 = (ir.node("Mul", [rotary.inputs[i], zero.outputs[0]]) for i in (2, 3))
            cos1 = ir.node("Add", [cos0.outputs[0], one.outputs[0]])
            graph.insert_before(sdpa, [zero, one, cos0, sin0, cos1])
            caches = [cos1.outputs[0], sin0.outputs[0]]
            for cache, like in zip(caches, rotary.inputs[2:4]):
                cache.dtype, cache.shape = like.dtype, like.shape
        for consumer, index, value in ((sdpa, 0, query), (concat, 1, key)):
            node = ir.node("RotaryEmbedding", [value, rotary.inputs[1], *caches], domain="com.microsoft",
                           attributes={k: a for k, a in rotary.attributes.items()})
            graph.insert_before(consumer, node)
            node.outputs[0].dtype, node.outputs[0].shape = value.dtype, value.shape
            consumer.replace_input_with(index, node.outputs[0])
        count += 1
    return count


def _through(value, ops: tuple[str, ...]):
    """The node reached from `value`'s producer by following input 0 through `ops` in order, else None."""
    node = value.producer() if value is not None else None
    for op in ops:
        if node is None or node.op_type != op:
            return None
        if op != ops[-1]:
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node



def gqa_takes_rotary_dim(rotary_dim: int) -> bool:
    """ORT's GroupQueryAttention rotates with a cos cache of rotary_dim / 2 columns, which must be a multiple of 8."""
    return rotary_dim % 16 == 0


def whole_head_partial_rotary(model) -> int:
    """Concat(RotaryEmbedding(x[..., :d]), x[..., d:]) -> RotaryEmbedding(x, rotary_embedding_dim=d): partial RoPE
    (Phi-4-mini) as one op on the whole head, the form the GQA rule matches. Returns the rotaries rewritten."""
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for rotary in [n for n in graph if n.op_type == "RotaryEmbedding" and n.domain == "com.microsoft"]:
        head, uses = rotary.inputs[0].producer(), rotary.outputs[0].uses()
        if head is None or head.op_type != "Slice" or len(uses) != 1 or uses[0].node.op_type != "Concat":
            continue
        concat = uses[0].node
        rest = concat.inputs[1].producer() if len(concat.inputs) == 2 else None
        bounds = [_constant_ints(v) for v in (*head.inputs[1:], *(rest.inputs[1:] if rest is not None else ()))]
        if (rest is None or rest.op_type != "Slice" or rest.inputs[0] is not head.inputs[0]
                or concat.inputs[0] is not rotary.outputs[0] or None in bounds or len(bounds) != 8):
            continue
        (start, end, axis, step), (start2, _, axis2, step2) = bounds[:4], bounds[4:]
        rank = len(head.inputs[0].shape or ())
        if start != [0] or start2 != end or step != step2 != [1] or {axis[0] % 4, axis2[0] % 4} != {3} or rank != 4:
            continue
        if not gqa_takes_rotary_dim(end[0]):
            continue
        attributes = {k: a for k, a in rotary.attributes.items()}
        attributes["rotary_embedding_dim"] = ir.AttrInt64("rotary_embedding_dim", end[0])
        whole = ir.node("RotaryEmbedding", [head.inputs[0], *rotary.inputs[1:]], domain="com.microsoft",
                        attributes=attributes)
        graph.insert_before(rotary, whole)
        whole.outputs[0].dtype, whole.outputs[0].shape = concat.outputs[0].dtype, concat.outputs[0].shape
        concat.outputs[0].replace_all_uses_with(whole.outputs[0])
        for node in (concat, rotary, head, rest):
            if not any(o.uses() for o in node.outputs):
                graph.remove(node, safe=True)
        count += 1
    return count


def _constant_ints(value) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]
