r"""Time samplers for training, drawn on the device and only for this process's rows.

Training draws model times $t \sim U[0, 1]$. Stratifying over the *global* batch (all ranks
together) gives every step an even spread of noise levels and lowers the variance of the loss.

**What "N processes train like one" means.** Rank $r$ of $N$ draws only its own $B$ rows,
on its own device, from its own generator: it gets the strata $rB, \dots, (r+1)B - 1$ of
the global batch of $G = NB$. So the global batch is, in distribution, exactly the
stratified draw one process would make for $G$ examples (every stratum holds one time,
uniform within it, all independent), but not the same numbers: the guarantee is
statistical equivalence, not bit-for-bit equality with a one-process run. Seed each rank's
generator differently (e.g. ``seed + rank``); seeding them alike still gives valid strata,
with the jitter inside them shared.
"""

from typing import Literal, NamedTuple, get_args

import torch

from flowlm._types import ExampleTime


def _check_ranks(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, "
            f"got batch_size={batch_size}, rank={rank}, world_size={world_size}"
        )


def uniform_times(
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    stratified: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ExampleTime:
    r"""Uniform model times for this rank's rows of a global batch, drawn on ``device``.

    With ``stratified=True`` the global batch of $G$ = ``batch_size * world_size`` examples
    has $t_i = (i + u_i)/G$, $u_i \sim U[0, 1)$ independent: exactly one time per stratum
    $[i/G, (i+1)/G)$, each marginally uniform. Rank ``r`` draws only its rows
    $i = rB, \dots, (r+1)B - 1$ (see the module notes for what that means across processes).

    Args:
        batch_size: examples on this rank.
        rank: this process's index.
        world_size: number of processes.
        stratified: one time per stratum instead of i.i.d. uniform.
        generator: random source, on ``device``.
        device: where the times are drawn and returned.
        dtype: output dtype (the strata are computed in float64 when it is).

    Examples:
        >>> t = uniform_times(4, generator=torch.Generator().manual_seed(0))
        >>> [int(4 * v) for v in t]  # one time in each quarter
        [0, 1, 2, 3]
    """
    _check_ranks(batch_size, rank, world_size)
    jitter = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
    if not stratified:
        return jitter
    first = rank * batch_size
    strata = torch.arange(first, first + batch_size, device=device, dtype=dtype)
    times = (strata + jitter) / (batch_size * world_size)
    upper = torch.nextafter((strata + 1) / (batch_size * world_size), strata.new_zeros(()))
    return torch.minimum(times, upper)  # round-off never lifts a time into the next stratum


class TimePair(NamedTuple):
    """Start and end model times of flow-map jumps, ``t < s`` elementwise."""

    t: ExampleTime
    s: ExampleTime


PairSampling = Literal["gap-then-start", "start-then-end", "sorted-uniform"]
"""How `time_pairs` draws a jump $t \\to s$ (its ``sampling`` argument)."""


def time_pairs(
    batch_size: int,
    *,
    sampling: PairSampling = "gap-then-start",
    boundary_prob: float = 1 / 64,
    min_gap: float = 1e-6,
    rank: int = 0,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TimePair:
    r"""Jumps $t \to s$ for flow-map distillation, drawn on ``device`` for this rank's rows.

    One stratified uniform $a$ per row (`uniform_times`, over the global batch) and one plain
    uniform $b$ make the pair, by ``sampling``:

    - ``"gap-then-start"`` (the default, and the authors' choice): the gap $d = a$, then the
      start $t = b\,(1 - d)$, uniform on $[0, 1 - d]$ (density $\propto 1/(1 - d)$ on the
      triangle $t < s$; $\mathbb{E}[t] = \tfrac14$, $\mathbb{E}[d] = \tfrac12$).
    - ``"start-then-end"``: $t = a$, then $s = t + (1 - t)\,b$, uniform on $[t, 1]$
      ($\mathbb{E}[t] = \tfrac12$, $\mathbb{E}[d] = \tfrac14$: short jumps).
    - ``"sorted-uniform"``: $(t, s) = (\min(a, b), \max(a, b))$, uniform on the triangle
      ($\mathbb{E}[t] = \mathbb{E}[d] = \tfrac13$).

    Gaps are at least ``min_gap``; with probability ``boundary_prob`` the pair is the whole
    path $(0, 1)$, the one-step jump. In the output dtype $s > t$ always holds (a start that
    rounds onto its end moves one step below it).

    Args:
        batch_size: pairs on this rank.
        sampling: the scheme.
        boundary_prob: probability of the pair $(0, 1)$.
        min_gap: smallest gap, in (0, 1].
        rank: this process's index.
        world_size: number of processes.
        generator: random source, on ``device``.
        device: where the times are drawn and returned.
        dtype: output dtype.

    Examples:
        >>> pair = time_pairs(8, generator=torch.Generator().manual_seed(0))
        >>> bool((pair.t < pair.s).all() and (pair.s <= 1).all())
        True
        >>> short = time_pairs(8, sampling="start-then-end", boundary_prob=0.0)
        >>> bool((short.s - short.t >= 1e-6).all())
        True
    """
    if sampling not in get_args(PairSampling):
        raise ValueError(
            f"unknown pair sampling {sampling!r}: choose one of {get_args(PairSampling)}"
        )
    if not 0.0 <= boundary_prob <= 1.0:
        raise ValueError(f"boundary_prob must lie in [0, 1], got {boundary_prob}")
    if not 0.0 < min_gap <= 1.0:
        raise ValueError(f"min_gap must lie in (0, 1], got {min_gap}")
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    stratified = uniform_times(
        batch_size,
        rank=rank,
        world_size=world_size,
        generator=generator,
        device=device,
        dtype=wide,
    )
    draws = torch.rand(2, batch_size, generator=generator, device=device, dtype=wide)
    if sampling == "gap-then-start":
        gap = stratified.clamp(min_gap, 1.0)
        start = draws[0] * (1.0 - gap)
    elif sampling == "start-then-end":
        start = stratified.clamp(max=1.0 - min_gap)
        gap = ((1.0 - start) * draws[0]).clamp(min=min_gap)
    else:
        start = torch.minimum(stratified, draws[0]).clamp(max=1.0 - min_gap)
        gap = (torch.maximum(stratified, draws[0]) - start).clamp(min=min_gap)
    boundary = draws[1] < boundary_prob
    start = torch.where(boundary, 0.0, start).to(dtype)
    end = torch.where(boundary, 1.0, (start + gap).clamp(max=1.0)).to(dtype)
    start = torch.minimum(start, torch.nextafter(end, torch.zeros_like(end)))
    return TimePair(start, end)
