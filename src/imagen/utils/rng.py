"""Counter-based random numbers: each value is a pure function of (seed, sample index, stream,
position), computed by a 64-bit hash where the tensors live.

A training batch's random draws then cost a few vectorised kernels on the training device
(no per-sample generator on the host, nothing to copy), and they do not depend on how samples
are batched, split across processes or resumed. The hash is SplitMix64 (Steele, Lea and Flood
2014, the generator that seeds xoshiro): sample i of seed s has the SplitMix64 state
``mix(mix(s) + i)``, and its value k of stream f is the SplitMix64 output for counter
``f * 2**40 + k + 1`` from that state. torch's 64-bit integer arithmetic wraps, as the
algorithm needs; its right shift is arithmetic, so logical shifts are masked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # SplitMix64's constants as signed 64-bit integers
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64
_STREAM = 1 << 40  # positions per stream
_MASK = 2**64 - 1


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 values."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's output function: a bijective mix of 64-bit integers (int64 tensors)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _wrap(x: int) -> int:
    """A Python integer modulo 2**64, as a signed 64-bit value."""
    x &= _MASK
    return x - 2**64 if x >= 2**63 else x


def _mix64_int(x: int) -> int:
    """:func:`mix64` of one Python integer, as a signed 64-bit value (computed on the host: a
    tensor made from it on a GPU would wait for the device)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return _wrap(x ^ (x >> 31))


def sample_states(seed: int, indices: Tensor) -> Tensor:
    """The SplitMix64 state of each sample index (an int64 tensor) under ``seed``."""
    return mix64(indices.to(torch.int64) + _mix64_int(seed))


Positions = int | Tensor  # n (positions 0..n-1), or the positions as an int64 tensor


def bits(states: Tensor, stream: int, n: Positions) -> Tensor:
    """(B, n) 64-bit values: positions 0..n-1 of ``stream`` for each sample state (B,).

    Inside ``torch.compile`` pass the positions as a tensor made outside it: inductor (torch
    2.13) computes 64-bit products of an ``arange`` made in the graph in 32 bits."""
    # counter c = stream * 2**40 + k + 1 advances the state by c * GAMMA (mod 2**64); the
    # constant part is wrapped here (a compiled graph cannot hold it unwrapped)
    offset = _wrap((stream * _STREAM + 1) * _GAMMA)
    k = n if isinstance(n, Tensor) else torch.arange(n, device=states.device, dtype=torch.int64)
    return mix64(states[:, None] + (k * _GAMMA + offset))


def uniform(states: Tensor, stream: int, n: Positions) -> Tensor:
    """(B, n) float32 uniforms in [0, 1), 24 bits each."""
    return _shr(bits(states, stream, n), 40).float() * 2.0**-24


def normal(states: Tensor, stream: int, n: Positions) -> Tensor:
    """(B, n) float32 standard normals (Box-Muller over the two 24-bit halves of each value;
    |z| stays below 5.8)."""
    h = bits(states, stream, n)
    u1 = (_shr(h, 40) + 1).float() * 2.0**-24  # (0, 1]
    u2 = (h & 0xFFFFFF).float() * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)


def integers(states: Tensor, stream: int, high: int) -> Tensor:
    """(B,) int64 values in [0, high) (from 63 bits: the modulo bias is below high / 2**63)."""
    return torch.remainder(_shr(bits(states, stream, 1)[:, 0], 1), high)
