"""Pass names -> pass classes. The list is explicit: a recipe can name only what is imported here."""

from __future__ import annotations

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import Pass
from onnxlm.passes.cleanup import Cleanup
from onnxlm.passes.larosa.rotate import RotateResidual
from onnxlm.passes.larosa.sparsify import TopkSparsify
from onnxlm.passes.layers.exits import EarlyExit
from onnxlm.passes.layers.halting import QuickSilverHalting
from onnxlm.passes.layers.remove_layers import RemoveLayers
from onnxlm.passes.lowering.decode_shapes import DecodeShapes
from onnxlm.passes.lowering.expose_attention import ExposeAttention
from onnxlm.passes.lowering.logits_to_keep import LogitsToKeep
from onnxlm.passes.lowering.ort_fusions import (
    FuseGroupQueryAttention,
    FuseRmsNorm,
    FuseRotary,
    FuseSkipRmsNorm,
)
from onnxlm.passes.lowering.pack_matmuls import PackGateUp, PackQKV
from onnxlm.passes.lowering.static import StaticKV
from onnxlm.passes.quant.dynamic_int8 import QuantDynamicInt8
from onnxlm.passes.quant.float16 import ConvertFloat16
from onnxlm.passes.quant.gguf_exact import GgufExact
from onnxlm.passes.quant.nested import QuantNested
from onnxlm.passes.quant.qdq import QuantQdq
from onnxlm.passes.quant.tied_embedding import ShareTiedEmbedding
from onnxlm.passes.quant.weight_only import QuantWeightOnly
from onnxlm.passes.trim_vocab import TrimVocab

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in [
        Cleanup,
        FuseRmsNorm,
        FuseSkipRmsNorm,
        FuseRotary,
        FuseGroupQueryAttention,
        PackQKV,
        PackGateUp,
        ExposeAttention,
        LogitsToKeep,
        DecodeShapes,
        StaticKV,
        RemoveLayers,
        QuickSilverHalting,
        EarlyExit,
        RotateResidual,
        TopkSparsify,
        QuantWeightOnly,
        GgufExact,
        QuantDynamicInt8,
        QuantNested,
        QuantQdq,
        ShareTiedEmbedding,
        TrimVocab,
        ConvertFloat16,
    ]
}


def make_pass(spec: dict) -> Pass:
    """Build a pass from a recipe entry: {"pass": NAME, option: value, ...}."""
    if not isinstance(spec, dict) or not isinstance(spec.get("pass"), str):
        raise OnnxlmError(f'a recipe entry must be an object like {{"pass": "cleanup"}}, got {spec!r}')
    options = {k: v for k, v in spec.items() if k != "pass"}
    name = spec["pass"]
    if name not in PASSES:
        raise OnnxlmError(f"unknown pass '{name}' (known passes: {', '.join(sorted(PASSES))})")
    return PASSES[name](**options)
