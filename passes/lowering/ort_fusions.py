"""ONNX Runtime fusions as passes, each one a thin wrapper over onnxscript's ORT fusion rules.

Order matters and is the order of the `fp32` recipe:
    cleanup -> fuse_rms_norm -> fuse_skip_rms_norm -> fuse_rotary -> fuse_gqa
Each reports how many patterns matched; the manager checks the logits against the graph before it. A fusion
that matches nothing leaves the graph unchanged and says so; the recipe's `expect` option turns that into an
error (e.g. `fuse_gqa` with expect=num_layers) so that a silent miss cannot ship.
"""

from __future__ import annotations

import dataclasses

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FOLDED, FUSED, PLAIN, Pass, PassContext
from onnxlm.passes.lowering.plan import lowering_plan


@dataclasses.dataclass
class FusionOptions:
    # "layers": the per-layer count times num_layers; "none": no expectation; a count such as "30": exactly that.
    expect: str = "none"


class _Fusion(Pass):
    """Apply `fusions` (name -> function(model) -> count) in order, and check the expected count."""

    Options = FusionOptions
    main = ""  # the fusion whose count `expect` checks
    expected_per_layer = 1  # matches per decoder layer of the main fusion

    def fusions(self) -> dict:
        raise NotImplementedError

    def validate(self) -> None:
        if self.options.expect not in ("none", "layers") and not self.options.expect.isdigit():
            raise OnnxlmError(f"pass '{self.name}' option 'expect' must be 'none', 'layers' or a count")

    def run(self, model, ctx: PassContext):
        plan = lowering_plan(ctx.info).get(self.name, {})
        notes = [*plan.get("unfused", ())]
        if not plan.get("run", True):
            return False, {self.main: 0}, notes
        counts = {name: int(fuse(model)) for name, fuse in self.fusions().items()}
        main = counts[self.main]
        expect = self.options.expect
        layers = plan["count"] if "count" in plan else ctx.info.num_layers * self.expected_per_layer
        wanted = layers if expect == "layers" else (int(expect) if expect.isdigit() else None)
        if wanted is not None and main != wanted:
            family = ctx.info.family.get("family", ctx.info.architecture)
            raise OnnxlmError(f"pass '{self.name}' matched {main} patterns, expected {wanted} for this {family} model")
        return any(counts.values()), counts, notes


class FuseRmsNorm(_Fusion):
    """RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) -> SimplifiedLayerNormalization.

    ONNX op: ai.onnx SimplifiedLayerNormalization (ORT contrib, opset 1), fp32 scale and stash.
    """

    name = "fuse_rms_norm"
    requires = (FOLDED, PLAIN)
    main = "rms_normalization"
    expected_per_layer = 2  # attention and MLP norms (the final norm makes one more)

    def fusions(self):
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

        return {"rms_normalization": fuse_rms_normalization}


class FuseSkipRmsNorm(_Fusion):
    """Residual Add followed by SimplifiedLayerNormalization -> com.microsoft SkipSimplifiedLayerNormalization.

    Guarantees the sum (input + skip) stays available as the op's 4th output for the next residual.
    """

    name = "fuse_skip_rms_norm"
    requires = (FOLDED, PLAIN)
    removes = (PLAIN,)
    main = "skip_rms_normalization"
    expected_per_layer = 2

    def fusions(self):
        from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

        return {"skip_rms_normalization": fuse_skip_rms_normalization}


class FuseRotary(_Fusion):
    """Rotate-half rotary embedding -> com.microsoft RotaryEmbedding, with its cos/sin cache computed once.

    Matches the llama (non-interleaved) form; the cos/sin rule turns the per-step cos/sin into a cache lookup.
    """

    name = "fuse_rotary"
    requires = (FOLDED,)
    main = "rotary_embedding"
    expected_per_layer = 2  # query and key

    def fusions(self):
        from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
        from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding

        import onnx_ir.passes.common as common

        def cos_sin_then_cse(model):  # each layer computed the same cos/sin; keep one
            count = fuse_cos_sin_cache(model)
            common.CommonSubexpressionEliminationPass()(model)
            return count

        return {"rotary_embedding": fuse_rotary_embedding, "cos_sin_cache": cos_sin_then_cse}


class FuseGroupQueryAttention(_Fusion):
    """Attention with KV cache (concat past, repeat KV heads, SDPA) -> com.microsoft GroupQueryAttention.

    The rotary ops fold into GQA (do_rotary=1). seqlens_k and total_sequence_length come from position_ids, not
    from the past's shape, so one buffer can serve as past and present (decode writes in place). GQA rejects a
    batch above 1 with several new tokens after a past, and ignores attention_mask (no left padding).
    """

    name = "fuse_gqa"
    requires = (FOLDED,)
    provides = (FUSED,)
    main = "gqa"

    layer_windows: list[int] = []

    def run(self, model, ctx: PassContext):
        self.layer_windows = ctx.info.layer_windows
        return super().run(model, ctx)

    def fusions(self):
        import onnx_ir.passes.common as common

        from onnxlm.passes.lowering.attention import (expand_leftover_sdpa, identity_rotary_for_nope, rules,
                                                      whole_head_partial_rotary)

        sdpa, gqa = rules(self.layer_windows)

        def fuse_sdpa(model):
            count = sdpa.apply_to_model(model)
            common.ShapeInferencePass()(model)
            return count

        # SDPA is the intermediate form that the GQA rule is built from.
        # An SDPA that no GQA took (yarn RoPE, partial RoPE GQA cannot rotate) goes back to plain ops.
        return {"partial_rotary": whole_head_partial_rotary, "sdpa": fuse_sdpa,
                "nope_identity_rotary": identity_rotary_for_nope, "gqa": gqa.apply_to_model,
                "sdpa_left_unfused": expand_leftover_sdpa}
