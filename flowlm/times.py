r"""Time samplers for training.

Training draws model times $t \sim U[0, 1]$. Stratifying over the *global* batch (all ranks
together) gives every step an even spread of noise levels and lowers the variance of the loss.
"""

from typing import NamedTuple

import torch

from flowlm._types import Time


def uniform_times(
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    stratified: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Time:
    r"""Uniform model times for this rank's slice of a global batch.

    With ``stratified=True`` the global batch of $G$ = ``batch_size * world_size`` examples
    gets $t_i = (i + u_i)/G$, $u_i \sim U[0, 1)$ independent: exactly one time per stratum
    $[i/G, (i+1)/G)$, each marginally uniform. Rank ``r`` returns strata
    $rB, \dots, (r+1)B - 1$. With a generator seeded alike on every rank, the global draw is
    identical everywhere, so 1 process and $N$ processes see the same times.

    Args:
        batch_size: examples on this rank.
        rank: this process's index.
        world_size: number of processes.
        stratified: one time per stratum instead of i.i.d. uniform.
        generator: random source (CPU).
        device: output device.
        dtype: output dtype.

    Examples:
        >>> t = uniform_times(4, generator=torch.Generator().manual_seed(0))
        >>> [int(4 * v) for v in t]  # one time in each quarter
        [0, 1, 2, 3]
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, "
            f"got batch_size={batch_size}, rank={rank}, world_size={world_size}"
        )
    global_size = batch_size * world_size
    jitter = torch.rand(global_size, generator=generator, dtype=torch.float64)
    if stratified:
        jitter = (torch.arange(global_size, dtype=torch.float64) + jitter) / global_size
    mine = jitter[rank * batch_size : (rank + 1) * batch_size]
    return mine.to(device=device, dtype=dtype)


class TimePair(NamedTuple):
    """Start and end model times of flow-map jumps, ``t <= s`` elementwise."""

    t: Time
    s: Time


def time_pairs(
    batch_size: int,
    *,
    boundary_prob: float = 1 / 64,
    min_gap: float = 1e-6,
    rank: int = 0,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TimePair:
    r"""Jumps $t \to s$ for flow-map distillation.

    The gap $d = s - t$ is stratified uniform over the global batch and clamped to
    ``min_gap``; the start is $t \sim U[0, 1 - d]$; with probability ``boundary_prob`` the pair
    is the whole path $(0, 1)$, the one-step jump.

    Examples:
        >>> pair = time_pairs(8, generator=torch.Generator().manual_seed(0))
        >>> bool((pair.t <= pair.s).all() and (pair.s <= 1).all())
        True
    """
    if not 0.0 <= boundary_prob <= 1.0:
        raise ValueError(f"boundary_prob must lie in [0, 1], got {boundary_prob}")
    gap = uniform_times(
        batch_size, rank=rank, world_size=world_size, generator=generator, dtype=torch.float64
    ).clamp(min_gap, 1.0)
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    global_size = batch_size * world_size
    start = torch.rand(global_size, generator=generator, dtype=torch.float64)[mine] * (1.0 - gap)
    boundary = (
        torch.rand(global_size, generator=generator, dtype=torch.float64)[mine] < boundary_prob
    )
    start = torch.where(boundary, 0.0, start)
    end = torch.where(boundary, 1.0, (start + gap).clamp(max=1.0))
    return TimePair(start.to(device=device, dtype=dtype), end.to(device=device, dtype=dtype))
