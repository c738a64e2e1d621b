"""Time samplers: stratification, uniformity, rank slices of the global batch, jump pairs."""

import math

import pytest
import torch
from jaxtyping import TypeCheckError
from scipy import stats

from flowlm import time_pairs, uniform_times
from flowlm.times import PairSampling

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_time_per_stratum(batch: int, seed: int):
    t = uniform_times(batch, generator=generator(seed), dtype=F64)
    assert t.shape == (batch,)
    assert ((t >= 0) & (t < 1)).all()
    strata = torch.floor(t * batch).long()
    assert torch.equal(strata, torch.arange(batch))


def test_stratified_marginal_is_uniform():
    g = generator(0)
    draws = torch.cat([uniform_times(16, generator=g, dtype=F64) for _ in range(500)])
    assert stats.kstest(draws.numpy(), "uniform").pvalue > 1e-3
    # Within its stratum each time is uniform too (the jitter is not, e.g., always centered).
    jitter = torch.frac(draws * 16)
    assert stats.kstest(jitter.numpy(), "uniform").pvalue > 1e-3
    # One fixed slot's time is uniform on its own stratum [3/16, 4/16).
    slot = torch.stack([uniform_times(16, generator=g, dtype=F64)[3] for _ in range(2000)])
    assert stats.kstest(slot.numpy() * 16 - 3, "uniform").pvalue > 1e-3


def test_iid_mode_is_uniform_and_not_stratified():
    g = generator(1)
    draws = torch.stack(
        [uniform_times(8, stratified=False, generator=g, dtype=F64) for _ in range(1000)]
    )
    assert ((draws >= 0) & (draws < 1)).all()
    assert stats.kstest(draws.flatten().numpy(), "uniform").pvalue > 1e-3
    # Slot 0 is no longer confined to [0, 1/8).
    assert (draws[:, 0] >= 1 / 8).float().mean() > 0.8


def test_a_rank_draws_only_its_own_rows():
    # Rank r's times are (rB + i + u_i)/G with u the first B uniforms of its own generator:
    # no global-batch draw is made anywhere.
    world, batch, seed = 4, 6, 123
    for rank in range(world):
        u = torch.rand(batch, generator=generator(seed + rank), dtype=F64)
        expected = (rank * batch + torch.arange(batch, dtype=F64) + u) / (world * batch)
        t = uniform_times(
            batch, rank=rank, world_size=world, generator=generator(seed + rank), dtype=F64
        )
        assert torch.allclose(t, expected, rtol=0, atol=1e-15)
        iid = uniform_times(
            batch, rank=rank, world_size=world, stratified=False, generator=generator(seed + rank)
        )
        assert torch.equal(iid, torch.rand(batch, generator=generator(seed + rank)))


def test_n_processes_train_like_one_in_distribution_not_bit_for_bit():
    # The guarantee is statistical equivalence: the ranks' union is a stratified draw of the
    # global batch (one time per stratum, uniform inside it), but not the numbers that one
    # process drawing the global batch would get.
    world, batch = 4, 6
    size = world * batch
    unions = []
    for repeat in range(400):
        ranks = [
            uniform_times(
                batch, rank=r, world_size=world, generator=generator(1000 * repeat + r), dtype=F64
            )
            for r in range(world)
        ]
        unions.append(torch.cat(ranks))
    draws = torch.stack(unions)
    strata = torch.floor(draws * size).long()
    assert torch.equal(strata, torch.arange(size).expand_as(strata))
    within = (draws * size - strata).flatten().numpy()
    assert stats.kstest(within, "uniform").pvalue > 1e-3
    one_process = uniform_times(size, generator=generator(0), dtype=F64)
    assert not torch.equal(unions[0], one_process)


@pytest.mark.parametrize(
    ("batch", "rank", "world"), [(4, 4, 4), (4, -1, 4), (4, 0, 0), (0, 0, 1), (-2, 0, 1)]
)
def test_invalid_arguments_raise(batch: int, rank: int, world: int):
    with pytest.raises(ValueError, match=r"rank < world_size|batch_size >= 1"):
        uniform_times(batch, rank=rank, world_size=world)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_uniform_times_dtype_device(dtype: torch.dtype):
    t = uniform_times(5, generator=generator(0), dtype=dtype, device="cpu")
    assert t.dtype == dtype
    assert t.device == torch.device("cpu")


def test_uniform_times_reproducible_and_seed_dependent():
    assert torch.equal(
        uniform_times(9, generator=generator(5)), uniform_times(9, generator=generator(5))
    )
    assert not torch.equal(
        uniform_times(9, generator=generator(5)), uniform_times(9, generator=generator(6))
    )


# ---------------------------------------------------------------- time_pairs


@pytest.mark.parametrize("min_gap", [1e-6, 0.05, 0.3])
def test_time_pairs_order_and_gaps(min_gap: float):
    pair = time_pairs(4096, min_gap=min_gap, boundary_prob=0.0, generator=generator(0), dtype=F64)
    t, s = pair.t, pair.s
    assert t.shape == s.shape == (4096,)
    assert ((0 <= t) & (t <= s) & (s <= 1)).all()
    # The gap s - t is min_gap or more, up to one rounding of s = t + gap.
    assert (s - t >= min_gap - 1e-15).all()
    # The gap is stratified over [0, 1) then clamped: a uniform of the gap above min_gap.
    gap = (s - t).sort().values
    above = gap[gap > min_gap + 1e-12]
    expected = (1 - min_gap) * 4096
    assert abs(above.numel() - expected) <= 1
    # Given the gap, the start is uniform on [0, 1 - gap].
    relative = (t / (1 - (s - t))).clamp(0, 1)
    assert stats.kstest(relative.numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("boundary_prob", [0.0, 1 / 64, 0.25, 1.0])
def test_time_pairs_boundary_fraction(boundary_prob: float):
    n = 20_000
    pair = time_pairs(n, boundary_prob=boundary_prob, generator=generator(2), dtype=F64)
    boundary = (pair.t == 0) & (pair.s == 1)
    count = int(boundary.sum())
    tolerance = 4 * math.sqrt(n * boundary_prob * (1 - boundary_prob)) + 1e-9
    assert abs(count - n * boundary_prob) <= tolerance


def test_boundary_pairs_are_exactly_zero_one():
    pair = time_pairs(1000, boundary_prob=1.0, generator=generator(3))
    assert torch.equal(pair.t, torch.zeros(1000))
    assert torch.equal(pair.s, torch.ones(1000))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_time_pairs_rejects_bad_boundary_prob(bad: float):
    with pytest.raises(ValueError, match="boundary_prob"):
        time_pairs(4, boundary_prob=bad)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_time_pairs_dtype_device(dtype: torch.dtype):
    pair = time_pairs(8, generator=generator(0), dtype=dtype, device="cpu")
    for times in pair:
        assert times.dtype == dtype
        assert times.device == torch.device("cpu")
        assert times.shape == (8,)
    assert pair.t is pair[0]
    assert pair.s is pair[1]


def test_time_pairs_per_rank_keep_the_global_stratification_of_the_gaps():
    world, batch = 4, 32
    size = world * batch
    pairs = [
        time_pairs(
            batch,
            rank=r,
            world_size=world,
            boundary_prob=0.0,
            generator=generator(7 + r),
            dtype=F64,
        )
        for r in range(world)
    ]
    gaps = torch.cat([p.s - p.t for p in pairs])
    strata = torch.floor(gaps * size + 1e-9).long().clamp(max=size - 1)
    assert torch.equal(strata, torch.arange(size))
    for pair in pairs:
        assert (pair.t < pair.s).all()


@pytest.mark.parametrize("min_gap", [2.0, 0.0, -0.1, float("nan")])
def test_time_pairs_rejects_a_min_gap_outside_the_unit_interval(min_gap: float):
    with pytest.raises(ValueError, match=r"min_gap must lie in \(0, 1\]"):
        time_pairs(4, min_gap=min_gap)


def test_time_pairs_never_round_a_start_onto_its_end():
    # Gaps of 1e-9 vanish in float32 near 1; the start then moves one float below its end.
    pair = time_pairs(4096, min_gap=1e-9, generator=generator(3), boundary_prob=0.0)
    assert (pair.t < pair.s).all()


# ---------------------------------------------------------------- time_pairs: sampling schemes
N = 40_000


def first_release_time_pairs(
    batch: int, boundary_prob: float, min_gap: float, seed: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gap-then-start draw as flowlm made it before the schemes were an argument."""
    g = generator(seed)
    wide = F64 if dtype == F64 else torch.float32
    gap = uniform_times(batch, generator=g, dtype=wide).clamp(min_gap, 1.0)
    draws = torch.rand(2, batch, generator=g, dtype=wide)
    boundary = draws[1] < boundary_prob
    start = torch.where(boundary, 0.0, draws[0] * (1.0 - gap)).to(dtype)
    end = torch.where(boundary, 1.0, (start + gap).clamp(max=1.0)).to(dtype)
    return torch.minimum(start, torch.nextafter(end, torch.zeros_like(end))), end


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize(("boundary_prob", "min_gap"), [(1 / 64, 1e-6), (0.3, 1e-3)])
def test_the_default_scheme_is_the_first_releases_draw_bit_for_bit(
    dtype: torch.dtype, boundary_prob: float, min_gap: float
):
    pair = time_pairs(
        1000, boundary_prob=boundary_prob, min_gap=min_gap, generator=generator(5), dtype=dtype
    )
    same = time_pairs(
        1000,
        sampling="gap-then-start",
        boundary_prob=boundary_prob,
        min_gap=min_gap,
        generator=generator(5),
        dtype=dtype,
    )
    start, end = first_release_time_pairs(1000, boundary_prob, min_gap, 5, dtype)
    for got in (pair, same):
        assert torch.equal(got.t, start) and torch.equal(got.s, end)


@pytest.mark.parametrize(
    ("sampling", "mean_t", "mean_gap"),
    [
        ("gap-then-start", 1 / 4, 1 / 2),
        ("start-then-end", 1 / 2, 1 / 4),
        ("sorted-uniform", 1 / 3, 1 / 3),
    ],
)
def test_each_scheme_has_its_laws_moments(sampling: PairSampling, mean_t: float, mean_gap: float):
    pair = time_pairs(N, sampling=sampling, boundary_prob=0.0, generator=generator(0), dtype=F64)
    gap = pair.s - pair.t
    for values, expected in ((pair.t, mean_t), (gap, mean_gap)):
        standard_error = values.std() / math.sqrt(N)  # i.i.d. bound; the strata only lower it
        assert abs(values.mean().item() - expected) < 5 * standard_error.item()
    assert bool((pair.t < pair.s).all() and (pair.t >= 0).all() and (pair.s <= 1).all())


def test_sorted_uniform_is_uniform_on_the_triangle():
    pair = time_pairs(N, sampling="sorted-uniform", boundary_prob=0.0, generator=generator(1))
    for x in (0.2, 0.5, 0.8):  # P(s <= x) = x^2, P(t <= x) = 1 - (1 - x)^2
        for values, probability in ((pair.s, x**2), (pair.t, 1 - (1 - x) ** 2)):
            rate = (values <= x).double().mean().item()
            assert abs(rate - probability) < 5 * math.sqrt(probability * (1 - probability) / N)


def test_start_then_end_ends_uniformly_after_a_stratified_start():
    pair = time_pairs(
        N, sampling="start-then-end", boundary_prob=0.0, generator=generator(4), dtype=F64
    )
    assert torch.equal(torch.floor(pair.t * N).long(), torch.arange(N))  # t: one per stratum
    fraction = ((pair.s - pair.t) / (1 - pair.t)).double()  # U[0, 1] given t
    assert stats.kstest(fraction.numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("sampling", ["start-then-end", "sorted-uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_boundary_pairs_and_small_gaps_in_every_scheme(sampling: PairSampling, dtype: torch.dtype):
    pair = time_pairs(
        N,
        sampling=sampling,
        boundary_prob=0.25,
        min_gap=0.01,
        generator=generator(2),
        dtype=dtype,
    )
    assert pair.t.dtype == pair.s.dtype == dtype
    rate = ((pair.t == 0) & (pair.s == 1)).double().mean().item()
    assert abs(rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)
    assert bool(((pair.s - pair.t) >= 0.01 - 1e-6).all())
    assert bool((pair.t < pair.s).all())


def test_an_unknown_scheme_is_refused(checks: str):
    match = "parameter 'sampling'" if checks == "jaxtyping" else "unknown pair sampling"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        time_pairs(4, sampling="end-then-start")  # pyright: ignore[reportArgumentType]
