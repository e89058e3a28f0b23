"""The package imports flow one way: building blocks → model and data → training → the tools that use a
trained model → the command line. No module reaches into another module's private names."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moee_jax"

# Each subpackage / top-level module with the layer it lives on; a module may import only from
# its own layer or the layers below it.
LAYERS = {
    "emotions": 0, "atomic": 0, "checks": 0, "console": 0, "xla_options": 0, "nn": 0, "parallel": 0, "diffusion": 0,
    "models": 1, "checkpoint": 2, "data": 3,
    "train": 4,
    "inference": 5, "eval": 6, "analysis": 7,
    "demo": 8, "ui": 8, "cli": 9, "configs": 0,
}  # fmt: skip
# The layers the issue tracker names: the model and data never depend on what uses them.
FOUNDATIONS = ("models", "nn", "diffusion", "data")
USERS = ("train", "inference", "eval", "analysis")


def _imports(path: pathlib.Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every ``moee_jax`` import in ``path`` (name None for ``import x``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moee_jax":
            out.extend((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "moee_jax")
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts)


def test_every_part_of_the_package_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _package_files()} - {"__init__", "__main__"}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS"


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if here not in LAYERS:
        return
    for module, _ in _imports(path):
        there = _top(module)
        if there and there != here and there in LAYERS:
            assert LAYERS[there] <= LAYERS[here], f"{path.relative_to(ROOT)} imports {module}: {there} is above {here}"
            if here in FOUNDATIONS:
                assert there not in USERS, f"{path.relative_to(ROOT)} imports {module}"


@pytest.mark.parametrize(
    "path", _package_files() + sorted((ROOT / "tests").glob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_imports_another_modules_private_names(path):
    for module, name in _imports(path):
        private = [part for part in module.split(".") if part.startswith("_") and not part.startswith("__")]
        assert not private, f"{path.relative_to(ROOT)} imports private module {module}"
        assert not (name and name.startswith("_")), f"{path.relative_to(ROOT)} imports {name} from {module}"
