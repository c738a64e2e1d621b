r"""Self-conditioning: the network also reads its own previous estimate of the data.

A self-conditioned backbone takes a second input, the previous estimate
$\hat x_1' \in \mathbb{R}^{L \times V}$ (zeros when there is none), and is called as
``backbone(x_t, t, previous=...)`` or ``backbone(x_t, t, s, previous=...)``
(e.g. ``DiT(..., self_conditioning=True)``).

- **Training** (`draw_previous`, `self_conditioned_logits`): per example, with probability
  $p = \tfrac12$ the previous estimate is $\mathrm{sg}(\mathrm{softmax}(f(x_t, t, 0)))$, else
  $0$; the loss is taken on $f(x_t, t, \hat x_1')$. The coin is drawn on the device.
- **Sampling** (`SelfConditionedMap`): each step feeds the $\hat x_1$ of the step before, at no
  extra network call. The sampler's state is explicit, never kept in a module: the *lifted
  state* $[x, \hat x_1']$ of shape ``(batch, seq, 2 * vocab)`` (`lift_state`, `split_state`),
  which `flowlm.rollout` runs unchanged: with known tokens (``context.lift()``, held one-hot
  in both halves), in blocks, and with any step rule (``solver=``, the estimate threaded
  through its stages).
- **Guidance** on the self-conditioning input: logits
  $z_w = z(\hat x_1') + w\,(z(\hat x_1') - z(0))$, both in one batched call.
- **Distillation** of a self-conditioned teacher. The losses of `flowlm.distill` query the
  teacher at states of their own choosing, where no step before exists: the teacher is its
  own two-call estimate `WithOwnEstimate`, $f(x, t, \mathrm{sg}(\mathrm{softmax}(f(x, t, 0))))$,
  the estimate it was trained on, as a function of the state alone. The student is
  self-conditioned too (it starts from the teacher's weights, the estimate's input
  included): bind its training estimate with `WithPrevious` and wrap it as any other student,
  ``XPredMap(XPredictor(WithPrevious(student, draw_previous(student, x_t, t, s))), path,
  two_time=True)``. Each example is then distilled with no estimate (the one-step map) or
  with the student's own first jump estimate $\delta_{t,s}(x_t; 0)$ (the 2-call map below);
  the same estimate is read by the student's calls inside the semigroup target, which is
  consistent because the target is the teacher's flow map whatever the estimate: the loss
  is minimal when every estimate gives that same map.

One-step generation has no previous estimate; ``SelfConditionedMap(..., estimate_first=True)``
makes the 2-call variant (estimate, then jump self-conditioned on it). At any step count,
``XPredMap(XPredictor(WithOwnEstimate(student)), path, two_time=True)`` makes that 2-call step
from no estimate at every step, the map such a student is distilled as (its one step is the
``estimate_first`` sampler's from ``lift_state(noise)``).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypedDict, Unpack, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from flowlm._checks import check_state
from flowlm._tensors import at_least_float32, kept_per_example
from flowlm._types import Logits, Probs, State, Time
from flowlm.heads import XPredictor
from flowlm.interpolants import Interpolant
from flowlm.protocols import FlowMap, VelocityField
from flowlm.reparam import TimeReparam

LiftedState = Float[Tensor, "batch seq lifted"]
"""A self-conditioned sampler's state $[x, \\hat x_1']$: ``2 * vocab`` entries per position."""


@runtime_checkable
class SelfConditionedBackbone(Protocol):
    """A backbone that also reads a previous estimate of the data (``None``: zeros)."""

    def __call__(
        self, x_t: State, t: Time, s: Time | None = None, /, previous: Probs | None = None
    ) -> Logits:
        """Logits of the clean token at every position."""
        ...


@dataclass(frozen=True)
class WithPrevious:
    r"""A self-conditioned backbone with its previous estimate bound: a plain `flowlm.Backbone`.

    ``WithPrevious(f, p)(x_t, t[, s]) = f(x_t, t[, s], previous=p)``, so `flowlm.XPredictor`,
    `flowlm.XPredMap` and every distillation loss use it unchanged. The estimate is per row
    of its batch: `rows` keeps those of a part (`flowlm.RowSelectable`), which is how
    `flowlm.split_semigroup_kl_loss` calls it on some rows.

    Attributes:
        backbone: the self-conditioned network.
        previous: the estimate $\hat x_1'$ it reads (``None``: zeros).

    Examples:
        >>> from flowlm import XPredictor
        >>> def f(x, t, s=None, previous=None):
        ...     return x if previous is None else x + previous
        >>> x, p = torch.zeros(1, 2, 3), torch.eye(3)[None, :2]
        >>> torch.equal(XPredictor(WithPrevious(f, p)).logits(x, torch.zeros(1)), p)
        True
    """

    backbone: SelfConditionedBackbone
    previous: Probs | None

    def __call__(self, x_t: State, t: Time, s: Time | None = None, /) -> Logits:
        """The backbone's logits given the bound estimate."""
        if s is None:
            return self.backbone(x_t, t, previous=self.previous)
        return self.backbone(x_t, t, s, previous=self.previous)

    def rows(self, index: Int[Tensor, " rows"]) -> "WithPrevious":
        """The backbone with the estimate of the rows ``index`` only, for a call on ``x_t[index]``."""
        return WithPrevious(self.backbone, None if self.previous is None else self.previous[index])


def _first_estimate(
    backbone: SelfConditionedBackbone, x_t: State, t: Time, s: Time | None
) -> Probs:
    r"""$\mathrm{sg}(\mathrm{softmax}(f(x_t, t[, s], 0)))$ in ``x_t``'s dtype: one recorded call."""
    with torch.no_grad():
        return XPredictor(WithPrevious(backbone, None))(x_t, t, s).to(x_t.dtype)


@dataclass(frozen=True)
class WithOwnEstimate:
    r"""A self-conditioned backbone fed its own first estimate: a plain `flowlm.Backbone`.

    $$\bar f(x_t, t[, s]) = f\big(x_t, t[, s],\ \mathrm{sg}(\mathrm{softmax}(f(x_t, t[, s], 0)))\big):$$

    two network calls, the first without gradient, both at the same inputs. It is the
    estimate self-conditioning trains on (`draw_previous` with probability 1) as a function
    of the state alone: the denoiser of a self-conditioned FLM wherever there is no step
    before, e.g. as the teacher of `flowlm.distill`'s losses, or for a validation loss.

    Attributes:
        backbone: the self-conditioned network.

    Examples:
        >>> from flowlm import XPredictor
        >>> def f(x, t, previous=None):
        ...     return x if previous is None else x + previous
        >>> XPredictor(WithOwnEstimate(f)).logits(torch.zeros(1, 1, 2), torch.zeros(1))
        tensor([[[0.5000, 0.5000]]])
    """

    backbone: SelfConditionedBackbone

    def __call__(self, x_t: State, t: Time, s: Time | None = None, /) -> Logits:
        """The backbone's logits given its own estimate at ``(x_t, t[, s])``."""
        previous = _first_estimate(self.backbone, x_t, t, s)
        return WithPrevious(self.backbone, previous)(x_t, t, s)


class PreviousDraw(TypedDict, total=False):
    """How `draw_previous` draws, as keywords of `self_conditioned_logits`."""

    probability: float
    """Chance that an example gets the estimate rather than zeros (default 0.5)."""
    generator: torch.Generator | None
    """Random source on the state's device."""


def draw_previous(
    backbone: SelfConditionedBackbone,
    x_t: State,
    t: Time,
    s: Time | None = None,
    *,
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> Probs:
    r"""The training-time previous estimate: per example, $\mathrm{sg}(\hat x_1(x_t; 0))$ or $0$.

    With probability ``probability`` (a Bernoulli coin per example, drawn on ``x_t``'s device
    from ``generator``: no host sync) the estimate is
    $\mathrm{sg}(\mathrm{softmax}(f(x_t, t[, s], 0)))$; otherwise zeros. One network call
    (recorded), made for every example so that nothing depends on the coins on the host.

    Args:
        backbone: the self-conditioned network.
        x_t: states at time ``t``.
        t: model times, per example or per token.
        s: the second time of a two-time network.
        probability: chance that an example gets the estimate rather than zeros.
        generator: random source on ``x_t``'s device.

    Returns:
        Probabilities, or zeros, per example, in ``x_t``'s dtype.

    Examples:
        >>> def f(x, t, previous=None):
        ...     return torch.zeros_like(x)
        >>> previous = draw_previous(f, torch.zeros(4, 1, 2), torch.rand(4), probability=1.0)
        >>> previous[:, 0]
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000],
                [0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability}")
    check_state(x_t, name="x_t")
    estimate = _first_estimate(backbone, x_t, t, s)
    return kept_per_example(estimate, probability, generator)


def self_conditioned_logits(
    backbone: SelfConditionedBackbone,
    x_t: State,
    t: Time,
    s: Time | None = None,
    **draw: Unpack[PreviousDraw],
) -> Logits:
    r"""The logits a self-conditioned network is trained on: $f(x_t, t[, s], \hat x_1')$.

    $\hat x_1'$ is `draw_previous`; two network calls, the first without gradient. Take the
    usual loss on the result (e.g. `flowlm.cross_entropy` for FLM).

    Args:
        backbone: the self-conditioned network.
        x_t: states at time ``t``.
        t: model times, per example or per token.
        s: the second time of a two-time network.
        draw: ``probability`` and ``generator`` of `draw_previous`.

    Examples:
        >>> from flowlm.backbones import DiT
        >>> model = DiT(5, dim=16, depth=1, heads=2, self_conditioning=True)
        >>> x, t = torch.randn(2, 3, 5), torch.rand(2)
        >>> torch.equal(self_conditioned_logits(model, x, t), model(x, t))  # fresh: input ignored
        True
    """
    previous = draw_previous(backbone, x_t, t, s, **draw)
    return XPredictor(WithPrevious(backbone, previous)).logits(x_t, t, s)


class SelfConditionedState(NamedTuple):
    """The two halves of a lifted state."""

    x: State
    previous: Probs


def lift_state(x: State, previous: Probs | None = None) -> LiftedState:
    r"""The lifted state $[x, \hat x_1']$ a `SelfConditionedMap` runs on (no estimate: zeros).

    Examples:
        >>> lift_state(torch.ones(1, 1, 2))
        tensor([[[1., 1., 0., 0.]]])
    """
    check_state(x)
    if previous is None:
        return torch.cat([x, torch.zeros_like(x)], dim=-1)
    if previous.shape != x.shape:
        raise ValueError(
            f"previous has shape {tuple(previous.shape)}, the state {tuple(x.shape)}: "
            "they must match"
        )
    return torch.cat([x, previous.to(x.dtype)], dim=-1)


def split_state(lifted: LiftedState) -> SelfConditionedState:
    """The state $x$ and the previous estimate held in a lifted state (views, no copy).

    Examples:
        >>> split_state(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])).x
        tensor([[[1., 2.]]])
    """
    check_state(lifted, name="lifted")
    if lifted.shape[-1] % 2:
        raise ValueError(
            f"a lifted state has 2 * vocab entries per position, got {lifted.shape[-1]}: "
            "build it with flowlm.lift_state"
        )
    x, previous = lifted.chunk(2, dim=-1)
    return SelfConditionedState(x, previous)


class SelfConditionedMap(nn.Module):
    r"""The x-prediction map of a self-conditioned network, on the lifted state $[x, \hat x_1']$.

    $$[x, \hat x_1'] \mapsto [X_{t\to s}(x), \hat x_1],\qquad
      \hat x_1 = \mathrm{softmax}(z),\quad z = f(x, t[, s], \hat x_1'),$$

    with $X_{t\to s}$ the interpolant's step from ``t`` to ``s`` holding $\hat x_1$ (as
    `flowlm.XPredMap`): each step reads the estimate of the step before and passes its own on,
    with one network call. Start from ``lift_state(noise)``; read the result with
    `split_state` (at $s = 1$ both halves are $\hat x_1$).

    With ``solver`` (e.g. `flowlm.Heun`, `flowlm.Midpoint`) the step is that rule on the
    velocity field $v(x, t) = \sigma'\hat x_0 + \alpha'\hat x_1$, the estimate threaded
    through its stages: each network call reads the estimate of the call before (the first
    one the incoming $\hat x_1'$), and the step passes on the estimate of its last call. A
    Heun step is then $\hat x_1 = f(x, t, \hat x_1')$,
    $\tilde x = x + \Delta\,v(x, t; \hat x_1)$, $\hat x_1'' = f(\tilde x, s, \hat x_1)$,
    $X_{t\to s}(x) = x + \tfrac{\Delta}{2}(v(x, t; \hat x_1) + v(\tilde x, s; \hat x_1''))$,
    passing $\hat x_1''$ on. (Where the rule ends on the data it takes its Euler step, and the
    estimate passed on is still the last call's, so the two halves may differ there.)

    Conditioning composes with it, on one code path: ``rollout(sampler, lift_state(noise),
    grid, context=context.lift())`` (and `flowlm.block_rollout`) hold the known tokens
    one-hot at time 1 in the state half and as the estimate there (its exact value);
    `flowlm.Replacement` noises them in the state half only; wrap the backbone in
    `flowlm.Guidance` for classifier-free guidance on the context (it passes the estimate on).

    Args:
        backbone: the self-conditioned network.
        interpolant: the path it steps along.
        two_time: call the network with both times (an FMLM two-time denoiser).
        guidance: $w$ of $z_w = z(\hat x_1') + w(z(\hat x_1') - z(0))$, computed in one call
            on a doubled batch; ``None`` for no guidance. The guided estimate is passed on.
        estimate_first: first estimate $\hat x_1$ with the incoming estimate (same times),
            then make the step self-conditioned on it: 2 calls per step (the natural one-step
            sampler with an estimate).
        solver: a step rule built on a velocity field, ``solver(field)`` a `flowlm.FlowMap`
            (`flowlm.Euler`, `flowlm.Midpoint`, `flowlm.Heun` or any such); ``None``: the
            x-prediction step. Not with ``two_time`` (a two-time map jumps; a step rule
            integrates a one-time field).

    Raises:
        ValueError: if ``solver`` is given with ``two_time``.

    Examples:
        >>> from flowlm import Heun, LinearInterpolant, rollout, time_grid
        >>> from flowlm.backbones import DiT
        >>> model = DiT(5, dim=16, depth=1, heads=2, self_conditioning=True)
        >>> sampler = SelfConditionedMap(model, LinearInterpolant())
        >>> trajectory = rollout(sampler, lift_state(torch.randn(2, 3, 5)), time_grid(4))
        >>> trajectory.nfe, split_state(trajectory.x).x.shape
        (4, torch.Size([2, 3, 5]))
        >>> heun = SelfConditionedMap(model, LinearInterpolant(), solver=Heun)
        >>> rollout(heun, lift_state(torch.randn(2, 3, 5)), time_grid(4)).nfe
        8
    """

    def __init__(
        self,
        backbone: SelfConditionedBackbone,
        interpolant: Interpolant,
        *,
        two_time: bool = False,
        guidance: float | None = None,
        estimate_first: bool = False,
        solver: Callable[[VelocityField], FlowMap] | None = None,
    ) -> None:
        super().__init__()
        if solver is not None and two_time:
            raise ValueError(
                "solver: a two-time map jumps from t to s; a step rule integrates a one-time "
                "field (give two_time=False, or no solver)"
            )
        self.backbone = backbone
        self.interpolant = interpolant
        self.two_time = two_time
        self.guidance = guidance
        self.estimate_first = estimate_first
        self.solver = solver

    def forward(self, lifted: LiftedState, t: Time, s: Time) -> LiftedState:
        r"""$[x, \hat x_1'] \mapsto [X_{t \to s}(x), \hat x_1]$: one call per stage (+1 with ``estimate_first``)."""
        x, previous = split_state(lifted)
        self.interpolant.check_state(x)
        if self.estimate_first:
            previous = self.estimate(x, t, s, previous).to(x.dtype)
        if self.solver is not None:
            field = _ThreadedField(self, previous)
            moved = self.solver(field)(x, t, s)
            return lift_state(moved, field.previous)
        x1_hat = self.estimate(x, t, s, previous)
        return lift_state(self.interpolant.step(x, x1_hat, t, s), x1_hat)

    def estimate(self, x: State, t: Time, s: Time, previous: Probs) -> Probs:
        r"""$\hat x_1 = \mathrm{softmax}(z_w)$ given the previous estimate (one network call)."""
        return torch.softmax(at_least_float32(self.logits(x, t, s, previous)), dim=-1)

    def logits(self, x: State, t: Time, s: Time, previous: Probs) -> Logits:
        r"""$z(\hat x_1')$, or the guided $z(\hat x_1') + w(z(\hat x_1') - z(0))$ (one call)."""
        second = s if self.two_time else None
        if self.guidance is None:
            return XPredictor(WithPrevious(self.backbone, previous)).logits(x, t, second)
        doubled = torch.cat([previous, torch.zeros_like(previous)])
        logits = XPredictor(WithPrevious(self.backbone, doubled)).logits(
            torch.cat([x, x]), torch.cat([t, t]), None if second is None else torch.cat([s, s])
        )
        conditioned, unconditioned = logits.chunk(2)
        return conditioned + self.guidance * (conditioned - unconditioned)


class _ThreadedField:
    r"""The velocity field of one self-conditioned step: each call reads the call before's $\hat x_1$.

    Made afresh for every step by `SelfConditionedMap` (the estimate between steps stays in
    the lifted state); ``previous`` is the estimate of the last call.
    """

    def __init__(self, sampler: SelfConditionedMap, previous: Probs) -> None:
        self.sampler = sampler
        self.previous = previous

    @property
    def reparam(self) -> TimeReparam:
        """The interpolant's clock."""
        return self.sampler.interpolant.reparam

    def __call__(self, x: State, t: Time, /) -> State:
        r"""$dx/d\gamma = \sigma'\hat x_0 + \alpha'\hat x_1$, $\hat x_1 = f(x, t, \hat x_1')$."""
        self.previous = self.sampler.estimate(x, t, t, self.previous).to(x.dtype)
        return self.sampler.interpolant.velocity(x, self.previous, t)
