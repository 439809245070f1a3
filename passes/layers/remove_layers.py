"""`remove_layers`: static removal of whole decoder layers by measured importance (ShortGPT arXiv 2403.03853,
SLEB arXiv 2402.09025).

Importance is measured on the calibration text in two ways, both reported:
- block influence BI_l = 1 - mean_t cos(h_in, h_out) of layer l (ShortGPT);
- the PPL with layer l alone removed (SLEB's criterion, measured one layer at a time rather than re-measured
  after every removal).
`metric` picks the ranking. With `n`, the n least important layers go. With `max_ppl_increase` (percent), layers
are removed in rank order while the measured PPL of the whole removed set stays within the budget.

All measurements use one ORT session of a probe graph in which each layer's output is
Where(layer_skip[l], its input, its output): removing any set of layers is a change of one bool input.

Input: the plain export (it runs before the lowering passes; recipes put it after the first cleanup).
Guarantees: a valid decoder with fewer layers whose KV inputs/outputs are renumbered 0..L'-1; ctx.info (and so
the manifest and genai_config) follow. Lossy: the manager reports the calibration PPL before and after.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FOLDED, PLAIN, Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.decoder_structure import find_decoder
from onnxlm.passes.layers.residual import remove_layers

METRICS = ("ppl", "bi")


@dataclasses.dataclass
class RemoveLayersOptions:
    n: int = 0  # layers to remove; 0: use max_ppl_increase
    max_ppl_increase: float = 0.0  # percent of the calibration PPL
    metric: str = "ppl"  # ranking: "ppl" (PPL without the layer) or "bi" (block influence)
    calibration_tokens: int = 1024


class RemoveLayers(Pass):
    name = "remove_layers"
    requires = (FOLDED, PLAIN)
    Options = RemoveLayersOptions
    lossless = False

    def validate(self) -> None:
        o = self.options
        if o.metric not in METRICS:
            raise OnnxlmError(f"remove_layers metric must be one of {', '.join(METRICS)}, got '{o.metric}'")
        if o.n < 0 or o.max_ppl_increase < 0:
            raise OnnxlmError("remove_layers needs n >= 0 and max_ppl_increase >= 0")
        if (o.n > 0) == (o.max_ppl_increase > 0):
            raise OnnxlmError("remove_layers takes one of n (--remove-layers) or max_ppl_increase "
                              "(--max-ppl-increase)")
        if o.calibration_tokens < 16:
            raise OnnxlmError(f"remove_layers needs calibration_tokens >= 16, got {o.calibration_tokens}")

    def check_fits(self, info) -> None:
        if self.options.n >= info.num_layers:
            raise OnnxlmError(f"cannot remove {self.options.n} of {info.num_layers} layers")

    def run(self, model, ctx: PassContext):
        o = self.options
        layers = ctx.info.num_layers
        self.check_fits(ctx.info)
        ids = ctx.calibration_ids[: o.calibration_tokens]
        if len(ids) < 16:
            raise OnnxlmError("remove_layers needs calibration text: fewer than 16 calibration tokens")
        probe = LayerProbe(model, ctx, ids)
        influence = probe.block_influence()
        base = probe.ppl([])
        alone = [probe.ppl([layer]) for layer in range(layers)]
        key = alone if o.metric == "ppl" else influence
        ranked = sorted(range(layers), key=lambda layer: key[layer])
        if o.n:
            drop, curve = sorted(ranked[: o.n]), []
        else:
            drop, curve = [], []
            for layer in ranked[:-1]:
                ppl = probe.ppl(drop + [layer])
                if ppl > base * (1 + o.max_ppl_increase / 100):
                    break
                drop.append(layer)
                curve.append(round(ppl, 4))
            drop.sort()
        if drop:
            remove_layers(model, ctx.info, drop)
            ctx.info = ctx.info.without_layers(drop)
        ctx.metrics.update({
            "removed_layers": drop, "metric": o.metric, "probe_ppl": round(base, 4),
            "block_influence": [round(b, 5) for b in influence],
            "ppl_without_layer": [round(p, 4) for p in alone],
            **({"ppl_as_removed": curve} if curve else {}),
        })
        note = f"removed layers {drop} of {layers} by {o.metric}" if drop else "no layer fits the PPL budget"
        return bool(drop), {"layers_removed": len(drop)}, [note]


class LayerProbe:
    """One ORT session over a copy of the graph with a `layer_skip` bool input and each layer input as an output."""

    def __init__(self, model, ctx: PassContext, ids: list[int]):
        import onnx_ir as ir

        from onnxlm.passes.evaluate import feeds_for, open_session, windows_of

        self.layers, self.info, self.ids, self.interface = ctx.info.num_layers, ctx.info, ids, ctx.interface
        probe = model.clone()
        graph = probe.graph
        stream = find_decoder(graph, ctx.info).stream
        skip = ir.Value(name="layer_skip", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([self.layers]))
        graph.inputs.append(skip)
        layer_in = stream[0]
        for layer in range(self.layers):
            index = add_initializer(graph, f"layer_skip_index_{layer}", np.array(layer, np.int64))
            flag = ir.node("Gather", [skip, index], {"axis": 0})
            out = stream[2 * layer + 2]
            readers = list(out.uses())
            choose = ir.node("Where", [flag.outputs[0], layer_in, out])  # skipped: the layer passes its input on
            for use in readers:
                use.node.replace_input_with(use.idx, choose.outputs[0])
            graph.extend([flag, choose])
            layer_in = choose.outputs[0]
        for layer in range(self.layers + 1):  # the stream before each layer and after the last, unskipped
            graph.outputs.append(stream[2 * layer])
        graph.sort()
        path = ctx.scratch / "layer_probe.onnx"
        ir.save(probe, path, external_data="layer_probe.onnx.data")
        self.session = open_session(path)
        self.hidden_names = [stream[2 * layer].name for layer in range(self.layers + 1)]
        self.windows = windows_of(ids, 512)
        self.feeds = [feeds_for(self.session, ctx.info, np.asarray([w], np.int64), 0, None, {"layer_skip"},
                                ctx.interface)
                      for w in self.windows]

    def mask(self, skipped: list[int]) -> np.ndarray:
        mask = np.zeros(self.layers, bool)  # (layers,)
        mask[skipped] = True
        return mask

    def run(self, outputs: list[str], skipped: list[int]) -> list[list[np.ndarray]]:
        """`outputs` for each calibration window with the layers `skipped` bypassed."""
        return [self.session.run(outputs, {**feeds, "layer_skip": self.mask(skipped)}) for feeds in self.feeds]

    def ppl(self, skipped: list[int]) -> float:
        from onnxlm.passes.evaluate import session_perplexity

        return session_perplexity(self.session, self.info, self.ids, 512, {"layer_skip": self.mask(skipped)},
                                  self.interface)

    def block_influence(self) -> list[float]:
        """1 - mean cos(h_in, h_out) per layer, over every calibration token."""
        cos_sum, count = np.zeros(self.layers), 0
        for hidden in self.run(self.hidden_names, []):
            h = np.stack([x[0] for x in hidden]).astype(np.float64)  # (layers + 1, seq, hidden)
            unit = h / np.linalg.norm(h, axis=-1, keepdims=True)
            cos_sum += (unit[:-1] * unit[1:]).sum(axis=-1).sum(axis=-1)
            count += h.shape[1]
        return list(1 - cos_sum / count)
