"""The v2 recipe options: pair-sampling laws, the diagonal split and the logit soft-cap."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError

import flowlm as fl
from flowlm.recipes import (
    PairSampling,
    SoftCapped,
    diagonal_split,
    sample_time_pairs,
    soft_cap,
)

N = 40_000


def test_the_default_scheme_is_todays_time_pairs_bit_for_bit() -> None:
    got = sample_time_pairs(257, boundary_prob=0.1, generator=torch.Generator().manual_seed(3))
    expected = fl.time_pairs(257, boundary_prob=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got.t, expected.t) and torch.equal(got.s, expected.s)


@pytest.mark.parametrize(
    ("sampling", "mean_t", "mean_gap"),
    [
        ("gap-then-start", 1 / 4, 1 / 2),
        ("start-then-end", 1 / 2, 1 / 4),
        ("sorted-uniform", 1 / 3, 1 / 3),
    ],
)
def test_each_scheme_has_its_laws_moments(
    sampling: PairSampling, mean_t: float, mean_gap: float
) -> None:
    pair = sample_time_pairs(
        N,
        sampling,
        boundary_prob=0.0,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    gap = pair.s - pair.t
    for values, expected in ((pair.t, mean_t), (gap, mean_gap)):
        standard_error = values.std() / math.sqrt(N)
        assert abs(values.mean().item() - expected) < 5 * standard_error.item()
    assert bool((pair.t < pair.s).all() and (pair.t >= 0).all() and (pair.s <= 1).all())


def test_sorted_uniform_is_uniform_on_the_triangle() -> None:
    pair = sample_time_pairs(
        N, "sorted-uniform", boundary_prob=0.0, generator=torch.Generator().manual_seed(1)
    )
    for x in (0.2, 0.5, 0.8):  # P(s <= x) = x^2, P(t <= x) = 1 - (1 - x)^2
        for values, probability in ((pair.s, x**2), (pair.t, 1 - (1 - x) ** 2)):
            rate = (values <= x).double().mean().item()
            assert abs(rate - probability) < 5 * math.sqrt(probability * (1 - probability) / N)


@pytest.mark.parametrize("sampling", ["start-then-end", "sorted-uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_pairs_and_small_gaps(sampling: PairSampling, dtype: torch.dtype) -> None:
    pair = sample_time_pairs(
        N,
        sampling,
        boundary_prob=0.25,
        min_gap=0.01,
        generator=torch.Generator().manual_seed(2),
        dtype=dtype,
    )
    assert pair.t.dtype == pair.s.dtype == dtype
    boundary = (pair.t == 0) & (pair.s == 1)
    rate = boundary.double().mean().item()
    assert abs(rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)
    assert bool(((pair.s - pair.t) >= 0.01 - 1e-6).all())
    assert bool((pair.t < pair.s).all())


def test_bad_pair_options_are_refused(checks: str) -> None:
    match = "parameter 'sampling'" if checks == "jaxtyping" else "unknown pair sampling"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        sample_time_pairs(4, "end-then-start")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="boundary_prob"):
        sample_time_pairs(4, "sorted-uniform", boundary_prob=2.0)
    with pytest.raises(ValueError, match="min_gap"):
        sample_time_pairs(4, "start-then-end", min_gap=0.0)


@given(batch=st.integers(1, 40), fraction=st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_the_diagonal_split_covers_the_batch_once(batch: int, fraction: float) -> None:
    split = diagonal_split(batch, fraction, generator=torch.Generator().manual_seed(0))
    assert len(split.diagonal) == math.floor(fraction * batch + 0.5)
    assert sorted(torch.cat(split).tolist()) == list(range(batch))


def test_every_row_is_diagonal_equally_often() -> None:
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    repeats = 4000
    for _ in range(repeats):
        counts[diagonal_split(10, 0.3, generator=generator).diagonal] += 1
    rates = counts / repeats
    assert ((rates - 0.3).abs() < 5 * math.sqrt(0.3 * 0.7 / repeats)).all()


def test_bad_diagonal_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="diagonal fraction"):
        diagonal_split(8, 1.5)
    with pytest.raises(ValueError, match="batch_size"):
        diagonal_split(0, 0.5)


def test_soft_cap_is_a_bounded_odd_near_identity() -> None:
    z = torch.linspace(-200, 200, 2001, dtype=torch.float64, requires_grad=True)
    capped = soft_cap(z, 30.0)
    torch.testing.assert_close(capped, 30.0 * torch.tanh(z / 30.0))
    assert bool((capped.abs() < 30.0).all())
    torch.testing.assert_close(soft_cap(-z, 30.0), -capped)
    small = z.detach().abs() < 3
    # tanh(u) = u - u^3/3 + ...: |c tanh(z/c) - z| <= |z|^3 / (3 c^2)
    error = (capped.detach() - z.detach())[small].abs()
    assert bool((error <= z.detach()[small].abs() ** 3 / (3 * 30.0**2) + 1e-12).all())
    (slope,) = torch.autograd.grad(capped[1000], z)
    assert slope[1000].item() == pytest.approx(1.0)
    assert bool((torch.diff(capped.detach()) > 0).all())
    with pytest.raises(ValueError, match="positive"):
        soft_cap(z, 0.0)


@pytest.mark.parametrize("two_time", [False, True])
def test_a_soft_capped_backbone_feeds_capped_logits_to_the_predictor(two_time: bool) -> None:
    from flowlm.backbones import DiT

    network = DiT(6, dim=16, depth=1, heads=2, two_time=two_time, dropout=0.0)
    with torch.no_grad():
        network.output.weight.normal_(std=20.0)
    x, t = torch.randn(2, 3, 6), torch.rand(2)
    times = (t, torch.ones(2)) if two_time else (t,)
    predictor = fl.XPredictor(SoftCapped(network, cap=5.0))
    with fl.count_network_calls() as calls:
        logits = predictor.logits(x, *times)
    assert calls.count == 1
    raw = network(x, *times)
    assert raw.abs().max() > 5.0
    torch.testing.assert_close(logits, 5.0 * torch.tanh(raw / 5.0))
    with pytest.raises(ValueError, match="positive"):
        SoftCapped(network, cap=-1.0)
