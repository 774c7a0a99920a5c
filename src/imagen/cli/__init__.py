"""The `imagen` command line (:mod:`imagen.cli.main`)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the installed ``imagen`` script (``imagen.cli:main`` in pyproject.toml)."""
    from imagen.cli.main import main as run

    return run(argv)
