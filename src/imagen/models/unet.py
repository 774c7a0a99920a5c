"""The text-conditioned U-Net of Imagen (Saharia et al. 2022, sec. 2.4 and appendix B).

Residual blocks with GroupNorm, SiLU and scale/shift from the conditioning embedding;
sinusoidal timestep embeddings; attention in which the image tokens attend to the text
tokens concatenated to their own keys and values (the paper's scheme) or to the text tokens
alone (cross-attention, as in the paper's 256->1024 model); a pooled text embedding added
to the timestep embedding; optional super-resolution conditioning on an upsampled low-res
image and its noise-augmentation level; and the Efficient U-Net options.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from imagen.models.limits import MAX_BLOCKS, MAX_IMAGE_SIZE, MAX_LEVELS, MAX_WIDTH, check_range
from imagen.text.encoders import masked_mean
from imagen.utils.config import config_from_dict


@dataclass
class UNetConfig:
    """Architecture of one U-Net. Every field is used; the defaults are a small 32 px base."""

    image_size: int = 32  # side of the (square) images the U-Net denoises
    in_channels: int = 3  # image channels (the low-res image adds as many again for SR)
    channels: int = 64  # width of the first level
    channel_mults: tuple[int, ...] = (1, 2, 4)  # width multiplier per level
    # residual blocks per level, or one count for every level (Efficient U-Net: more at low res)
    num_res_blocks: tuple[int, ...] | int = (2, 2, 2)
    attn_resolutions: tuple[int, ...] = (16, 8)  # self-attention with text tokens in keys/values
    cross_attn_resolutions: tuple[int, ...] = ()  # text cross-attention without self-attention
    attn_head_dim: int = 32  # channels per attention head
    text_dim: int = 384  # width of the text encoder's token embeddings
    lowres_cond: bool = False  # super-resolution stage: concatenate the upsampled low-res image
    guidance_cond: bool = False  # take the guidance weight as an input (guidance distillation)
    dropout: float = 0.0  # dropout inside residual blocks
    norm_groups: int = 32  # GroupNorm groups (the largest divisor of the width up to this)
    downsample_first: bool = False  # Efficient U-Net: downsample before the blocks of each level
    scale_skip: bool = False  # Efficient U-Net: scale skip connections by 1/sqrt(2)

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = (self.num_res_blocks,) * len(self.channel_mults)
        self.num_res_blocks = tuple(int(n) for n in self.num_res_blocks)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.cross_attn_resolutions = tuple(int(r) for r in self.cross_attn_resolutions)
        if len(self.num_res_blocks) != len(self.channel_mults):
            raise ValueError(
                f"num_res_blocks has {len(self.num_res_blocks)} entries but channel_mults has "
                f"{len(self.channel_mults)}; give one per level"
            )
        levels = len(self.channel_mults) + (1 if self.downsample_first else 0) - 1
        if self.image_size % (2**levels) != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{levels} "
                f"(the number of downsamplings)"
            )

    @property
    def learned_variance(self) -> bool:
        """The project's U-Net predicts the stage's target only (no variance channels)."""
        return False

    def check_sizes(self, source: str) -> None:
        """Raise unless every size is within the limits of models/limits.py (an untrusted
        config cannot ask for absurd memory)."""
        check_range(source, "unet.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_range(source, "unet.in_channels", self.in_channels, 1, 64)
        check_range(source, "unet.channels", self.channels, 1, MAX_WIDTH)
        check_range(source, "unet.channel_mults", self.channel_mults, 1, MAX_WIDTH)
        if not 1 <= len(self.channel_mults) <= MAX_LEVELS:
            raise ValueError(f"{source}: unet.channel_mults must have 1 to {MAX_LEVELS} levels")
        widest = self.channels * max(self.channel_mults)
        if widest > MAX_WIDTH:
            raise ValueError(f"{source}: unet is {widest} channels wide (the limit is {MAX_WIDTH})")
        check_range(source, "unet.num_res_blocks", self.num_res_blocks, 0, MAX_BLOCKS)
        check_range(source, "unet.attn_resolutions", self.attn_resolutions, 1)
        check_range(source, "unet.cross_attn_resolutions", self.cross_attn_resolutions, 1)
        check_range(source, "unet.attn_head_dim", self.attn_head_dim, 1, MAX_WIDTH)
        check_range(source, "unet.text_dim", self.text_dim, 1, MAX_WIDTH)
        check_range(source, "unet.norm_groups", self.norm_groups, 1, MAX_WIDTH)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{source}: unet.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        return config_from_dict(cls, data)


GUIDANCE_SCALE = 100.0  # guidance weights (about 1 to 10) spread over the embedding's periods


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with scale/shift from the conditioning embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head attention of image tokens over text tokens (and, with ``self_attend``, over
    the image tokens too: the paper's concatenation of text into self-attention keys/values).

    A learned null key/value is always attendable, so an all-padding caption (the null
    condition of classifier-free guidance) is well defined.
    """

    def __init__(
        self, channels: int, text_dim: int, head_dim: int, groups: int, self_attend: bool
    ) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.self_attend = self_attend
        self.norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels) if self_attend else None
        self.text_kv = nn.Linear(text_dim, 2 * channels)
        self.null_kv = nn.Parameter(torch.randn(2, channels) * 0.02)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(h)
        tk, tv = self.text_kv(text).chunk(2, dim=-1)  # (B, L, C)
        nk, nv = self.null_kv.to(q.dtype)[:, None, None, :].expand(2, b, 1, c)
        keys, values = [nk, tk], [nv, tv]
        ones = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        masks = [ones, text_mask]
        if self.to_kv is not None:
            ik, iv = self.to_kv(h).chunk(2, dim=-1)
            keys.append(ik)
            values.append(iv)
            masks.append(ones.expand(b, hgt * wid))
        k = torch.cat(keys, dim=1)
        v = torch.cat(values, dim=1)
        mask = torch.cat(masks, dim=1)[:, None, None, :]  # (B, 1, 1, Lk)

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        o = self.out(o.transpose(1, 2).flatten(2))
        return x + o.transpose(1, 2).reshape(b, c, hgt, wid)


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """A residual block, optionally followed by attention."""

    def __init__(self, cin: int, cout: int, res: int, cfg: UNetConfig, emb_dim: int) -> None:
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, cfg.norm_groups, cfg.dropout)
        self.attn: Attention | None = None
        if res in cfg.attn_resolutions or res in cfg.cross_attn_resolutions:
            self_attend = res in cfg.attn_resolutions
            self.attn = Attention(
                cout, cfg.text_dim, cfg.attn_head_dim, cfg.norm_groups, self_attend
            )

    def forward(self, x: Tensor, emb: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, text, mask)
        return x


class UNet(nn.Module):
    """Predicts the stage's target (eps, v or x0) from a noisy image, its timestep, the text
    tokens and mask, and for super-resolution the low-res image and its augmentation level."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.text_pool = nn.Linear(cfg.text_dim, emb_dim)
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.aug_mlp = (
            nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if cfg.lowres_cond
            else None
        )
        # the guidance weight's embedding starts at zero: a student initialised from its teacher
        # begins as the teacher's conditional prediction (Meng et al. 2023)
        self.guidance_mlp = (
            nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), zero_init(nn.Linear(emb_dim, emb_dim)))
            if cfg.guidance_cond
            else None
        )
        cin = cfg.in_channels * (2 if cfg.lowres_cond else 1)
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.skip_scale = 2**-0.5 if cfg.scale_skip else 1.0

        self.down = nn.ModuleList()  # each entry: ("block" | "down", module)
        self.down_kinds: list[str] = []
        skip_chs: list[int] = [] if cfg.downsample_first else [ch]
        cur, res = ch, cfg.image_size
        last = len(cfg.channel_mults) - 1
        for i, (mult, n) in enumerate(zip(cfg.channel_mults, cfg.num_res_blocks, strict=True)):
            out = ch * mult
            if cfg.downsample_first:
                self._add(self.down, self.down_kinds, "down", Downsample(cur, cur))
                res //= 2
            for _ in range(n):
                self._add(self.down, self.down_kinds, "block", Block(cur, out, res, cfg, emb_dim))
                cur = out
                skip_chs.append(cur)
            if not cfg.downsample_first and i != last:
                self._add(self.down, self.down_kinds, "down", Downsample(cur, cur))
                res //= 2
                skip_chs.append(cur)

        self.mid1 = ResBlock(cur, cur, emb_dim, cfg.norm_groups, cfg.dropout)
        self.mid_attn = Attention(cur, cfg.text_dim, cfg.attn_head_dim, cfg.norm_groups, True)
        self.mid2 = ResBlock(cur, cur, emb_dim, cfg.norm_groups, cfg.dropout)

        self.up = nn.ModuleList()
        self.up_kinds: list[str] = []
        extra = 0 if cfg.downsample_first else 1  # standard U-Nets consume one more skip per level
        for i in reversed(range(len(cfg.channel_mults))):
            out = ch * cfg.channel_mults[i]
            for _ in range(cfg.num_res_blocks[i] + extra):
                blk = Block(cur + skip_chs.pop(), out, res, cfg, emb_dim)
                self._add(self.up, self.up_kinds, "block", blk)
                cur = out
            if cfg.downsample_first or i != 0:
                self._add(self.up, self.up_kinds, "up", Upsample(cur, cur))
                res *= 2
        if cfg.downsample_first:  # the full-resolution features of conv_in rejoin at the end
            self.final_block: ResBlock | None = ResBlock(
                cur + ch, ch, emb_dim, cfg.norm_groups, cfg.dropout
            )
            cur = ch
        else:
            self.final_block = None
        assert not skip_chs and res == cfg.image_size
        self.norm_out = group_norm(cur, cfg.norm_groups)
        self.conv_out = zero_init(nn.Conv2d(cur, cfg.in_channels, 3, padding=1))
        self.activation_checkpointing = False  # a training option, not part of the config

    def _run(self, block: nn.Module, *args: Tensor) -> Tensor:
        """``block(*args)``, recomputed in the backward pass when activation checkpointing."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @staticmethod
    def _add(modules: nn.ModuleList, kinds: list[str], kind: str, module: nn.Module) -> None:
        modules.append(module)
        kinds.append(kind)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, H, W) noisy image; t: (B,) timesteps; text: (B, L, D) token embeddings;
        text_mask: (B, L) bool, True for real tokens; lowres: (B, C, H, W) low-res image already
        upsampled to H x W (SR only); aug_level: (B,) its augmentation timestep (SR only);
        guidance: (B,) the guidance weight (guidance-distilled U-Nets only)."""
        cfg = self.config
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            raise ValueError(
                f"U-Net expects {cfg.image_size}x{cfg.image_size} images, got {tuple(x.shape[-2:])}"
            )
        if text.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"U-Net expects text embeddings of width {cfg.text_dim}, got {text.shape[-1]} "
                "(was the model trained with another text encoder?)"
            )
        emb = self.time_mlp(timestep_embedding(t, cfg.channels))
        emb = emb + self.text_pool(masked_mean(text, text_mask))
        if cfg.lowres_cond:
            if lowres is None or aug_level is None:
                raise ValueError("a super-resolution U-Net needs `lowres` and `aug_level`")
            emb = emb + self.aug_mlp(timestep_embedding(aug_level, cfg.channels))
            x = torch.cat([x, lowres.to(x.dtype)], dim=1)
        if self.guidance_mlp is not None:
            if guidance is None:
                raise ValueError("a guidance-distilled U-Net needs the guidance weight")
            emb = emb + self.guidance_mlp(
                timestep_embedding(guidance * GUIDANCE_SCALE, cfg.channels)
            )
        text = self.text_norm(text)

        h = self.conv_in(x)
        h0 = h
        skips = [] if cfg.downsample_first else [h]
        for kind, mod in zip(self.down_kinds, self.down, strict=True):
            if kind == "down":
                h = mod(h)
                if not cfg.downsample_first:
                    skips.append(h)
            else:
                h = self._run(mod, h, emb, text, text_mask)
                skips.append(h)
        h = self._run(self.mid1, h, emb)
        h = self._run(self.mid_attn, h, text, text_mask)
        h = self._run(self.mid2, h, emb)
        for kind, mod in zip(self.up_kinds, self.up, strict=True):
            if kind == "up":
                h = mod(h)
            else:
                h = torch.cat([h, skips.pop() * self.skip_scale], dim=1)
                h = self._run(mod, h, emb, text, text_mask)
        if self.final_block is not None:
            h = self.final_block(torch.cat([h, h0 * self.skip_scale], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["UNet", "UNetConfig", "config_from_dict", "count_parameters"]
