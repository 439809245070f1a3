"""`--sparsity S` for any recipe: La RoSA's two passes put where they can run.

`rotate_residual` needs float MatMuls, so both passes go before the first pass that quantizes (or shares the
embedding with a quantized head), and before `logits_to_keep` (it rewrites the LM head's input); on a recipe that
already sparsifies, only the sparsity changes.
"""

from __future__ import annotations

from onnxlm.errors import OnnxlmError

BOUNDARY_PREFIXES = ("quant_", "share_tied_embedding", "logits_to_keep")  # La RoSA goes before any of these


def with_sparsity(recipe, sparsity: float | None):
    """`recipe` with La RoSA at `sparsity` (None: unchanged)."""
    from onnxlm.passes.recipe import Recipe
    from onnxlm.passes.registry import make_pass

    if sparsity is None:
        return recipe
    names = [p.name for p in recipe.passes]
    if "topk_sparsify" in names:
        passes = [make_pass({**p.to_dict(), "sparsity": sparsity}) if p.name == "topk_sparsify" else p
                  for p in recipe.passes]
        return Recipe(recipe.name, recipe.description, passes)
    at = next((i for i, n in enumerate(names) if n.startswith(BOUNDARY_PREFIXES)), len(names))
    if "rotate_residual" in names[at:]:
        raise OnnxlmError(f"recipe '{recipe.name}' rotates after quantizing: rotate_residual needs float weights")
    rotate = [] if "rotate_residual" in names else [make_pass({"pass": "rotate_residual"})]
    added = [*rotate, make_pass({"pass": "topk_sparsify", "sparsity": float(sparsity)})]
    return Recipe(recipe.name, recipe.description, [*recipe.passes[:at], *added, *recipe.passes[at:]])
