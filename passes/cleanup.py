"""`cleanup`: constant folding, dead-code removal and initializer deduplication (lossless).

Uses onnxscript's optimizer (constant folding, shape-driven simplification, unused-node removal) and onnx-ir's
common passes. Input: any decoder graph. Guarantees: the same logits (checked by the manager), fewer or equal
nodes, no unused initializers, a topologically sorted graph.
"""

from __future__ import annotations

import collections

from onnxlm.passes.base import FOLDED, Pass, PassContext


def op_histogram(model) -> dict[str, int]:
    """`domain::op` (or plain `op` for the default domain) -> count, largest first."""
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph
    )
    return dict(counts.most_common())


FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


class Cleanup(Pass):
    """Fold constants and remove dead code with onnxscript's optimizer and onnx-ir's common passes."""

    name = "cleanup"
    provides = (FOLDED,)

    def run(self, model, ctx: PassContext):
        import onnx_ir.passes.common as common
        import onnxscript

        before = op_histogram(model)
        onnxscript.optimizer.optimize(model)
        # The optimizer records which values each folded constant came from; that provenance depends on what was
        # folded earlier in the process (a build resumed from the graph cache would record less): drop it, so
        # that the same model and recipe give the same bytes however they were built.
        graph = model.graph
        for value in [*graph.initializers.values(), *(v for node in graph for v in node.outputs)]:
            value.metadata_props.pop(FOLDED_FROM, None)
        common.DeduplicateInitializersPass()(model)
        common.RemoveUnusedNodesPass()(model)
        common.TopologicalSortPass()(model)
        after = op_histogram(model)
        removed = {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)}
        return bool(removed), removed, []
