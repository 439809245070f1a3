"""Export a llama-family torch decoder to an ONNX decoder graph with KV cache, with torch.onnx (dynamo).

Graph I/O (Optimum-compatible names, so any later pass or runtime sees one layout):
    input_ids        int64 (batch, seq)
    attention_mask   int64 (batch, past + seq)
    position_ids     int64 (batch, seq)
    past_key_values.{i}.key / .value   float32 (batch, kv_heads, past, head_dim)
 -> logits           float32 (batch, seq, vocab)
    present.{i}.key / .value           float32 (batch, kv_heads, past + seq, head_dim)

Why dynamo and not optimum-onnx: the dynamo graph is what onnxscript's ORT fusion rules match (GQA,
SkipSimplifiedLayerNormalization, rotary); optimum-onnx uses the TorchScript exporter, on whose graph those rules
match nothing, duplicates the tied embedding, and peaks at about 3 GiB RSS (shared/research/export-probe.md).
"""

from __future__ import annotations

import logging
import warnings

from onnxlm.errors import OnnxlmError, first_line
from onnxlm.frontend.moe import onnx_translations, sparse_blocks_as_moe_ops
from onnxlm.model_info import ModelInfo

OPSET = 20


def _decoder_wrapper(model, num_layers: int):
    """A module with a flat tensor signature: torch.export cannot take a DynamicCache as an input."""
    import torch
    from transformers.cache_utils import DynamicCache

    class FlatDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # past: [k0, v0, k1, v1, ...], each (batch, kv_heads, past, head_dim)
            cache = DynamicCache.from_legacy_cache(tuple((past[2 * i], past[2 * i + 1]) for i in range(num_layers)))
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return FlatDecoder()


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def export_decoder(model, info: ModelInfo):
    """torch decoder -> onnx_ir.Model with the I/O above. Unoptimized: passes do the cleanup."""
    import torch
    from torch.export import Dim

    wrapper = _decoder_wrapper(model, info.num_layers).eval()
    # The sample avoids sizes 0 and 1, which torch.export would specialize on.
    batch, past, seq = 2, 5, 3
    ids = torch.randint(0, info.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = torch.zeros(batch, info.num_kv_heads, past, info.head_dim)
    pasts = tuple(kv.clone() for _ in range(2 * info.num_layers))

    b, s, t, p = Dim("batch"), Dim("seq"), Dim("total"), Dim("past")
    dynamic_shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in pasts))
    input_names, output_names = io_names(info.num_layers)
    # The exporter logs a warning per torchvision op it cannot register; we export no vision ops.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), sparse_blocks_as_moe_ops(model, info.family):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (ids, mask, pos, *pasts),
                dynamo=True,
                optimize=False,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=onnx_translations() if info.moe else None,
                verbose=False,
            )
        except Exception as exc:
            raise OnnxlmError(f"torch.onnx export failed for this {info.architecture} model: {first_line(exc)}") from None
    model = program.model
    # The exporter records stack traces with per-process counters in node metadata; drop them so that the same
    # model and recipe give a byte-identical artifact.
    import onnx_ir.passes.common as common

    common.ClearMetadataAndDocStringPass()(model)
    return model
