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


def test_every_network_kind_config_implements_the_protocol():
    """docs/architecture.md, "A network kind": every kind's config declares what the stage,
    the samplers and the model checks read, so nothing asks which kind it runs."""
    from imagen.models.networks import NETWORKS, NetworkConfig

    for kind in NETWORKS.values():
        missing = [
            name
            for name in ("image_size", "in_channels", "lowres_cond", "guidance_cond", "text_dim")
            + ("learned_variance", "check_sizes", "to_dict")
            if not hasattr(kind.config_type, name)
            and name not in kind.config_type.__dataclass_fields__
        ]
        assert not missing, f"{kind.name}: {missing}"
    assert isinstance(NETWORKS["imagen"].config_type(), NetworkConfig)
    record = {"sample_size": 8, "in_channels": 3, "out_channels": 6, "cross_attention_dim": 8}
    assert isinstance(NETWORKS["diffusers-unet"].config_type(config=record), NetworkConfig)


def test_samplers_know_denoisers_only_through_their_interface():
    """Samplers read a denoiser's Prediction (diffusion/denoiser.py); they do not import the
    guidance wrapper, and nothing reads a variance from a denoiser's attributes."""
    root = Path(imagen.__file__).parent
    assert "imagen.diffusion.guidance" not in imports(root / "diffusion" / "samplers.py")
    for path in root.glob("*/*.py"):
        assert 'getattr(denoise, "variance"' not in path.read_text(), path


def test_benchmarks_use_library_code_not_the_command_line_modules():
    """Library functions live in library layers: benchmarks run commands through
    imagen.cli.main only, and import nothing else from cli/."""
    bench = Path(__file__).parent.parent / "benchmarks"
    wrong = [
        f"{p.name} imports {m}"
        for p in bench.glob("*.py")
        for m in imports(p)
        if m.startswith("imagen.cli") and m != "imagen.cli.main"
    ]
    assert not wrong, wrong
