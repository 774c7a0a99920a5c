"""The samplers' short names and one-line descriptions, without torch.

The command line builds its ``--sampler`` choices from here before anything imports torch;
:data:`imagen.diffusion.samplers.SAMPLERS` takes each sampler's name and description from
here too (and refuses to import if the two lists differ), so this stays the one list of names.
"""

from __future__ import annotations

SAMPLER_HELP: dict[str, str] = {
    "ddpm": "ancestral DDPM (stochastic)",
    "ddim": "DDIM (deterministic with eta 0)",
    "dpmpp": "DPM-Solver++(2M), deterministic, good in 10-20 steps",
}
"""Every sampler's short name and one-line description, in the order they are offered."""

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_HELP)
