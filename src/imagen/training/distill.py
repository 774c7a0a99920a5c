"""Distilling a trained stage into a faster student, trained by the ordinary trainer.

Two objectives, each a drop-in for :meth:`Stage.loss` (the trainer calls ``loss`` on
whichever object owns it):

* **Guidance distillation** (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
  stage one): the student's U-Net takes the guidance weight w as an input and learns, in one
  forward pass, the teacher's classifier-free-guided output at w, for w drawn uniformly from
  [guidance_min, guidance_max]. Sampling then costs one pass per step instead of two.
* **Progressive distillation** (Salimans & Ho 2022): the student learns to take, in one DDIM
  step, the two DDIM steps the teacher takes on a grid twice as fine (teacher_steps -> half),
  with the x-space loss weighted by max(SNR, 1) ("truncated SNR"). Rounds chain: the student
  of one round is the teacher of the next (16 -> 8 -> 4 ...). A teacher without a guidance
  input is guided at ``guidance`` (the student then has the guidance built in and samples
  unguided); a guidance-distilled teacher is run at weights drawn as above.

The student starts from the teacher's weights (its new guidance embedding at zero, so it
begins as the teacher's conditional prediction). The student grid is every other point of the
teacher's (see :func:`imagen.diffusion.schedules.respaced_timesteps`, nested for halvings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from imagen.diffusion.guidance import Conditioning, apply_threshold
from imagen.diffusion.samplers import ddim_step
from imagen.diffusion.schedules import respaced_timesteps
from imagen.models.stage import Stage, StageConfig, TrainingDraws
from imagen.text.encoders import TextEmbedding

MODES = ("guidance", "progressive")
UNIFORMS = 2  # per-sample uniform draws: the guidance weight, the student step


@dataclass
class DistillConfig:
    """What to distil: the objective, the teacher, the range of guidance weights and, for
    progressive distillation, the teacher's step count."""

    mode: str = "guidance"  # guidance | progressive
    teacher: str = ""  # the teacher stage: a stage directory of a model, MODEL_DIR/stageK
    guidance_min: float = 1.0  # guidance weights are drawn uniformly from [min, max]
    guidance_max: float = 6.0
    guidance: float = 3.0  # progressive from a teacher without a guidance input: its weight
    teacher_steps: int = 16  # progressive: the teacher's DDIM steps (the student takes half)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"distillation mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(
                f"need 0 <= guidance_min <= guidance_max, got {self.guidance_min}, "
                f"{self.guidance_max}"
            )
        if self.teacher_steps < 2 or self.teacher_steps % 2:
            raise ValueError(f"teacher_steps must be even and >= 2, got {self.teacher_steps}")


def student_config(teacher: StageConfig, d: DistillConfig) -> StageConfig:
    """The student's stage configuration: the teacher's, with a guidance input (guidance
    mode), or sampled with DDIM at half the teacher's steps (progressive mode). A progressive
    student predicts v (Salimans & Ho 2022): from an eps-prediction teacher it must learn its
    output anew, as x0 = (x - sigma eps) / alpha has no usable value near t = T."""
    if d.mode == "guidance":
        if teacher.unet.guidance_cond:
            raise ValueError("the teacher is already guidance-distilled")
        return replace(teacher, unet=replace(teacher.unet, guidance_cond=True))
    sampling = replace(teacher.sampling, sampler="ddim", eta=0.0, steps=d.teacher_steps // 2)
    if not teacher.unet.guidance_cond:  # the guidance weight is built into the student
        sampling = replace(sampling, guidance=1.0)
    diffusion = teacher.diffusion
    if diffusion.target == "eps":
        diffusion = replace(diffusion, target="v")
    return replace(teacher, sampling=sampling, diffusion=diffusion)


@torch.no_grad()
def init_from_teacher(student: Stage, teacher: Stage) -> None:
    """Copy the teacher's weights into the student; only a new guidance embedding stays."""
    missing, unexpected = student.unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("guidance_mlp.") for k in missing):
        raise ValueError(
            f"the student does not match its teacher: missing {missing}, unexpected {unexpected}"
        )


class Distiller:
    """The loss of a student learning from a frozen teacher (see the module docstring)."""

    def __init__(self, student: Stage, teacher: Stage, config: DistillConfig) -> None:
        self.student, self.teacher, self.config = student, teacher.eval(), config
        teacher.requires_grad_(False)
        self.schedule = student.schedule
        self.steps = config.teacher_steps // 2
        grid = respaced_timesteps(self.schedule.num_timesteps, config.teacher_steps)
        self.grid = torch.tensor(grid + [-1])  # teacher grid; -1 stands for the clean image
        self._threshold = student.config.sampling.threshold

    def loss(
        self,
        images: Tensor,
        text: TextEmbedding,
        draws: TrainingDraws,
        autocast: torch.dtype | None = None,
        net: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """The batch's distillation loss (``draws.u`` holds two uniforms per sample)."""
        draws = draws.to(images.device)
        if draws.u is None:
            raise ValueError("distillation needs the uniform draws (DrawSpec.uniforms)")
        c = self.config
        weight = c.guidance_min + draws.u[:, 0] * (c.guidance_max - c.guidance_min)
        lowres = draws.lowres(images, self.student.config.lowres_size)
        cond = self.student.condition(text, lowres, draws.aug_level, draws.aug_noise, draws.drop)
        if c.mode == "guidance":
            return self._guidance_loss(images, cond, draws, weight, autocast, net)
        return self._progressive_loss(images, cond, draws, weight, autocast, net)

    @property
    def _sr(self) -> bool:
        return self.student.config.is_super_resolution

    def _student_cond(self, cond: Conditioning, weight: Tensor) -> Conditioning:
        return replace(cond, guidance=weight) if self.student.config.unet.guidance_cond else cond

    @torch.no_grad()
    def _teacher_out(
        self, x: Tensor, t: Tensor, cond: Conditioning, weight: Tensor, autocast: torch.dtype | None
    ) -> Tensor:
        """The teacher's guided prediction (its target) at per-sample weights: the drawn ones
        (guidance mode, or a guidance-distilled teacher), else the fixed weight."""
        drawn = self.config.mode == "guidance" or self.teacher.config.unet.guidance_cond
        return self.teacher.guided_output(
            x, t, cond, weight if drawn else self.config.guidance, autocast
        )

    def _guidance_loss(
        self,
        images: Tensor,
        cond: Conditioning,
        draws: TrainingDraws,
        weight: Tensor,
        autocast: torch.dtype | None,
        net: Callable[..., Tensor] | None,
    ) -> Tensor:
        xt = self.schedule.q_sample(images, draws.t, draws.noise)
        target = self._teacher_out(xt, draws.t, cond, weight, autocast)
        pred = self.student.forward(xt, draws.t, self._student_cond(cond, weight), autocast, net)
        return self.student.weighted_loss(pred, target, draws.t)

    def _alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t, with t = -1 the clean image (alpha 1, sigma 0)."""
        alpha, sigma = self.schedule.alpha_sigma(t.clamp(min=0), ndim)
        clean = (t < 0).view(-1, *([1] * (ndim - 1)))
        return torch.where(clean, 1.0, alpha), torch.where(clean, 0.0, sigma)

    def _teacher_x0(
        self, x: Tensor, t: Tensor, cond: Conditioning, weight: Tensor, autocast: torch.dtype | None
    ) -> Tensor:
        out = self._teacher_out(x, t, cond, weight, autocast)
        x0 = self.teacher.schedule.to_x0(out, x, t)
        return apply_threshold(x0, self.teacher.config.sampling.threshold)

    def _ddim(self, x: Tensor, x0: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """One deterministic DDIM step from t to s per sample (s = -1: the clean image)."""
        return ddim_step(x, x0, *self._alpha_sigma(t, x.ndim), *self._alpha_sigma(s, x.ndim))

    def _progressive_loss(
        self,
        images: Tensor,
        cond: Conditioning,
        draws: TrainingDraws,
        weight: Tensor,
        autocast: torch.dtype | None,
        net: Callable[..., Tensor] | None,
    ) -> Tensor:
        grid = self.grid.to(images.device)
        k = (draws.u[:, 1] * self.steps).long().clamp(max=self.steps - 1)
        t, mid, end = grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]
        xt = self.schedule.q_sample(images, t, draws.noise)
        with torch.no_grad():  # the teacher's two steps t -> mid -> end
            x_mid = self._ddim(xt, self._teacher_x0(xt, t, cond, weight, autocast), t, mid)
            x_end = self._ddim(
                x_mid, self._teacher_x0(x_mid, mid, cond, weight, autocast), mid, end
            )
            a_t, s_t = self._alpha_sigma(t, xt.ndim)
            a_e, s_e = self._alpha_sigma(end, xt.ndim)
            # the x0 from which one DDIM step t -> end lands on the teacher's x_end
            target = (x_end - (s_e / s_t) * xt) / (a_e - (s_e / s_t) * a_t)
        pred = self.student.forward(xt, t, self._student_cond(cond, weight), autocast, net)
        # thresholded as the sampler will threshold it: what one student step lands on
        x0 = apply_threshold(self.schedule.to_x0(pred.float(), xt, t), self._threshold)
        snr = self.schedule.snr(t).clamp(min=1.0)
        return (snr * (x0 - target).pow(2).flatten(1).mean(1)).mean()
