"""The package's layers (docs/architecture.md): a module imports only from its own layer's
package or from lower layers, never from a higher one or a sibling of the same rank."""

import ast
from pathlib import Path

import imagen

# lower number = lower layer; packages of one rank are independent of each other
LAYERS = {
    "utils": 0,
    "diffusion": 1,
    "text": 1,
    "data": 1,
    "models": 2,
    "training": 3,
    "pipeline": 3,
    "evaluation": 4,
    "server": 5,
    "cli": 6,
}


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("imagen.")
    ]


def test_every_package_is_in_a_layer():
    root = Path(imagen.__file__).parent
    packages = {p.parent.name for p in root.glob("*/__init__.py")}
    assert packages == set(LAYERS)


def test_no_module_imports_from_a_higher_or_sibling_layer():
    root = Path(imagen.__file__).parent
    wrong = []
    for path in root.glob("*/*.py"):
        here = path.parent.name
        for module in imports(path):
            there = module.split(".")[1]
            if there in LAYERS and there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{path.relative_to(root)} imports {module}")
    assert not wrong, wrong
