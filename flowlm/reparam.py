r"""Time reparameterizations $\kappa$: model time $t$ to path time $\gamma = \kappa(t)$.

The network sees model time $t \in [0, 1]$; interpolant coefficients and velocities use path
time $\gamma$. Every reparameterization is increasing with $\kappa(0) = 0$ and $\kappa(1) = 1$,
acts elementwise on any tensor of times, and composes with ``>>``:
``(a >> b)(t) = b(a(t))``.
"""

import operator
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from flowlm._grid_table import GridTable, cast, for_lookup
from flowlm._types import Times


class TimeReparam(nn.Module, ABC):
    r"""An increasing bijection $\kappa$ of $[0, 1]$ with $\kappa(0) = 0$, $\kappa(1) = 1$.

    Subclasses define ``forward`` ($t \mapsto \gamma$), ``inverse`` ($\gamma \mapsto t$) and
    ``derivative`` ($d\gamma/dt$).

    Examples:
        >>> kappa = Power(2.0) >> Power(0.5)
        >>> kappa(torch.tensor([0.25])).item()
        0.25
    """

    @abstractmethod
    def forward(self, t: Times) -> Times:
        r"""Path time $\gamma = \kappa(t)$."""

    @abstractmethod
    def inverse(self, gamma: Times) -> Times:
        r"""Model time $t = \kappa^{-1}(\gamma)$."""

    @abstractmethod
    def derivative(self, t: Times) -> Times:
        r"""The rate $d\gamma/dt = \kappa'(t)$."""

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary this clock was built for, if any (interpolants check states on it)."""
        return None

    def __rshift__(self, then: "TimeReparam") -> "Composed":
        return Composed(self, then)


class Composed(TimeReparam):
    r"""Apply ``first`` then ``then``: $\kappa(t) = \kappa_2(\kappa_1(t))$.

    The chain rule gives $\kappa'(t) = \kappa_2'(\kappa_1(t))\,\kappa_1'(t)$.

    Examples:
        >>> kappa = Composed(Power(2.0), Power(3.0))
        >>> kappa(torch.tensor([0.5])).item() == 0.5**6
        True
    """

    def __init__(self, first: TimeReparam, then: TimeReparam) -> None:
        super().__init__()
        self.first = first
        self.then = then

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary of either part (the first one that names one)."""
        return self.first.vocab_size if self.first.vocab_size is not None else self.then.vocab_size

    def forward(self, t: Times) -> Times:
        """Path time of the composition."""
        return self.then(self.first(t))

    def inverse(self, gamma: Times) -> Times:
        """Invert ``then`` first, then ``first``."""
        return self.first.inverse(self.then.inverse(gamma))

    def derivative(self, t: Times) -> Times:
        """Chain rule."""
        return self.then.derivative(self.first(t)) * self.first.derivative(t)


class Identity(TimeReparam):
    r"""$\gamma = t$: the path is run at the speed of model time.

    Examples:
        >>> t = torch.tensor([0.3])
        >>> torch.equal(Identity()(t), t)
        True
    """

    def forward(self, t: Times) -> Times:
        """Return ``t``."""
        return t

    def inverse(self, gamma: Times) -> Times:
        """Return ``gamma``."""
        return gamma

    def derivative(self, t: Times) -> Times:
        """Ones."""
        return torch.ones_like(t)


class Power(TimeReparam):
    r"""$\gamma = t^p$ for $p > 0$; $p > 1$ spends more model time near the noise.

    Examples:
        >>> Power(2.0).inverse(torch.tensor([0.25])).item()
        0.5
    """

    def __init__(self, exponent: float) -> None:
        super().__init__()
        if not exponent > 0:
            raise ValueError(f"Power needs a positive exponent, got {exponent}")
        self.exponent = exponent

    def forward(self, t: Times) -> Times:
        """$t^p$."""
        return t**self.exponent

    def inverse(self, gamma: Times) -> Times:
        r"""$\gamma^{1/p}$."""
        return gamma ** (1.0 / self.exponent)

    def derivative(self, t: Times) -> Times:
        r"""$p\,t^{p-1}$."""
        return self.exponent * t ** (self.exponent - 1.0)


def linear_snr(gamma: Tensor) -> Tensor:
    r"""Signal-to-noise ratio $\gamma / (1 - \gamma)$ of the linear path (infinite at 1)."""
    return gamma / (1.0 - gamma)


TIME_EDGE = float(1.0 - np.nextafter(1.0, 0.0))
"""The smallest time the clock resolves: 1 - TIME_EDGE is the largest float64 below 1, and
times below TIME_EDGE count as TIME_EDGE."""
LOGIT_RANGE = float(np.log((1.0 - TIME_EDGE) / TIME_EDGE))
r"""The forward table spans $\operatorname{logit}(t) \in [-36.7, 36.7]$: every float64 time
strictly inside (0, 1); its end knots hold $\kappa = 0$ and $\kappa = 1$ exactly."""


class TokenAccuracy(TimeReparam):
    r"""The decoding-accuracy clock: model time is the chance-corrected argmax accuracy.

    For a path $x = \sigma(\gamma)\,\varepsilon + \alpha(\gamma)\,e_x$ with
    $m(\gamma) = \alpha/\sigma$, the probability that $\operatorname{argmax} x$ is the data token is

    $$q(\gamma) = \mathbb{E}_{z \sim N(0,1)}\big[\Phi(z + m(\gamma))^{V-1}\big],\qquad
      \tau(\gamma) = \frac{V q(\gamma) - 1}{V - 1},$$

    and $\kappa = \tau^{-1}$. $\tau$ is computed once with 100-node Gauss–Hermite quadrature in
    float64 on a dense uniform $\gamma$ grid, where entries that break strict monotonicity
    (quadrature round-off near 0, float64 saturation near 1) are replaced by linear
    interpolation (``inverse`` reads this grid), and inverted once onto a grid uniform in
    $\operatorname{logit}(t)$, which resolves both ends of $[0, 1]$ down to `TIME_EDGE`
    (``forward`` reads this one). Both are `GridTable` lookups: piecewise linear, so gradients
    flow through $t$, run in torch on the input's device (in float64 for float64 input, in
    float32 otherwise) with no search; $\kappa(0) = 0$ and $\kappa(1) = 1$ exactly, the round
    trip holds to about 1e-6 (2e-6 for float32 times), and float32 lookups are within 5e-7
    of float64 ones.

    Args:
        vocab_size: $V \geq 2$.
        snr: the path's signal-to-noise ratio $m(\gamma)$; defaults to the linear path.
        gamma_knots: size of the uniform $\gamma$ grid.
        logit_knots: size of the uniform $\operatorname{logit}(t)$ grid.

    Examples:
        >>> kappa = TokenAccuracy(64)
        >>> round(kappa(torch.tensor([0.5])).item(), 3)
        0.702
    """

    def __init__(
        self,
        vocab_size: int,
        snr: Callable[[Tensor], Tensor] = linear_snr,
        gamma_knots: int = 16_385,
        logit_knots: int = 16_385,
    ) -> None:
        super().__init__()
        try:
            size = operator.index(vocab_size)
        except TypeError:
            raise TypeError(
                f"TokenAccuracy needs an integer vocabulary size, got {vocab_size!r} "
                f"({type(vocab_size).__name__})"
            ) from None
        if size < 2:
            raise ValueError(f"TokenAccuracy needs a vocabulary of at least 2, got {size}")
        self._vocab_size = size
        gamma = torch.linspace(0.0, 1.0, gamma_knots, dtype=torch.float64)
        tau = decoding_accuracy(gamma, size, snr)
        keep = _strictly_increasing_interior(tau)
        tau_at_knots = np.interp(gamma.numpy(), gamma[keep], tau[keep])
        logits = torch.linspace(-LOGIT_RANGE, LOGIT_RANGE, logit_knots, dtype=torch.float64)
        kappa_at_knots = np.interp(torch.sigmoid(logits).numpy(), tau[keep], gamma[keep])
        kappa_at_knots[0], kappa_at_knots[-1] = 0.0, 1.0
        self.tau_table = GridTable(torch.from_numpy(tau_at_knots), 0.0, 1.0)
        r"""$\tau$ on the uniform $\gamma$ grid."""
        self.kappa_table = GridTable(torch.from_numpy(kappa_at_knots), -LOGIT_RANGE, LOGIT_RANGE)
        r"""$\kappa$ on the uniform $\operatorname{logit}(t)$ grid."""

    @property
    def vocab_size(self) -> int:
        """$V$, the vocabulary of the states this clock times."""
        return self._vocab_size

    def forward(self, t: Times) -> Times:
        r"""$\gamma = \kappa(t)$ by linear interpolation on the logit grid."""
        return cast(self.kappa_table.lookup(_logit(for_lookup(t))), t.dtype)

    def inverse(self, gamma: Times) -> Times:
        r"""$t = \tau(\gamma)$ by linear interpolation on the uniform $\gamma$ grid."""
        return cast(self.tau_table.lookup(for_lookup(gamma)), gamma.dtype)

    def derivative(self, t: Times) -> Times:
        r"""$\kappa'(t)$: the table slope times $d\,\operatorname{logit}(t)/dt = 1/(t(1-t))$.

        At the ends of $[0, 1]$ it is the rate at the nearest time inside them.
        """
        inside = _inside(for_lookup(t))
        rate = self.kappa_table.slope(torch.logit(inside)) / (inside * (1 - inside))
        return cast(rate, t.dtype)


def _inside(t: Tensor) -> Tensor:
    """``t`` clamped to [TIME_EDGE, the largest number below 1 in its dtype]."""
    return t.clamp(TIME_EDGE, 1.0 - torch.finfo(t.dtype).eps / 2)


def _logit(t: Tensor) -> Tensor:
    r"""$\operatorname{logit}(t)$ of times clamped below at `TIME_EDGE`, with zero gradient at 0 and 1.

    $t = 1$ maps to or beyond the logit grid's last knot. ``torch.logit``'s own gradient at
    $t = 1$ is 0/0 in float32, where its upper clamp $1 - \epsilon$ rounds to 1, so a time that
    needs a gradient takes an equal-valued path: clamp below 1, then put $+\infty$ back at 1.

    Examples:
        >>> _logit(torch.tensor([0.5, 1.0], requires_grad=True))
        tensor([0., inf], grad_fn=<WhereBackward0>)
    """
    if not t.requires_grad:
        return torch.logit(t, eps=TIME_EDGE)
    return torch.where(t < 1, torch.logit(_inside(t)), torch.inf)


def decoding_accuracy(
    gamma: Tensor, vocab_size: int, snr: Callable[[Tensor], Tensor] = linear_snr
) -> Tensor:
    r"""Chance-corrected argmax accuracy $\tau(\gamma)$ by 100-node Gauss–Hermite quadrature.

    Examples:
        >>> decoding_accuracy(torch.tensor([0.0, 1.0], dtype=torch.float64), 100)
        tensor([0., 1.], dtype=torch.float64)
    """
    nodes, weights = np.polynomial.hermite.hermgauss(100)
    z = torch.as_tensor(nodes * np.sqrt(2.0), dtype=torch.float64)
    w = torch.as_tensor(weights / np.sqrt(np.pi), dtype=torch.float64)
    m = snr(gamma.to(torch.float64))[..., None]
    q = (w * torch.exp((vocab_size - 1) * torch.special.log_ndtr(z + m))).sum(-1)
    tau = (vocab_size * q - 1.0) / (vocab_size - 1.0)
    return torch.where(gamma <= 0, 0.0, torch.where(gamma >= 1, 1.0, tau))


def _strictly_increasing_interior(tau: Tensor) -> Tensor:
    """Mask of the entries that keep ``tau`` strictly increasing from 0 to 1.

    Interior entries at or beyond the endpoints (quadrature round-off, float64 saturation)
    and entries that do not exceed every earlier one are dropped; both endpoints stay.

    Examples:
        >>> _strictly_increasing_interior(torch.tensor([0.0, 0.5, 0.4, 1.0, 1.0]))
        tensor([ True,  True, False, False,  True])
    """
    inside = (tau > 0) & (tau < 1)
    inside[0] = inside[-1] = True
    previous_max = torch.cummax(torch.where(inside, tau, -1.0), 0).values
    rising = torch.ones_like(inside)
    rising[1:] = tau[1:] > previous_max[:-1]
    return inside & rising
