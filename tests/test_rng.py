"""The counter-based generator of training draws: SplitMix64 exactly, sound distributions, and
draws that depend only on (seed, sample index)."""

import math

import torch

from imagen.training.data import DrawSpec, draw_batch
from imagen.utils import rng

MASK = 2**64 - 1


def splitmix64(state: int) -> int:
    """The reference output function (Steele, Lea and Flood 2014), on Python integers."""
    z = state & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_bits_are_splitmix64_outputs():
    seed, indices = 12345, [0, 1, 7, 2**40 + 3]
    states = rng.sample_states(seed, torch.tensor(indices))
    got = rng.bits(states, 2, 5)
    for row, i in zip(got.tolist(), indices, strict=True):
        state = splitmix64(splitmix64(seed) + i)
        for k, value in enumerate(row):
            want = splitmix64(state + (2 * 2**40 + k + 1) * 0x9E3779B97F4A7C15)
            assert value & MASK == want


def test_uniforms_normals_and_integers_have_their_distributions():
    states = rng.sample_states(0, torch.arange(64))
    u = rng.uniform(states, 0, 4096).flatten()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    z = rng.normal(states, 1, 4096).flatten().double()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z**4).mean() - 3) < 0.1  # kurtosis of a normal
    assert abs((z.abs() < 1).double().mean() - math.erf(1 / math.sqrt(2))) < 0.01
    t = rng.integers(rng.sample_states(0, torch.arange(100_000)), 0, 10)
    counts = torch.bincount(t, minlength=10).double()
    assert t.min() >= 0 and t.max() < 10 and (counts / 10_000 - 1).abs().max() < 0.05


def test_streams_and_seeds_are_independent():
    states = rng.sample_states(0, torch.arange(256))
    a, b = rng.normal(states, 1, 512).flatten(), rng.normal(states, 4, 512).flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.01
    other = rng.normal(rng.sample_states(1, torch.arange(256)), 1, 512).flatten()
    assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1]) < 0.01


def _sr_spec(seed: int, cond_drop: float) -> DrawSpec:
    """Every kind of draw: a super-resolution stage's, with distillation uniforms and blur."""
    shape = (3, 8, 8)
    return DrawSpec(seed, shape, 1000, cond_drop, aug_max=0.5, uniforms=2, blur_max=1.0)


def test_a_sample_draws_the_same_in_any_batch():
    spec = _sr_spec(seed=3, cond_drop=0.5)
    whole = draw_batch(spec, 0, 10, torch.device("cpu"))
    part = draw_batch(spec, 4, 3, torch.device("cpu"))
    for full, piece in zip(whole._fields(), part._fields(), strict=True):
        assert torch.equal(full[4:7], piece)
    again = draw_batch(spec, 0, 10, torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(whole._fields(), again._fields(), strict=True))
    assert whole.noise.shape == (10, 3, 8, 8) and whole.t.dtype == torch.int64
    assert whole.aug_level.min() >= 0 and whole.aug_level.max() < 0.5
    assert whole.drop.dtype == torch.bool and whole.u.shape == (10, 2)
    assert whole.blur.min() >= 0 and whole.blur.max() < 1.0 and whole.blur.shape == (10,)


def test_compiled_draws_equal_eager_draws():
    # inside torch.compile the batch start is a tensor and the positions come from outside the
    # graph (inductor computes 64-bit products of an in-graph arange in 32 bits)
    spec = _sr_spec(seed=7, cond_drop=0.1)
    cpu = torch.device("cpu")
    compiled = torch.compile(lambda first, pos: draw_batch(spec, first, 5, cpu, pos), dynamic=False)
    for start in (5, 123_456_789_012):
        got = compiled(torch.tensor(start), spec.positions(cpu))
        want = draw_batch(spec, start, 5, cpu)
        for g, w in zip(got._fields(), want._fields(), strict=True):
            if w.dtype.is_floating_point:  # the compiled log and cos round differently
                torch.testing.assert_close(g, w, rtol=0, atol=2e-6)
            else:
                assert torch.equal(g, w)
