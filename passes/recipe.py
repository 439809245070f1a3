"""A recipe is data: a name, a one-line description and an ordered list of passes with options.

    {"name": "fp32", "description": "...", "passes": [{"pass": "cleanup"}]}

Built-in recipes live in passes/recipes/*.json; any other JSON file of the same form is a recipe too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import Pass
from onnxlm.passes.registry import make_pass
from onnxlm.schema import RECIPE, RECIPE_KEYS, check, read_json, reject_unknown_keys

BUILTIN_DIR = Path(__file__).parent / "recipes"


@dataclasses.dataclass
class Recipe:
    name: str
    description: str
    passes: list[Pass]

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "passes": [p.to_dict() for p in self.passes]}

    def check_fits(self, info) -> None:
        """Every pass's options fit this model (Pass.check_fits): checked before the export starts."""
        for p in self.passes:
            p.check_fits(info)

    def pipeline(self) -> str:
        """The pipeline on one line, MLIR-style: `cleanup -> quant_int4(block_size=32)`."""
        return " -> ".join(repr(p) for p in self.passes) or "(no passes)"

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> Recipe:
        if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
            raise OnnxlmError(f"recipe {origin} must be a JSON object with a 'passes' list")
        check(data, RECIPE, f"recipe {origin}")
        reject_unknown_keys(data, RECIPE_KEYS, f"recipe {origin}")
        return cls(
            name=str(data.get("name", Path(origin).stem)),
            description=str(data.get("description", "")),
            passes=[make_pass(spec) for spec in data["passes"]],
        )


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
