"""A recipe is data: a name, a one-line description and an ordered list of passes with options.

    {"name": "fp32", "description": "...", "extends": "lowered", "passes": [{"pass": "logits_to_keep"}]}

`extends` names a built-in recipe whose passes come first (it may extend another in turn). Built-in recipes live
in passes/recipes/*.json; any other JSON file of the same form is a recipe too. A recipe is checked when it is
built: each pass must find the graph forms it requires (base.py's GRAPH_FORMS) after the passes before it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import GRAPH_FORMS, INITIAL_FORM, Pass
from onnxlm.passes.registry import PASSES, make_pass
from onnxlm.schema import RECIPE, RECIPE_KEYS, check, read_json, reject_unknown_keys

BUILTIN_DIR = Path(__file__).parent / "recipes"
PLACES = ("earliest", "latest")


@dataclasses.dataclass
class Recipe:
    name: str
    description: str
    passes: list[Pass]

    def to_dict(self) -> dict:
        """The resolved recipe (`extends` expanded): what the artifact records, and loads again as it is."""
        return {"name": self.name, "description": self.description, "passes": [p.to_dict() for p in self.passes]}

    def check_fits(self, info) -> None:
        """Every pass's options fit this model (Pass.check_fits): checked before the export starts."""
        for p in self.passes:
            p.check_fits(info)

    def pipeline(self) -> str:
        """The pipeline on one line, MLIR-style: `cleanup -> quant_int4(block_size=32)`."""
        return " -> ".join(repr(p) for p in self.passes) or "(no passes)"

    def checked(self) -> Recipe:
        """This recipe, if each pass finds the graph forms it requires; else a one-line OnnxlmError."""
        error = order_error(self.passes)
        if error:
            raise OnnxlmError(f"recipe '{self.name}': {error}")
        return self

    def inserting(self, passes: list[Pass], where: str = "earliest") -> Recipe:
        """A copy with `passes` (in their order) at the earliest or latest place where they find the graph forms
        they require and every pass after them still does."""
        if where not in PLACES:
            raise ValueError(f"where must be one of {PLACES}, got {where!r}")

        def at(i):
            return [*self.passes[:i], *passes, *self.passes[i:]]

        places = [i for i in range(len(self.passes) + 1) if order_error(at(i)) is None]
        if not places:
            names = ", ".join(p.name for p in passes)
            reason = order_error(at(0 if where == "earliest" else len(self.passes)))
            raise OnnxlmError(f"recipe '{self.name}' has no place for {names}: {reason}")
        return Recipe(self.name, self.description, at(places[0] if where == "earliest" else places[-1]))

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> Recipe:
        checked_data(data, origin)
        recipe = cls(
            name=str(data.get("name", Path(origin).stem)),
            description=str(data.get("description", "")),
            passes=[make_pass(spec) for spec in resolved_passes(data, origin)],
        )
        return recipe.checked()


def order_error(passes: list[Pass]) -> str | None:
    """Why `passes` cannot run in this order on the exporter's graph (INITIAL_FORM), or None if they can."""
    forms = set(INITIAL_FORM)
    ended: dict[str, tuple[int, str]] = {}  # form -> (step, pass) that ended it
    made: dict[str, tuple[int, str]] = {}  # form -> (step, pass) that made it
    for step, p in enumerate(passes, 1):
        clash = [form for form in p.excludes if form in forms]
        if clash:
            made_at, by = made.get(clash[0], (0, "the exporter"))
            return (f"pass '{p.name}' at step {step} cannot take {GRAPH_FORMS[clash[0]]}, which '{by}' at step "
                    f"{made_at} made")
        missing = [form for form in p.requires if form not in forms]
        if missing:
            form = missing[0]
            if form in ended:
                ended_at, by = ended[form]
                why = f"but '{by}' at step {ended_at} ended that"
            else:
                makers = " or ".join(name for name, cls in PASSES.items() if form in cls.provides)
                why = f"which no pass before it makes ({makers} does)" if makers else "which no pass makes"
            return f"pass '{p.name}' at step {step} needs {GRAPH_FORMS[form]}, {why}"
        forms.difference_update(p.removes)
        forms.update(p.provides)
        ended.update({form: (step, p.name) for form in p.removes})
        made.update({form: (step, p.name) for form in p.provides})
    return None


def checked_data(data, origin: str) -> dict:
    """`data`, once it has the shape of a recipe (schema.RECIPE)."""
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise OnnxlmError(f"recipe {origin} must be a JSON object with a 'passes' list")
    check(data, RECIPE, f"recipe {origin}")
    reject_unknown_keys(data, RECIPE_KEYS, f"recipe {origin}")
    return data


def resolved_passes(data: dict, origin: str) -> list[dict]:
    """The recipe's pass entries after those of the built-in recipes it extends, recursively."""
    passes, chain = list(data["passes"]), []
    while "extends" in data:
        base = data["extends"]
        if base in chain:
            raise OnnxlmError(f"recipe {origin}: its 'extends' go round in a cycle: {' -> '.join([*chain, base])}")
        if base not in builtin_recipes():
            known = ", ".join(builtin_recipes())
            raise OnnxlmError(f"recipe {origin} extends {base!r}, which is not a built-in recipe (built-in "
                              f"recipes: {known})")
        chain.append(base)
        path = BUILTIN_DIR / f"{base}.json"
        data = checked_data(read_json(path, "recipe"), str(path))
        passes = [*data["passes"], *passes]
    return passes


def builtin_recipes() -> dict[str, str]:
    """name -> one-line description, for `onnxlm recipes`."""
    out = {}
    for path in sorted(BUILTIN_DIR.glob("*.json"), key=lambda p: p.stem):
        out[path.stem] = json.loads(path.read_text()).get("description", "")
    return out


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe JSON file by path."""
    builtin = BUILTIN_DIR / f"{name_or_path}.json"
    if builtin.is_file():
        path = builtin
    elif name_or_path.endswith(".json"):
        path = Path(name_or_path)
        if not path.is_file():
            raise OnnxlmError(f"recipe file does not exist: {path}")
    else:
        known = ", ".join(builtin_recipes())
        raise OnnxlmError(f"unknown recipe '{name_or_path}' (built-in recipes: {known}; or give a .json file)")
    return Recipe.from_dict(read_json(path, "recipe"), str(path))
