"""The seams stay where they are: the hub never imports the edge and vice versa, the shared
``protocol`` package depends on neither, and no production package imports test or dev code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ``models`` is training code (scikit-learn, onnx): the edge and hub run its output, never its code.
TRAINING = {"models", "sklearn", "skl2onnx", "onnx"}
FORBIDDEN = {
    "protocol": {"edge", "hub", "firmware_sim", "fleet", "bench", "tests"} | TRAINING,
    "edge": {"hub", "firmware_sim", "fleet", "bench", "tests"} | TRAINING,
    "hub": {"edge", "firmware_sim", "fleet", "bench", "tests"} | TRAINING,
    "firmware_sim": {"edge", "hub", "fleet", "bench", "tests"} | TRAINING,
    "models": {"edge", "hub", "fleet", "bench", "tests"},
}
# The what-if simulator runs the simulated boiler's physics in the hub (docs/whatif.md); nothing
# else of the hub may depend on the simulators.
ALLOWED = {"hub/whatif.py": {"firmware_sim"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_boundaries(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    violations = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[package]
                                                   - ALLOWED.get(f.relative_to(ROOT).as_posix(), set()))
                  for f in files}
    assert {f: v for f, v in violations.items() if v} == {}
