r"""Time reparameterizations $\kappa$: model time $t$ to path time $\gamma = \kappa(t)$.

The network sees model time $t \in [0, 1]$; interpolant coefficients and velocities use path
time $\gamma$. Every reparameterization is increasing with $\kappa(0) = 0$ and $\kappa(1) = 1$,
acts elementwise on any tensor of times, and composes with ``>>``:
``(a >> b)(t) = b(a(t))``.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

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
"""Times are clamped to [TIME_EDGE, 1 - TIME_EDGE], the float64 numbers strictly inside (0, 1)."""
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
    $\operatorname{logit}(t)$, which resolves the steep start of $\kappa$ (``forward``). Both
    lookups index their grid arithmetically (no search), run in torch on the input's device and
    are piecewise linear, so gradients flow through $t$; $\kappa(0) = 0$ and $\kappa(1) = 1$
    exactly, and the round trip holds to about 1e-6.

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

    tau_intercepts: Tensor
    r"""$\tau$ on the uniform $\gamma$ grid as linear pieces $a_i + b_i p$ of the grid position
    $p \in [i, i + 1]$: the intercepts $a_i$ (float64)."""
    tau_slopes: Tensor
    """The slopes $b_i$ (the last knot's piece is flat)."""
    kappa_intercepts: Tensor
    r"""$\kappa$ on the uniform $\operatorname{logit}(t)$ grid, as linear pieces: intercepts."""
    kappa_slopes: Tensor
    """Slopes."""

    def __init__(
        self,
        vocab_size: int,
        snr: Callable[[Tensor], Tensor] = linear_snr,
        gamma_knots: int = 16_385,
        logit_knots: int = 16_385,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"TokenAccuracy needs a vocabulary of at least 2, got {vocab_size}")
        self.vocab_size = vocab_size
        gamma = torch.linspace(0.0, 1.0, gamma_knots, dtype=torch.float64)
        tau = decoding_accuracy(gamma, vocab_size, snr)
        keep = _strictly_increasing_interior(tau)
        tau_at_knots = np.interp(gamma.numpy(), gamma[keep], tau[keep])
        logits = torch.linspace(-LOGIT_RANGE, LOGIT_RANGE, logit_knots, dtype=torch.float64)
        kappa_at_knots = np.interp(torch.sigmoid(logits).numpy(), tau[keep], gamma[keep])
        kappa_at_knots[0], kappa_at_knots[-1] = 0.0, 1.0
        for name, values in [("tau", tau_at_knots), ("kappa", kappa_at_knots)]:
            intercepts, slopes = _linear_pieces(torch.from_numpy(values))
            # Derived from vocab_size, so not saved in state_dict.
            self.register_buffer(f"{name}_intercepts", intercepts, persistent=False)
            self.register_buffer(f"{name}_slopes", slopes, persistent=False)
        self.last_gamma_knot = gamma_knots - 1
        self.last_logit_knot = logit_knots - 1
        self.knots_per_logit = self.last_logit_knot / (2 * LOGIT_RANGE)
        self.first_knot_offset = LOGIT_RANGE * self.knots_per_logit

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "TokenAccuracy":
        # Follow device moves but keep the float64 tables: ``.float()`` or ``.half()`` on a model
        # holding this clock would round the saturated end of a table and collapse segments.
        tables = dict(self.named_buffers())
        super()._apply(fn, recurse)
        for name, table in tables.items():
            setattr(self, name, table.to(getattr(self, name).device))
        return self

    def _logit_position(self, t: Tensor) -> Tensor:
        """Fractional position of ``t`` on the logit grid (0 at the first knot), in float64."""
        logit = torch.logit(t.to(torch.float64), eps=TIME_EDGE)
        position = torch.add(self.first_knot_offset, logit, alpha=self.knots_per_logit)
        return position.clamp_(0, self.last_logit_knot)

    def forward(self, t: Times) -> Times:
        r"""$\gamma = \kappa(t)$ by linear interpolation on the logit grid."""
        gamma = _interpolate(self.kappa_intercepts, self.kappa_slopes, self._logit_position(t))
        return gamma.to(t.dtype)

    def inverse(self, gamma: Times) -> Times:
        r"""$t = \tau(\gamma)$ by linear interpolation on the uniform $\gamma$ grid."""
        position = gamma.to(torch.float64).clamp(0, 1) * self.last_gamma_knot
        return _interpolate(self.tau_intercepts, self.tau_slopes, position).to(gamma.dtype)

    def derivative(self, t: Times) -> Times:
        r"""$\kappa'(t)$: the table slope times $d\,\operatorname{logit}(t)/dt = 1/(t(1-t))$.

        At the grid's end (the clamped ends of $[0, 1]$) it is the last segment's rate.
        """
        index = self._logit_position(t).int().flatten().clamp_max_(self.last_logit_knot - 1)
        slope = self.kappa_slopes.index_select(0, index).view_as(t)
        inside = t.to(torch.float64).clamp(TIME_EDGE, 1.0 - TIME_EDGE)
        return (slope * self.knots_per_logit / (inside * (1 - inside))).to(t.dtype)


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


def _linear_pieces(values: Tensor) -> tuple[Tensor, Tensor]:
    """Intercepts $a_i$ and slopes $b_i$ with $a_i + b_i p$ the line through knots $i$, $i + 1$.

    The last knot gets a flat piece ($b = 0$), so a position at the end of the grid returns the
    last value exactly, as the first knot's piece does at position 0.

    Examples:
        >>> _linear_pieces(torch.tensor([0.0, 0.5, 2.0]))
        (tensor([ 0., -1.,  2.]), tensor([0.5000, 1.5000, 0.0000]))
    """
    slopes = torch.cat([values.diff(), values.new_zeros(1)])
    positions = torch.arange(len(values), dtype=values.dtype)
    return values - positions * slopes, slopes


def _interpolate(intercepts: Tensor, slopes: Tensor, position: Tensor) -> Tensor:
    """Piecewise-linear interpolation at positions in [0, n - 1], from `_linear_pieces`.

    Examples:
        >>> pieces = _linear_pieces(torch.tensor([0.0, 0.9, 1.0]))
        >>> _interpolate(*pieces, torch.tensor([0.5, 1.5, 2.0]))
        tensor([0.4500, 0.9500, 1.0000])
    """
    flat = position.flatten()
    index = flat.int()  # floor, as positions are never negative; carries no gradient
    line = intercepts.index_select(0, index)
    return line.addcmul_(flat, slopes.index_select(0, index)).view_as(position)
