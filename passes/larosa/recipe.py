"""`--sparsity S` for any recipe: La RoSA's two passes put where they can run.

Both go as late as the graph forms they require allow (Recipe.inserting): while the weights are float, so before
the first pass that quantizes (or shares the embedding with a quantized head), and before `logits_to_keep` (it
slices the LM head's input). On a recipe that already rotates only `topk_sparsify` is added; on one that already
sparsifies, only the sparsity changes.
"""

from __future__ import annotations


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
    rotate = [] if "rotate_residual" in names else [make_pass({"pass": "rotate_residual"})]
    return recipe.inserting([*rotate, make_pass({"pass": "topk_sparsify", "sparsity": float(sparsity)})], "latest")
