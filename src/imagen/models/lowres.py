"""The low-res conditioning of super-resolution stages: resizing, noise-conditioning
augmentation (Imagen sec. 2.5) and blur augmentation (Cascaded Diffusion Models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imagen.diffusion.schedules import NoiseSchedule


def resize(images: Tensor, size: int, align_corners: bool = False) -> Tensor:
    """Resize a batch of images: area averaging down, bilinear up (no-op at equal size);
    ``align_corners`` for the upsampling DeepFloyd IF's super-resolution uses."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=align_corners)


def augment_lowres(
    lowres: Tensor,
    size: int,
    level: Tensor,
    schedule: NoiseSchedule,
    noise: Tensor,
    align_corners: bool = False,
) -> tuple[Tensor, Tensor]:
    """Noise-conditioning augmentation (Imagen sec. 2.5): upsample the low-res image to the
    stage's size and diffuse it to augmentation level ``level`` in [0, 1) (per sample, as a
    fraction of the schedule; 0 leaves it clean) with ``noise`` (shaped like the output).
    Returns the corrupted image and the timestep the U-Net is conditioned on."""
    up = resize(lowres, size, align_corners)
    t = (level * (schedule.num_timesteps - 1)).round().long().to(up.device)
    noised = schedule.q_sample(up, t, noise.to(up.dtype))
    return torch.where(t.view(-1, 1, 1, 1) > 0, noised, up), t.float()


BLUR_RADIUS = 4  # taps each side of the low-res blur kernel (enough for sigma <= 1.5)
BLUR_MAX = 1.5  # the largest blur sigma, in low-res pixels, the kernel represents


def blur_lowres(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur augmentation of the low-res conditioning image (Ho et al. 2021, Cascaded Diffusion
    Models, sec. 3.2): a separable Gaussian of standard deviation ``sigma`` (B,) in low-res
    pixels per sample (0 leaves a sample as it is), edges replicated. Training only: a stage
    learns to draw crisp detail from a softer low-res image than its training data's."""
    b, c, h, w = images.shape
    k = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=images.device, dtype=torch.float32)
    s = sigma.to(images.device, torch.float32).clamp_min(1e-3).view(b, 1)
    kernel = torch.exp(-0.5 * (k.view(1, -1) / s) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype)
    kernel = kernel.repeat_interleave(c, 0)  # (B C, K): one kernel per sample and channel
    x = F.pad(images.reshape(1, b * c, h, w), (BLUR_RADIUS,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)
