r"""γ-sampling: a stochastic multi-step sampler that jumps past the next time and renoises back.

From ``t`` to ``s``, with churn $c \in [0, 1]$: jump with a flow map to
$\tilde t = s + c(1 - s)$ (in model time, so $\tilde t \ge s$), then renoise back to $s$ with
fresh Gaussian noise $\varepsilon'$:

$$x_s = a\,x_{\tilde t} + b\,\varepsilon',\qquad
  a = \frac{\alpha(\gamma_s)}{\alpha(\tilde\gamma)},\quad
  b = \sqrt{\sigma(\gamma_s)^2 - a^2\sigma(\tilde\gamma)^2},\qquad \tilde\gamma = \kappa(\tilde t).$$

**Why the marginal is kept.** On the path, given the data $x_1$,
$x_{\tilde t} = \sigma(\tilde\gamma)\varepsilon + \alpha(\tilde\gamma)x_1$. Then
$a x_{\tilde t} + b\varepsilon' = a\sigma(\tilde\gamma)\varepsilon + b\varepsilon' + \alpha(\gamma_s)x_1$,
and the two independent Gaussian terms sum to one of variance
$a^2\sigma(\tilde\gamma)^2 + b^2 = \sigma(\gamma_s)^2$: exactly the path's point at $s$ given
$x_1$. So if the jump's output has the path's marginal at $\tilde t$, the result has the
path's marginal at $s$. For the linear path ($\alpha = \gamma$, $\sigma = 1 - \gamma$):

$$x_s = \frac{\gamma_s}{\tilde\gamma}x_{\tilde t}
  + \sqrt{(1-\gamma_s)^2 - \Big(\frac{\gamma_s(1-\tilde\gamma)}{\tilde\gamma}\Big)^2}\,\varepsilon'.$$

$b$ is real because $\tilde\gamma \ge \gamma_s$ (the signal-to-noise ratio grows along the
path). $c = 0$ is the deterministic map ($\tilde t = s$, $a = 1$, $b = 0$); $c = 1$ jumps to
the data and renoises (consistency-model style multistep sampling); a step onto the data,
$s = 1$, is the map's own jump whatever $c$, so one-step sampling does not change.
"""

import torch
from torch import nn

from flowlm._tensors import broadcast_time
from flowlm._types import State, Time
from flowlm.interpolants import Interpolant
from flowlm.protocols import FlowMap


class GammaSampling(nn.Module):
    r"""A flow map made stochastic: jump to $\tilde t = s + c(1 - s)$, renoise back to ``s``.

    See the module notes for the renoising rule and why it keeps the path's marginal. The
    noise is drawn on the state's device from ``generator``; the network calls are those of
    ``flow_map`` (one jump per step). The whole state is renoised, so wrap a map on the
    plain state $x$ (not a self-conditioned map on a lifted state, whose estimate half must
    not get noise).

    Args:
        flow_map: the map that jumps, e.g. an FMLM two-time ``XPredMap``.
        interpolant: the path whose marginal is matched (the one ``flow_map`` steps along).
        churn: $c \in [0, 1]$; 0 is ``flow_map`` itself.
        generator: random source for the fresh noise, on the state's device.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap, rollout, time_grid
        >>> path = LinearInterpolant()
        >>> jump = XPredMap(XPredictor(lambda x, t, s: 4 * x), path, two_time=True)
        >>> sampler = GammaSampling(jump, path, churn=0.8, generator=torch.Generator().manual_seed(0))
        >>> rollout(sampler, torch.randn(2, 3, 5), time_grid(4)).nfe
        4
        >>> x, t, s = torch.randn(2, 3, 5), torch.zeros(2), torch.full((2,), 0.5)
        >>> torch.equal(GammaSampling(jump, path, churn=0.0)(x, t, s), jump(x, t, s))
        True
    """

    def __init__(
        self,
        flow_map: FlowMap,
        interpolant: Interpolant,
        churn: float,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= churn <= 1.0:
            raise ValueError(f"churn must lie in [0, 1], got {churn}")
        self.flow_map = flow_map
        self.interpolant = interpolant
        self.churn = churn
        self.generator = generator

    def jump_time(self, s: Time) -> Time:
        r"""$\tilde t = s + c(1 - s)$, the time the map jumps to."""
        return s + self.churn * (1.0 - s)

    def renoise_weights(self, s: Time) -> tuple[Time, Time]:
        r"""$(a, b)$ of $x_s = a\,x_{\tilde t} + b\,\varepsilon'$, shaped like ``s``.

        Exactly $(1, 0)$ where $\tilde\gamma = \gamma_s$ (no churn, or $s = 1$).

        Examples:
            >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
            >>> path = LinearInterpolant()
            >>> jump = XPredMap(XPredictor(lambda x, t: x), path)
            >>> GammaSampling(jump, path, churn=1.0).renoise_weights(torch.tensor([0.5, 1.0]))
            (tensor([0.5000, 1.0000]), tensor([0.5000, 0.0000]))
        """
        path = self.interpolant
        gamma_s, gamma_tilde = path.reparam(s), path.reparam(self.jump_time(s))
        same = gamma_tilde <= gamma_s
        keep = path.alpha(gamma_s) / torch.where(same, 1.0, path.alpha(gamma_tilde))
        variance = path.sigma(gamma_s) ** 2 - (keep * path.sigma(gamma_tilde)) ** 2
        noise = variance.clamp_min(0.0).sqrt()
        return torch.where(same, 1.0, keep), torch.where(same, 0.0, noise)

    def forward(self, x: State, t: Time, s: Time) -> State:
        r"""$a\,X_{t\to\tilde t}(x) + b\,\varepsilon'$: one jump of ``flow_map``, fresh noise."""
        x_tilde = self.flow_map(x, t, self.jump_time(s))
        keep, noise = self.renoise_weights(s)
        fresh = torch.randn(
            x_tilde.shape, generator=self.generator, device=x_tilde.device, dtype=x_tilde.dtype
        )
        return x_tilde * broadcast_time(keep, x_tilde) + fresh * broadcast_time(noise, x_tilde)
