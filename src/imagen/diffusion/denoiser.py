"""What a denoiser is: the one interface between a network (wrapped with guidance and
thresholding, diffusion/guidance.py) and the samplers (diffusion/samplers.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Prediction:
    """A denoiser's answer for a batch of noisy images x_t at one timestep."""

    x0: Tensor  # the (thresholded) clean-image estimate x0_hat, shaped like x_t
    # the network's learned-variance interpolation v in [-1, 1] between the posterior
    # variance and beta (Nichol & Dhariwal 2021), where the network predicts one (DeepFloyd
    # IF's stages); None otherwise. The DDPM sampler's ``learned_range`` variance reads it.
    variance: Tensor | None = None


Denoiser = Callable[[Tensor, int], Prediction]
"""A denoiser maps a batch of noisy images x_t and an integer training timestep t to a
:class:`Prediction`. Wrappers (inpainting, for example) return a changed copy
(``dataclasses.replace``), so the variance travels with the estimate."""
