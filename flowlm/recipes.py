r"""Options of the v2 distillation recipe (the authors' later code), defaults equal to flowlm's.

FMLM's later recipe differs from the first release in a few knobs (arXiv 2602.16813, later
versions, and the authors' later code). Each is an option here, with a default that leaves
today's training unchanged; the authors' values are given with each.

- **Pair sampling** (``flowlm.time_pairs(..., sampling=...)``): how jumps $t \to s$ are
  drawn. ``"gap-then-start"`` (a stratified gap $d$, then $t \sim U[0, 1 - d]$: the default
  and the authors' choice), ``"start-then-end"`` ($t$ stratified, then $s \sim U[t, 1]$) or
  ``"sorted-uniform"`` (two uniform times, sorted: uniform on the triangle $t < s$).
- **Boundary probability**: the chance of the whole-path pair $(0, 1)$ (1/64 by default, 1/32
  in the authors' code).
- **Diagonal fraction** (`diagonal_split`, `split_semigroup_kl_loss`): the authors train a
  fixed fraction of each batch on the diagonal $\delta_{t,t}$ only (0.5) and the rest on jumps
  only; `flowlm.distill.semigroup_kl_loss` trains both terms on every row.
- **β₂** of AdamW (``torch.optim.AdamW(..., betas=(0.9, beta2))``): 0.95 in the authors'
  code, 0.999 in the released LM1B model.
- **No learned loss weighting** in the authors' code (`flowlm.LearnedTimeWeighting` is optional).
- **Logit soft-cap** (`soft_cap`, `SoftCapped`): $30\tanh(z/30)$ before the log-softmax, in FLM
  and FMLM; none by default.
"""

import math
from typing import NamedTuple, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from flowlm._checks import check_jump, check_state, check_time
from flowlm._tensors import broadcast_time, float32_or_wider
from flowlm._types import Logits, Probs, State, Time, TokenLoss
from flowlm.distill import kl_divergence, semigroup_target
from flowlm.protocols import Backbone, Predictor, RowSelectable, TwoTimeMap
from flowlm.self_conditioning import SelfConditionedBackbone

_Part = TypeVar("_Part")


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


def split_semigroup_kl_loss(
    student: TwoTimeMap,
    teacher: Predictor,
    x_t: State,
    t: Time,
    s: Time,
    split: DiagonalSplit,
    u: Time | None = None,
) -> TokenLoss:
    r"""v2 with a diagonal split: each row trains one of the two terms of the v2 loss.

    Rows $i$ in ``split.diagonal`` get $\mathrm{KL}(D_t(x_t)\,\Vert\,\hat\delta_{t,t}(x_t))$
    (the tie to the teacher), the others
    $\mathrm{KL}(\bar\delta_{t,s}\,\Vert\,\hat\delta_{t,s}(x_t))$ (the semigroup jump, target
    at ``u``, default the midpoint): with ``fraction`` $f$ of `diagonal_split`, the batch mean
    estimates $f\,\text{diagonal} + (1 - f)\,\text{jump}$, at about half the network calls
    of `flowlm.distill.semigroup_kl_loss`, which puts both terms on every row.

    The student's trained prediction is one call on the whole batch, at
    $(t, t)$ on the diagonal rows and $(t, s)$ on the others; the teacher runs on the diagonal
    rows only and the semigroup target's two calls on the jump rows only. A student or teacher
    that holds inputs per row (`flowlm.RowSelectable`, e.g. a self-conditioned student bound
    to its estimates with `flowlm.WithPrevious`) is restricted to those rows for those calls,
    so every row's loss is the one it has alone.

    Args:
        student: the two-time map being trained.
        teacher: the frozen FLM denoiser $D_t$.
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).
        split: which rows train which term.
        u: intermediate times in $[t, s]$.

    Returns:
        The per-token loss of every row, ``(batch, seq)``.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> def fixed(x, t, s=None):  # one distribution everywhere: both terms vanish
        ...     return torch.tensor([1.0, 2.0, 3.0]).expand_as(x)
        >>> student = XPredMap(XPredictor(fixed), LinearInterpolant(), two_time=True)
        >>> x, t, s = torch.randn(4, 5, 3), torch.rand(4) / 2, torch.ones(4)
        >>> loss = split_semigroup_kl_loss(student, XPredictor(fixed), x, t, s, diagonal_split(4, 0.5))
        >>> loss.shape, bool(loss.abs().max() < 1e-6)
        (torch.Size([4, 5]), True)
    """
    check_state(x_t, name="x_t")
    check_time(t, x_t)
    check_time(s, x_t, "s")
    check_jump(t, s)
    rows = split.diagonal.numel() + split.off_diagonal.numel()
    if rows != x_t.shape[0]:
        raise ValueError(f"the split covers {rows} rows, the batch has {x_t.shape[0]}")
    u = 0.5 * (t + s) if u is None else u
    check_time(u, x_t, "u")
    on, off = split.diagonal, split.off_diagonal
    target = x_t.new_zeros(x_t.shape, dtype=float32_or_wider(x_t.dtype))
    with torch.no_grad():
        if on.numel():
            target = target.index_copy(0, on, _rows(teacher, on)(x_t[on], t[on]).to(target.dtype))
        if off.numel():
            jump = semigroup_target(_rows(student, off), x_t[off], t[off], u[off], s[off])
            target = target.index_copy(0, off, jump.to(target.dtype))
    on_diagonal = torch.zeros(x_t.shape[0], dtype=torch.bool, device=x_t.device)
    on_diagonal = on_diagonal.index_fill(0, on, True)
    end = torch.where(broadcast_time(on_diagonal, t), t, s)
    return kl_divergence(target, student.predictor.logits(x_t, t, end))


def _rows(part: _Part, index: Int[Tensor, " rows"]) -> _Part:
    """``part`` for the rows ``index`` of its batch: `RowSelectable.rows`, else ``part`` itself."""
    return part.rows(index) if isinstance(part, RowSelectable) else part


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
