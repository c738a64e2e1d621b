r"""Flow-map distillation losses: teach a network to jump along the flow in one call.

Maps go from model time ``t`` to ``s`` ($X_{t\to s}$, ``t < s``); much of the literature
writes $X_{s,t}$. Every loss returns a per-token loss ``(batch, seq)`` (reduce it with
`flowlm.masked_mean`, optionally after `flowlm.LearnedTimeWeighting`); every target and every
teacher runs under ``torch.no_grad()``, so only the student is trained.

Times are per example ``(batch,)`` or per token ``(batch, seq)``. Each loss checks its
inputs once: a state, times in [0, 1] and jumps that go forward, ``s > t``, except at known
(clean) positions where ``t = s = 1`` (a device-side check, no host sync). Students are typed
on the `flowlm.TwoTimeMap` protocol and teachers on `flowlm.Predictor`.

The two-time denoiser map used by FMLM is
$X_{t\to s}(x) = x + \frac{\gamma_s - \gamma_t}{1 - \gamma_t}(\delta_{t,s}(x) - x)$
(``XPredMap(predictor, interpolant, two_time=True)``).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from flowlm._checks import check_jump, check_state, check_time
from flowlm._tensors import at_least_float32, broadcast_time
from flowlm._types import Logits, Probs, State, Time, TokenLoss, Tokens
from flowlm.heads import cross_entropy
from flowlm.interpolants import NOISE_FLOOR
from flowlm.protocols import FlowMap, Predictor, TwoTimeMap
from flowlm.reparam import TimeReparam
from flowlm.solvers import TaylorMap

__all__ = [
    "LOG_ARGUMENT_FLOOR",
    "diagonal_kl",
    "eulerian_kl_loss",
    "init_student",
    "kl_divergence",
    "lagrangian_kl_loss",
    "map_regression_kl_loss",
    "map_regression_loss",
    "self_semigroup_loss",
    "semigroup_kl_loss",
    "semigroup_target",
    "semigroup_weight",
    "squared_distance",
    "taylor_semigroup_loss",
]

LOG_ARGUMENT_FLOOR = 0.05
"""Smallest argument of the logarithm in the logit-space Lagrangian and Eulerian targets."""


def _check_jump_inputs(x_t: Tensor, t: Tensor, s: Tensor) -> None:
    """The checks every loss makes once: a state, two times that fit it, forward jumps."""
    check_state(x_t, name="x_t")
    check_time(t, x_t)
    check_time(s, x_t, "s")
    check_jump(t, s)


def squared_distance(a: State, b: State) -> TokenLoss:
    r"""$\lVert a - b\rVert^2$ summed over the vocabulary, per token."""
    return (a - b).pow(2).sum(-1)


def kl_divergence(target: Probs, logits: Logits) -> TokenLoss:
    r"""$\mathrm{KL}(p \,\Vert\, \mathrm{softmax}(z)) = \sum_v p_v(\log p_v - \log\mathrm{softmax}(z)_v)$, per token.

    Examples:
        >>> p = torch.tensor([[[0.5, 0.5]]])
        >>> kl_divergence(p, torch.zeros(1, 1, 2))
        tensor([[0.]])
    """
    log_q = torch.log_softmax(at_least_float32(logits), -1)
    return (torch.special.xlogy(target, target) - target * log_q).sum(-1)


def taylor_semigroup_loss(student: TaylorMap, x_t: State, t: Time, s: Time) -> TokenLoss:
    r"""v1 stage 1: semigroup self-distillation of the second-order Taylor map.

    With $u$ the midpoint of $t$ and $s$ in model time and $\Delta = \gamma_s - \gamma_t$,

    $$\ell = \Big(\frac{1-\gamma_t}{\Delta}\Big)^2
      \big\lVert X^\theta_{t\to s}(x_t) - \mathrm{sg}\big(X^\theta_{u\to s}(X^\theta_{t\to u}(x_t))\big)\big\rVert^2.$$

    Only the correction network of ``student`` learns (the `TaylorMap` field is a frozen teacher).

    Args:
        student: the Taylor map being trained.
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).

    Examples:
        >>> from flowlm import Identity
        >>> class Drift(nn.Module):  # dx/dγ = 1: the Taylor map with g = 0 is exact
        ...     reparam = Identity()
        ...     def forward(self, x, t): return torch.ones_like(x)
        >>> exact = TaylorMap(Drift(), lambda x, t, s: torch.zeros_like(x))
        >>> taylor_semigroup_loss(exact, torch.zeros(1, 2, 3), torch.zeros(1), torch.ones(1))
        tensor([[0., 0.]])
    """
    _check_jump_inputs(x_t, t, s)
    kappa = student.field.reparam
    u = 0.5 * (t + s)
    with torch.no_grad():
        target = student(student(x_t, t, u), u, s)
    gamma_t, gamma_s = kappa(t), kappa(s)
    weight = ((1.0 - gamma_t) / (gamma_s - gamma_t).clamp_min(1e-12)) ** 2  # finite in float32
    distance = squared_distance(student(x_t, t, s), target)
    return broadcast_time(weight, distance) * distance


def map_regression_loss(
    student: FlowMap, teacher: FlowMap, x_t: State, t: Time, s: Time
) -> TokenLoss:
    r"""v1 stage 2: regress a student map onto a frozen one, $\lVert X^{T}_{t\to s}(x_t) - X^{\phi}_{t\to s}(x_t)\rVert^2$.

    The teacher can be the stage-1 `TaylorMap` or any other flow map (e.g. a many-step rollout).

    Args:
        student: the flow map being trained.
        teacher: the frozen flow map it learns to match.
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).

    Examples:
        >>> from flowlm import Identity, Euler
        >>> class Decay(nn.Module):
        ...     reparam = Identity()
        ...     def forward(self, x, t): return -x
        >>> euler = Euler(Decay())
        >>> map_regression_loss(euler, euler, torch.ones(2, 3, 4), torch.zeros(2), torch.ones(2))
        tensor([[0., 0., 0.],
                [0., 0., 0.]])
    """
    _check_jump_inputs(x_t, t, s)
    with torch.no_grad():
        target = teacher(x_t, t, s)
    return squared_distance(student(x_t, t, s), target)


def map_regression_kl_loss(
    student: TwoTimeMap, teacher: FlowMap, x_t: State, t: Time, s: Time
) -> TokenLoss:
    r"""Regress a two-time denoiser onto any frozen flow map, in KL on the simplex.

    The teacher's jump implies the denoiser $\delta^*$ with which the student's map would make
    it (`Interpolant.implied_prediction`); for a teacher that steps with simplex predictions
    (e.g. `Substeps` of the FLM Euler map) $\delta^*$ is a convex combination of them, so it
    lies on the simplex (round-off is clipped). The loss is
    $\mathrm{KL}(\delta^*\,\Vert\,\hat\delta_{t,s}(x_t))$: v1 stage 2 in the simplex form of v2.
    Needs $\gamma_s > \gamma_t$.

    Args:
        student: the two-time map being trained.
        teacher: the frozen flow map (e.g. `Substeps` of the FLM Euler map).
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> path = LinearInterpolant()
        >>> student = XPredMap(XPredictor(lambda x, t, s: x), path, two_time=True)
        >>> teacher = XPredMap(XPredictor(lambda x, t: x), path)
        >>> x, t, s = torch.randn(1, 2, 3), torch.tensor([0.2]), torch.tensor([1.0])
        >>> bool(map_regression_kl_loss(student, teacher, x, t, s).abs().max() < 1e-6)
        True
    """
    _check_jump_inputs(x_t, t, s)
    with torch.no_grad():
        implied = student.interpolant.implied_prediction(x_t, teacher(x_t, t, s), t, s)
        clipped = implied.clamp_min(0.0)
        target = clipped / clipped.sum(-1, keepdim=True)
    return kl_divergence(target, student.predictor.logits(x_t, t, s))


def semigroup_weight(reparam: TimeReparam, t: Time, u: Time, s: Time) -> Time:
    r"""The convex weight that makes two-time denoiser maps compose exactly.

    $X_{u\to s}\circ X_{t\to u} = X_{t\to s}$ holds for the two-time denoiser map iff
    $\delta_{t,s} = w\,\delta_{t,u} + (1 - w)\,\delta_{u,s}(X_{t\to u})$ with

    $$w = \frac{(1-\gamma_s)(\gamma_u-\gamma_t)}{(1-\gamma_u)(\gamma_s-\gamma_t)} \in [0, 1].$$

    Examples:
        >>> from flowlm import Identity
        >>> semigroup_weight(Identity(), torch.tensor([0.0]), torch.tensor([0.5]), torch.tensor([1.0]))
        tensor([0.])
    """
    gamma_t, gamma_u, gamma_s = reparam(t), reparam(u), reparam(s)
    numerator = (1.0 - gamma_s) * (gamma_u - gamma_t)
    denominator = (1.0 - gamma_u).clamp_min(NOISE_FLOOR) * (gamma_s - gamma_t)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), 1.0).clamp(0, 1)


def semigroup_target(student: TwoTimeMap, x_t: State, t: Time, u: Time, s: Time) -> Probs:
    r"""$\bar\delta_{t,s} = w\,\hat\delta_{t,u}(x_t) + (1-w)\,\hat\delta_{u,s}(\hat X_{t\to u}(x_t))$, without gradient.

    Two forward passes of the (two-time) student; the result stays on the simplex.
    """
    with torch.no_grad():
        first = student.predictor(x_t, t, u)
        x_u = student.interpolant.step(x_t, first, t, u)
        second = student.predictor(x_u, u, s)
        w = broadcast_time(semigroup_weight(student.interpolant.reparam, t, u, s), x_t)
        return w * first + (1.0 - w) * second


def diagonal_kl(student: TwoTimeMap, teacher_probs: Probs, x_t: State, t: Time) -> TokenLoss:
    r"""Tie the student's diagonal to the FLM denoiser: $\mathrm{KL}(D_t(x_t)\,\Vert\,\hat\delta_{t,t}(x_t))$.

    ``teacher_probs`` is $D_t(x_t)$, computed without gradient by the caller.
    """
    return kl_divergence(teacher_probs, student.predictor.logits(x_t, t, t))


def _teacher_probs(teacher: Predictor, x_t: State, t: Time) -> Probs:
    with torch.no_grad():
        return teacher(x_t, t)


def semigroup_kl_loss(
    student: TwoTimeMap, teacher: Predictor, x_t: State, t: Time, s: Time, u: Time | None = None
) -> TokenLoss:
    r"""v2: $\mathrm{KL}(\bar\delta_{t,s}\,\Vert\,\hat\delta_{t,s}(x_t)) + \mathrm{KL}(D_t(x_t)\,\Vert\,\hat\delta_{t,t}(x_t))$.

    $\bar\delta$ is `semigroup_target` at ``u`` (default: the midpoint of ``t`` and ``s``).

    Args:
        student: the two-time map being trained.
        teacher: the frozen FLM denoiser $D_t$ (ties the diagonal).
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).
        u: intermediate times in $[t, s]$.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> def fixed(x, t, s=None):  # one distribution everywhere: jumps compose exactly
        ...     return torch.tensor([1.0, 2.0, 3.0]).expand_as(x)
        >>> student = XPredMap(XPredictor(fixed), LinearInterpolant(), two_time=True)
        >>> x, t, s = torch.randn(2, 4, 3), torch.rand(2), torch.ones(2)
        >>> loss = semigroup_kl_loss(student, XPredictor(fixed), x, t, s)
        >>> loss.shape, bool(loss.abs().max() < 1e-6)
        (torch.Size([2, 4]), True)
    """
    _check_jump_inputs(x_t, t, s)
    u = 0.5 * (t + s) if u is None else u
    check_time(u, x_t, "u")
    target = semigroup_target(student, x_t, t, u, s)
    jump = kl_divergence(target, student.predictor.logits(x_t, t, s))
    return jump + diagonal_kl(student, _teacher_probs(teacher, x_t, t), x_t, t)


def self_semigroup_loss(
    student: TwoTimeMap, tokens: Tokens, x_t: State, t: Time, s: Time, u: Time | None = None
) -> TokenLoss:
    r"""Self-distillation (no pretrained teacher): the semigroup KL plus cross-entropy of the diagonal.

    $\ell = \mathrm{KL}(\bar\delta_{t,s}\,\Vert\,\hat\delta_{t,s}(x_t)) - \log\hat\delta_{t,t}(x_t)[x]$:
    the diagonal learns the denoiser from data while the off-diagonal learns to jump.

    Args:
        student: the two-time map being trained.
        tokens: the data tokens behind ``x_t``.
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).
        u: intermediate times in $[t, s]$.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> student = XPredMap(XPredictor(lambda x, t, s: 50 * x), LinearInterpolant(), two_time=True)
        >>> tokens = torch.tensor([[0, 2]])
        >>> x = torch.eye(3)[tokens]  # the data itself: the diagonal is confident and right
        >>> loss = self_semigroup_loss(student, tokens, x, torch.zeros(1), torch.ones(1))
        >>> bool(loss.abs().max() < 1e-6)
        True
    """
    _check_jump_inputs(x_t, t, s)
    u = 0.5 * (t + s) if u is None else u
    check_time(u, x_t, "u")
    target = semigroup_target(student, x_t, t, u, s)
    jump = kl_divergence(target, student.predictor.logits(x_t, t, s))
    return jump + cross_entropy(student.predictor.logits(x_t, t, t), tokens)


def _jvp(
    function: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """Forward-mode product: ``(function(*primals), d function · tangents)``."""
    # contiguous: forward-mode AD writes into the primals' layout (per-token times are often
    # expanded views of per-example ones)
    output = torch.func.jvp(
        function, tuple(p.contiguous() for p in primals), tuple(v.contiguous() for v in tangents)
    )
    return output[0], output[1]


def _centered(tangent: Logits, logits: Logits) -> Logits:
    r"""$dz - \mathbb{E}_{\mathrm{softmax}(z)}[dz]$: the logit tangent of the probabilities."""
    probs = torch.softmax(logits, -1)
    return tangent - (probs * tangent).sum(-1, keepdim=True)


def _corrected_jump_loss(
    student: TwoTimeMap,
    x_t: State,
    t: Time,
    s: Time,
    base: Logits,
    c: Time,
    d_logits: Logits,
    logits: Logits,
    diagonal: Probs,
) -> TokenLoss:
    r"""The JVP losses' common end: KL of the jump to the corrected target, plus `diagonal_kl`.

    The target is $\mathrm{softmax}(z^{\mathrm{base}} - \log\max(1 + c\,\delta, 0.05))$ with
    $\delta$ = `_centered` ``(d_logits, logits)`` and ``c`` per time (signed); ``diagonal`` is
    the teacher's $D_t(x_t)$ the student's $\delta_{t,t}$ is tied to.
    """
    with torch.no_grad():
        tangent = broadcast_time(c, x_t) * _centered(d_logits, logits)
        correction = (1.0 + tangent).clamp_min(LOG_ARGUMENT_FLOOR)
        target = torch.softmax(base - torch.log(correction), -1)
    jump = kl_divergence(target, student.predictor.logits(x_t, t, s))
    return jump + diagonal_kl(student, diagonal, x_t, t)


def lagrangian_kl_loss(
    student: TwoTimeMap, teacher: Predictor, x_t: State, t: Time, s: Time
) -> TokenLoss:
    r"""Lagrangian distillation (one JVP in the end time), in the simplex-preserving logit form.

    With $c_L = (\gamma_s-\gamma_t)(1-\gamma_s)/(1-\gamma_t)$ and $\delta = dz - \mathbb{E}_{\hat\delta}[dz]$
    for $dz = \partial_{\gamma_s} z_{t,s}(x_t)$ (chain rule through $\kappa$),

    $$\bar\delta = \mathrm{softmax}\big(z^{T}(\hat X_{t\to s}(x_t), s) - \log\max(1 + c_L\delta, 0.05)\big),$$

    a first-order form of $D_s(\hat X_{t\to s}) - c_L\,\partial_{\gamma_s}\hat\delta_{t,s}$; plus the
    diagonal tie `diagonal_kl`.

    Args:
        student: the two-time map being trained.
        teacher: the frozen FLM denoiser $D_t$.
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> def fixed(x, t, s=None):  # one distribution everywhere: the flow is exact
        ...     return torch.tensor([1.0, 2.0, 3.0]).expand_as(x)
        >>> student = XPredMap(XPredictor(fixed), LinearInterpolant(), two_time=True)
        >>> x, t, s = torch.randn(2, 4, 3), torch.zeros(2), torch.full((2,), 0.5)
        >>> loss = lagrangian_kl_loss(student, XPredictor(fixed), x, t, s)
        >>> bool(loss.abs().max() < 1e-6)
        True
    """
    _check_jump_inputs(x_t, t, s)
    reparam = student.interpolant.reparam
    gamma_t, gamma_s = reparam(t), reparam(s)
    with torch.no_grad():

        def logits_at(end: Time) -> Logits:
            return student.predictor.logits(x_t, t, end)

        logits, d_logits = _jvp(logits_at, (s,), (1.0 / reparam.derivative(s),))
        x_s = student.interpolant.step(x_t, torch.softmax(logits, -1), t, s)
        c = (gamma_s - gamma_t) * (1.0 - gamma_s) / (1.0 - gamma_t).clamp_min(NOISE_FLOOR)
        base = teacher.logits(x_s, s)
    diagonal = _teacher_probs(teacher, x_t, t)
    return _corrected_jump_loss(student, x_t, t, s, base, c, d_logits, logits, diagonal)


def eulerian_kl_loss(
    student: TwoTimeMap, teacher: Predictor, x_t: State, t: Time, s: Time
) -> TokenLoss:
    r"""Eulerian distillation (one JVP in the state and start time), in the logit form.

    The tangent is the teacher's flow $(v_t, 1)$ in $(x, \gamma_t)$, $v_t = (D_t(x_t) - x_t)/(1-\gamma_t)$;
    with $c_E = (\gamma_s-\gamma_t)(1-\gamma_t)/(1-\gamma_s)$ and $\delta = dz - \mathbb{E}_{\hat\delta}[dz]$,

    $$\bar\delta = \mathrm{softmax}\big(z^{T}(x_t, t) - \log\max(1 - c_E\delta, 0.05)\big),$$

    a first-order form of $D_t + \frac{\gamma_s-\gamma_t}{1-\gamma_s}
    [(1-\gamma_t)\partial_{\gamma_t}\hat\delta + \nabla\hat\delta\,(D_t - x_t)]$; plus `diagonal_kl`.

    Args:
        student: the two-time map being trained.
        teacher: the frozen FLM denoiser $D_t$.
        x_t: states at time ``t``.
        t: start times, per example or per token.
        s: end times, ``s > t`` (``t = s = 1`` on known positions).

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> def blind(x, t, s=None):  # constant logits: no derivative, student equals teacher
        ...     return torch.zeros_like(x)
        >>> student = XPredMap(XPredictor(blind), LinearInterpolant(), two_time=True)
        >>> x = torch.randn(2, 3, 4)
        >>> loss = eulerian_kl_loss(student, XPredictor(blind), x, torch.zeros(2), torch.ones(2))
        >>> bool(loss.abs().max() < 1e-6)
        True
    """
    _check_jump_inputs(x_t, t, s)
    reparam = student.interpolant.reparam
    gamma_t, gamma_s = reparam(t), reparam(s)
    with torch.no_grad():
        teacher_logits = teacher.logits(x_t, t)
        teacher_probs = torch.softmax(teacher_logits, -1)
        velocity = student.interpolant.velocity(x_t, teacher_probs, t)

        def logits_from(x: State, start: Time) -> Logits:
            return student.predictor.logits(x, start, s)

        logits, d_logits = _jvp(logits_from, (x_t, t), (velocity, 1.0 / reparam.derivative(t)))
        c = -(gamma_s - gamma_t) * (1.0 - gamma_t) / (1.0 - gamma_s).clamp_min(NOISE_FLOOR)
    return _corrected_jump_loss(
        student, x_t, t, s, teacher_logits, c, d_logits, logits, teacher_probs
    )


def init_student(student: nn.Module, teacher: nn.Module, zero: Sequence[str] = ()) -> list[str]:
    r"""Initialise a student from its teacher's weights; zero the named submodules.

    Every teacher weight must fit the student (no unexpected keys); the student's extra
    parameters (e.g. a second time embedding whose last layer starts at zero) keep their init.

    Args:
        student: the network to initialise (e.g. a two-time `DiT`).
        teacher: the network it starts from (e.g. the one-time FLM `DiT`).
        zero: dotted names of student submodules whose parameters are set to zero (e.g.
            ``["output"]`` for the v1 stage-1 correction, which must start at $g \equiv 0$).

    Returns:
        The student parameter names that the teacher did not provide.

    Examples:
        >>> teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> init_student(student, teacher)
        []
        >>> torch.equal(student.weight, teacher.weight)
        True
    """
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"teacher weights with no place in the student: {result.unexpected_keys}")
    with torch.no_grad():
        for name in zero:
            for parameter in student.get_submodule(name).parameters():
                parameter.zero_()
    return list(result.missing_keys)
