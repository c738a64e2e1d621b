r"""Options of the v2 distillation recipe (the authors' later code), defaults equal to flowlm's.

FMLM's later recipe differs from the first release in a few knobs (arXiv 2602.16813, later
versions, and the authors' later code). Each is an option here, with a default that leaves
today's training unchanged; the authors' values are given with each.

- **Pair sampling** (`sample_time_pairs`): how jumps $t \to s$ are drawn. ``"gap-then-start"``
  (a stratified gap $d$, then $t \sim U[0, 1 - d]$: `flowlm.time_pairs`, the default and the
  authors' choice), ``"start-then-end"`` ($t$ stratified, then $s \sim U[t, 1]$) or
  ``"sorted-uniform"`` (two uniform times, sorted: uniform on the triangle $t < s$).
- **Boundary probability**: the chance of the whole-path pair $(0, 1)$ (1/64 by default, 1/32
  in the authors' code).
- **Diagonal fraction** (`diagonal_split`): the authors train a fixed fraction of each batch
  on the diagonal $\delta_{t,t}$ only (0.5) and the rest on jumps only; flowlm's default
  trains both terms on every row (`flowlm.distill.semigroup_kl_loss`).
- **β₂** of AdamW (``torch.optim.AdamW(..., betas=(0.9, beta2))``): 0.95 in the authors'
  code, 0.999 in the released LM1B model.
- **No learned loss weighting** in the authors' code (`flowlm.LearnedTimeWeighting` is optional).
- **Logit soft-cap** (`soft_cap`, `SoftCapped`): $30\tanh(z/30)$ before the log-softmax, in FLM
  and FMLM; none by default.
"""

import math
from typing import Literal, NamedTuple, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from flowlm._types import Logits, Probs, State, Time
from flowlm.protocols import Backbone
from flowlm.self_conditioning import SelfConditionedBackbone
from flowlm.times import TimePair, time_pairs, uniform_times

PairSampling = Literal["gap-then-start", "start-then-end", "sorted-uniform"]
"""How `sample_time_pairs` draws a jump $t \\to s$."""


def sample_time_pairs(
    batch_size: int,
    sampling: PairSampling = "gap-then-start",
    *,
    boundary_prob: float = 1 / 64,
    min_gap: float = 1e-6,
    rank: int = 0,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TimePair:
    r"""Jumps $t \to s$ drawn by the chosen scheme, on ``device``, for this rank's rows.

    - ``"gap-then-start"``: exactly `flowlm.time_pairs` (gap $d$ stratified, $t \sim U[0,1-d]$;
      density $\propto 1/(1 - d)$ on the triangle, $\mathbb{E}[d] = \tfrac12$).
    - ``"start-then-end"``: $t$ stratified, $s = t + (1 - t)u$, $u \sim U[0, 1]$
      ($\mathbb{E}[t] = \tfrac12$, $\mathbb{E}[d] = \tfrac14$).
    - ``"sorted-uniform"``: $(t, s)$ the sorted pair of two uniform times (uniform on the
      triangle, $\mathbb{E}[t] = \tfrac13$, $\mathbb{E}[d] = \tfrac13$).

    Gaps are at least ``min_gap``; with probability ``boundary_prob`` a pair is $(0, 1)$; in
    the output dtype $s > t$ always holds.

    Args:
        batch_size: pairs on this rank.
        sampling: the scheme.
        boundary_prob: probability of the pair $(0, 1)$.
        min_gap: smallest gap, in (0, 1].
        rank: this process's index (stratified schemes).
        world_size: number of processes.
        generator: random source, on ``device``.
        device: where the times are drawn and returned.
        dtype: output dtype.

    Examples:
        >>> pair = sample_time_pairs(8, "sorted-uniform", generator=torch.Generator().manual_seed(0))
        >>> bool((pair.t < pair.s).all() and (pair.s <= 1).all())
        True
    """
    if sampling not in get_args(PairSampling):
        raise ValueError(
            f"unknown pair sampling {sampling!r}: choose one of {get_args(PairSampling)}"
        )
    if sampling == "gap-then-start":
        return time_pairs(
            batch_size,
            boundary_prob=boundary_prob,
            min_gap=min_gap,
            rank=rank,
            world_size=world_size,
            generator=generator,
            device=device,
            dtype=dtype,
        )
    if not 0.0 <= boundary_prob <= 1.0:
        raise ValueError(f"boundary_prob must lie in [0, 1], got {boundary_prob}")
    if not 0.0 < min_gap <= 1.0:
        raise ValueError(f"min_gap must lie in (0, 1], got {min_gap}")
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    draws = torch.rand(3, batch_size, generator=generator, device=device, dtype=wide)
    if sampling == "start-then-end":
        start = uniform_times(
            batch_size,
            rank=rank,
            world_size=world_size,
            generator=generator,
            device=device,
            dtype=wide,
        )
        end = start + (1.0 - start) * draws[0]
    else:
        start, end = torch.minimum(draws[0], draws[1]), torch.maximum(draws[0], draws[1])
    start = start.clamp(max=1.0 - min_gap)
    end = torch.maximum(end, start + min_gap).clamp(max=1.0)
    boundary = draws[2] < boundary_prob
    start = torch.where(boundary, 0.0, start).to(dtype)
    end = torch.where(boundary, 1.0, end).to(dtype)
    start = torch.minimum(start, torch.nextafter(end, torch.zeros_like(end)))
    return TimePair(start, end)


class DiagonalSplit(NamedTuple):
    """Row indices of a batch: those trained on the diagonal, those trained on jumps."""

    diagonal: Int[Tensor, " diagonal"]
    off_diagonal: Int[Tensor, " off_diagonal"]


def diagonal_split(
    batch_size: int,
    fraction: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> DiagonalSplit:
    r"""Split a batch at random into ``round(fraction * batch_size)`` diagonal rows and the rest.

    Diagonal rows train $\delta_{t,t}$ against the teacher (`flowlm.distill.diagonal_kl`),
    the others the jumps; the counts are fixed on the host, the rows drawn on ``device``
    (a random permutation), so selecting them (``x[split.diagonal]``) needs no host sync.

    Args:
        batch_size: rows in the batch.
        fraction: share of diagonal rows, in [0, 1].
        generator: random source, on ``device``.
        device: where the indices are drawn.

    Examples:
        >>> split = diagonal_split(8, 0.25, generator=torch.Generator().manual_seed(0))
        >>> len(split.diagonal), len(split.off_diagonal)
        (2, 6)
        >>> sorted(torch.cat(split).tolist()) == list(range(8))
        True
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the diagonal fraction must lie in [0, 1], got {fraction}")
    count = math.floor(fraction * batch_size + 0.5)
    order = torch.randperm(batch_size, generator=generator, device=device)
    return DiagonalSplit(order[:count], order[count:])


def soft_cap(logits: Float[Tensor, "*shape"], cap: float = 30.0) -> Float[Tensor, "*shape"]:
    r"""Soft-cap logits: $c\tanh(z / c)$, smooth, odd, slope 1 at 0, bounded by $c$.

    Examples:
        >>> soft_cap(torch.tensor([0.0, 30.0, 1e6]))
        tensor([ 0.0000, 22.8478, 30.0000])
    """
    if not cap > 0:
        raise ValueError(f"the soft cap must be positive, got {cap}")
    return cap * torch.tanh(logits / cap)


class SoftCapped(nn.Module):
    r"""A backbone whose logits are soft-capped: $c\tanh(f(x_t, t[, s])/c)$.

    Wrap the network before `flowlm.XPredictor`, so the cross-entropy, the samplers and the
    distillation losses all see the capped logits. A self-conditioned network stays one:
    ``previous=`` is passed on (`flowlm.self_conditioning`).

    Args:
        backbone: the network, plain or self-conditioned.
        cap: $c$.

    Examples:
        >>> from flowlm import XPredictor
        >>> predictor = XPredictor(SoftCapped(lambda x, t: 100 * x, cap=30.0))
        >>> bool(predictor.logits(torch.ones(1, 1, 2), torch.zeros(1)).max() < 30)
        True
    """

    def __init__(self, backbone: Backbone | SelfConditionedBackbone, cap: float = 30.0) -> None:
        super().__init__()
        if not cap > 0:
            raise ValueError(f"the soft cap must be positive, got {cap}")
        self.backbone = backbone
        self.cap = cap

    def forward(
        self, x_t: State, t: Time, s: Time | None = None, /, previous: Probs | None = None
    ) -> Logits:
        """The capped logits (given the previous estimate, for a self-conditioned network)."""
        inputs = {} if previous is None else {"previous": previous}
        times = (t,) if s is None else (t, s)
        return soft_cap(self.backbone(x_t, *times, **inputs), self.cap)
