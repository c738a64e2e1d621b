r"""ODE step rules (`flowlm.Euler`, `flowlm.Midpoint`, `flowlm.Heun`) run on $h = xE$.

Below the data a rule runs unchanged on $h$ with the embedded velocity
$v(h, t) = \sigma'\hat h_0 + \alpha'\hat x_1E$, the image under $E$ of the dense one. On the
linear path, a step of these rules onto the data ($\gamma_s = 1$) lands on a combination of
the step's predictions alone: Euler and Heun on $\hat x_1(x_t)$, Midpoint on
$2\hat x_1(x_m) - \hat x_1(x_t)$; the state's own coefficient is $1 - \Delta/(1 - \gamma_t) = 0$.
So the rules run on the lifted state $[h, y]$ started at $y = 0 \in \mathbb{R}^V$: the network
reads $h$, the rule moves $y$ with the predictions themselves (the part of the dense state
that the predictions made), and $y$ ends on exactly the dense rule's output. The lift is
carried on every step, so no step reads its times on the host to decide when to lift; the
price is ``(batch, seq, vocab)`` states on every step, about the dense rules' memory. The
lean sampler is `flowlm.embedded.EmbeddedXPredMap` (FLM's Euler step and FMLM's map).
"""

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from flowlm._types import Time
from flowlm.embedded import Embedded, EmbeddedXPredictor
from flowlm.interpolants import LinearInterpolant
from flowlm.reparam import TimeReparam
from flowlm.solvers import FlowMap, VelocityField

StepRule = Callable[[VelocityField], FlowMap]
"""A step rule built on a velocity field, e.g. `flowlm.Euler`, `flowlm.Midpoint`, `flowlm.Heun`."""


class EmbeddedVelocity(nn.Module):
    r"""The x-prediction velocity on $h$, or on a lifted state $[h, y]$ ($y \in \mathbb{R}^V$).

    $v(h) = (\hat x_1E - h)/(1 - \gamma)$ on the linear path; on $[h, y]$ the $y$ part moves
    with $\hat x_1$ itself: $v([h, y]) = [v(h), (\hat x_1 - y)/(1 - \gamma)]$, $\hat x_1$ read
    from $h$ only.
    """

    def __init__(self, predictor: EmbeddedXPredictor, interpolant: LinearInterpolant) -> None:
        super().__init__()
        self.predictor = predictor
        self.interpolant = interpolant

    @property
    def reparam(self) -> TimeReparam:
        """The interpolant's clock."""
        return self.interpolant.reparam

    def forward(self, x: Float[Tensor, "batch seq _"], t: Time) -> Float[Tensor, "batch seq _"]:
        r"""$dh/d\gamma$, or $d[h, y]/d\gamma$ on a lifted state."""
        width = self.predictor.table.shape[1]
        x1_hat = self.predictor(x[..., :width], t)
        target = self.predictor.embed(x1_hat)
        if x.shape[-1] > width:
            target = torch.cat([target, x1_hat.to(target.dtype)], dim=-1)
        return self.interpolant.velocity(x, target, t)


class EmbeddedODEMap(nn.Module):
    r"""A step rule on the lifted state $[h, y]$: its last ``vocab`` entries follow the dense rule.

    The input is $h$ (width ``dim``, lifted with $y = 0$) or a lifted state (width
    ``dim + vocab``); the output is the lifted state. After a rollout onto the data its last
    ``vocab`` entries are the dense rule's output from the noise $x_0$ with $x_0E = h$.

    Args:
        rule: the step rule, e.g. ``flowlm.Midpoint``.
        predictor: the embedded x-predictor.
        interpolant: the linear path (on other paths the state keeps a share of itself at
            $\gamma = 1$, which $h$ cannot give back).

    Raises:
        ValueError: on a path that is not `flowlm.LinearInterpolant`, or, from `forward`, on a
            state of another width.

    Examples:
        >>> from flowlm import Heun, LinearInterpolant, XPredictor, XPredVelocity, rollout, time_grid
        >>> from flowlm.backbones import DiT
        >>> predictor = EmbeddedXPredictor(DiT(9, dim=8, depth=1, heads=2).eval())
        >>> path, x0 = LinearInterpolant(), torch.randn(2, 4, 9)
        >>> ours = rollout(EmbeddedODEMap(Heun, predictor, path), predictor.embed(x0), time_grid(3))
        >>> dense = rollout(Heun(XPredVelocity(XPredictor(predictor.backbone), path)), x0, time_grid(3))
        >>> ours.nfe, torch.allclose(ours.x[..., 8:], dense.x, atol=1e-6)
        (6, True)
    """

    def __init__(
        self, rule: StepRule, predictor: EmbeddedXPredictor, interpolant: LinearInterpolant
    ) -> None:
        super().__init__()
        if type(interpolant) is not LinearInterpolant:
            raise ValueError(
                f"the embedded step rules need the linear path, got {type(interpolant).__name__}"
            )
        self.rule = rule
        self.field = EmbeddedVelocity(predictor, interpolant)
        self.vocab_size = predictor.table.shape[0]

    def forward(
        self, x: Embedded | Float[Tensor, "batch seq _"], t: Time, s: Time
    ) -> Float[Tensor, "batch seq _"]:
        r"""One step of the rule on $[h, y]$ (lifting $h$ first)."""
        width = self.field.predictor.table.shape[1]
        if x.ndim != 3 or x.shape[-1] not in (width, width + self.vocab_size):
            raise ValueError(
                f"expected an embedded state (batch, seq, {width}) or a lifted state "
                f"(batch, seq, {width + self.vocab_size}), got {tuple(x.shape)}"
            )
        if x.shape[-1] == width:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], self.vocab_size)], dim=-1)
        return self.rule(self.field)(x, t, s)
