r"""The contracts: what a backbone, a flow map, a velocity field and a distillation student are.

These are structural types (``typing.Protocol``): any object with the right call signature
fits and nothing needs to inherit from them. They are ``runtime_checkable`` only so that
the optional jaxtyping + beartype checks can verify arguments; flowlm's own logic tests
membership of one only, the optional capability `RowSelectable`.
Time is per example ``(batch,)`` or per token ``(batch, seq)`` everywhere (`flowlm.Time`).
"""

from typing import Protocol, TypeVar, runtime_checkable

from jaxtyping import Int
from torch import Tensor

from flowlm._types import Logits, Probs, State, Time
from flowlm.interpolants import Interpolant
from flowlm.reparam import TimeReparam


@runtime_checkable
class Backbone(Protocol):
    """Any network mapping a state and one or two model times to logits of the same shape.

    Examples:
        >>> import torch
        >>> from flowlm import XPredictor
        >>> def uniform(x_t: State, t: Time, s: Time | None = None) -> Logits:
        ...     return torch.zeros_like(x_t)
        >>> XPredictor(uniform)(torch.randn(1, 2, 4), torch.rand(1))[0, 0]
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    def __call__(self, x_t: State, t: Time, s: Time | None = None, /) -> Logits:
        """Logits of the clean token at every position."""
        ...


@runtime_checkable
class FlowMap(Protocol):
    r"""Anything that moves a state from model time ``t`` to model time ``s``: $X_{t \to s}$.

    Examples:
        >>> import torch
        >>> def stay(x: State, t: Time, s: Time) -> State:
        ...     return x
        >>> x = torch.randn(1, 2, 3)
        >>> torch.equal(stay(x, torch.zeros(1), torch.ones(1)), x)
        True
    """

    def __call__(self, x: State, t: Time, s: Time, /) -> State:
        r"""$X_{t \to s}(x)$."""
        ...


@runtime_checkable
class VelocityField(Protocol):
    r"""A velocity per unit of path time $\gamma$ = ``reparam(t)``, called at model time ``t``.

    Examples:
        >>> import torch
        >>> from flowlm import LinearInterpolant, XPredictor, XPredVelocity
        >>> field = XPredVelocity(XPredictor(lambda x, t: torch.zeros_like(x)), LinearInterpolant())
        >>> field.reparam(torch.tensor([0.5]))
        tensor([0.5000])
    """

    @property
    def reparam(self) -> TimeReparam:
        """The clock that turns the field's model time into path time."""
        ...

    def __call__(self, x: State, t: Time, /) -> State:
        r"""$dx/d\gamma$ at $(x, t)$."""
        ...


@runtime_checkable
class Predictor(Protocol):
    r"""A one-time x-predictor (a distillation teacher): $D_t(x) = \mathrm{softmax}(z_t(x))$.

    `XPredictor` fits it.

    Examples:
        >>> import torch
        >>> from flowlm import XPredictor
        >>> teacher = XPredictor(lambda x, t: x)
        >>> teacher.logits(torch.ones(1, 1, 2), torch.ones(1))
        tensor([[[1., 1.]]])
    """

    def __call__(self, x_t: State, t: Time, /) -> Probs:
        """Predicted data: probabilities at every position."""
        ...

    def logits(self, x_t: State, t: Time, /) -> Logits:
        """The logits whose softmax is the prediction."""
        ...


@runtime_checkable
class TwoTimePredictor(Protocol):
    r"""A two-time denoiser $\delta_{t,s}(x) = \mathrm{softmax}(z_{t,s}(x))$.

    `XPredictor` of a two-time backbone fits it.

    Examples:
        >>> import torch
        >>> from flowlm import XPredictor
        >>> student = XPredictor(lambda x, t, s: x)
        >>> student(torch.zeros(1, 1, 2), torch.zeros(1), torch.ones(1))
        tensor([[[0.5000, 0.5000]]])
    """

    def __call__(self, x_t: State, t: Time, s: Time, /) -> Probs:
        """Predicted data for the jump from ``t`` to ``s``."""
        ...

    def logits(self, x_t: State, t: Time, s: Time, /) -> Logits:
        """The logits whose softmax is the prediction."""
        ...


@runtime_checkable
class TwoTimeMap(Protocol):
    r"""What the distillation losses train: a two-time predictor on a path.

    The map is $X_{t\to s}(x) = \sigma(\gamma_s)\hat x_0 + \alpha(\gamma_s)\delta_{t,s}(x)$
    with $\hat x_0$ the noise implied by $\delta_{t,s}(x)$; the losses read ``predictor`` (its
    logits) and ``interpolant`` (its clock and steps). ``XPredMap(..., two_time=True)`` fits it.

    Examples:
        >>> import torch
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> student = XPredMap(XPredictor(lambda x, t, s: x), LinearInterpolant(), two_time=True)
        >>> student.interpolant.reparam(torch.tensor([0.25]))
        tensor([0.2500])
    """

    @property
    def predictor(self) -> TwoTimePredictor:
        """The two-time denoiser."""
        ...

    @property
    def interpolant(self) -> Interpolant:
        """The path the map steps along."""
        ...

    def __call__(self, x: State, t: Time, s: Time, /) -> State:
        r"""$X_{t \to s}(x)$."""
        ...


_Selectable = TypeVar("_Selectable", bound="RowSelectable")


@runtime_checkable
class RowSelectable(Protocol):
    r"""A backbone, predictor or map that holds inputs per row of its batch, restricted to some rows.

    A self-conditioned network bound to its batch's previous estimates (`flowlm.WithPrevious`)
    can only be called on that batch; ``part = obj.rows(index)`` is the same object for the
    rows ``index`` (called on ``x_t[index]``). `XPredictor` and `XPredMap` pass it on to
    their backbone; a loss that calls its student on a part of the batch
    (`flowlm.split_semigroup_kl_loss`) restricts it so. Anything without ``rows`` holds no
    per-row input and is called on any rows as it is.

    Examples:
        >>> import torch
        >>> from flowlm import WithPrevious, XPredictor
        >>> def f(x, t, previous=None):
        ...     return x + previous
        >>> bound = XPredictor(WithPrevious(f, torch.eye(3)[:, None]))  # 3 rows, 1 position
        >>> x, t = torch.zeros(2, 1, 3), torch.zeros(2)
        >>> bound.rows(torch.tensor([2, 0])).logits(x, t)[:, 0]
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """

    def rows(self: "_Selectable", index: Int[Tensor, " rows"], /) -> "_Selectable":
        """The same kind of object for the rows ``index`` of its batch, in that order."""
        ...
