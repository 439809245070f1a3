"""What a wheel of onnxlm holds: pyproject.toml lists its packages by hand (the repository root is the package), so
a new subpackage that is not listed is missing from `pip install .` while an editable install still finds it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(["onnxlm", *p.parent.relative_to(ROOT).parts]) for p in ROOT.rglob("__init__.py")
             if not {"tests", "build", "bench"} & set(p.relative_to(ROOT).parts)
             and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}
    assert found - listed == set()
    assert listed - found == set()
