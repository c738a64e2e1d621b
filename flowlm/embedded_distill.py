r"""FMLM's semigroup distillation on embedded states $h = xE$, also across different tables.

`flowlm.distill.semigroup_kl_loss` on a dense state $x_t$ reads $x_t$ only through network
inputs and the linear step of the two-time map, so it can run on embeddings: the student sees
$h^S = x_tE_S$, the teacher $h^T = x_tE_T$. When the tables differ, both noises come from the
same $\varepsilon$: draw them together with ``embedded_noise([E_T, E_S], ...)`` (the joint
factor of the $(d_T + d_S)^2$ Gram matrix of $[E_T, E_S]$). The loss then equals the dense
one for the same $x_t$, without any ``(batch, seq, vocab)`` state; targets stay on the simplex.
"""

import torch

from flowlm._checks import check_jump, check_time
from flowlm._tensors import broadcast_time
from flowlm._types import Time, TokenLoss
from flowlm.distill import semigroup_weight
from flowlm.embedded import Embedded, EmbeddedXPredictor, EmbeddedXPredMap


def embedded_semigroup_kl_loss(
    student: EmbeddedXPredMap,
    teacher: EmbeddedXPredictor,
    h_student: Embedded,
    h_teacher: Embedded,
    t: Time,
    s: Time,
    u: Time | None = None,
) -> TokenLoss:
    r"""v2 semigroup KL on embeddings: $\mathrm{KL}(\bar\delta_{t,s}\Vert\hat\delta_{t,s}) + \mathrm{KL}(D_t\Vert\hat\delta_{t,t})$.

    With $w$ = `flowlm.distill.semigroup_weight` and $h_u = \mathrm{step}(h^S, \hat\delta_{t,u}E_S)$,

    $$\bar\delta_{t,s} = w\,\hat\delta_{t,u}(h^S) + (1 - w)\,\hat\delta_{u,s}(h_u),\qquad
      D_t = \mathrm{softmax}\,f_T(h^T, t),$$

    both without gradient; $u$ defaults to the midpoint of ``t`` and ``s``. Equal to
    ``semigroup_kl_loss`` on the dense state $x_t$ with $h^S = x_tE_S$, $h^T = x_tE_T$.

    Args:
        student: the two-time embedded map being trained.
        teacher: the frozen FLM predictor.
        h_student: $x_tE_S$, the state as the student embeds it.
        h_teacher: $x_tE_T$, the same state as the teacher embeds it.
        t: start times, per example or per token.
        s: end times, $s > t$ ($t = s = 1$ on known positions).
        u: intermediate times in $[t, s]$.

    Examples:
        >>> from flowlm import LinearInterpolant
        >>> from flowlm.backbones import DiT
        >>> student = EmbeddedXPredMap(
        ...     EmbeddedXPredictor(DiT(9, dim=8, depth=1, heads=2, two_time=True)),
        ...     LinearInterpolant(),
        ...     two_time=True,
        ... )
        >>> teacher = EmbeddedXPredictor(DiT(9, dim=8, depth=1, heads=2))
        >>> h = torch.randn(2, 3, 8)
        >>> loss = embedded_semigroup_kl_loss(student, teacher, h, h, torch.zeros(2), torch.ones(2))
        >>> loss.shape, bool(loss.abs().max() < 1e-6)  # fresh models predict uniform probabilities
        (torch.Size([2, 3]), True)
    """
    if not student.two_time:
        raise ValueError("the student of a semigroup loss is a two-time map: two_time=True")
    check_time(s, h_student, "s")
    check_jump(t, s)
    u = 0.5 * (t + s) if u is None else u
    check_time(u, h_student, "u")
    predictor, interpolant = student.predictor, student.interpolant
    with torch.no_grad():
        first = predictor(h_student, t, u)
        h_u = interpolant.step(h_student, predictor.embed(first), t, u)
        w = broadcast_time(semigroup_weight(interpolant.reparam, t, u, s), first)
        target = torch.lerp(predictor(h_u, u, s), first, w)
        teacher_probs = teacher(h_teacher, t)
    jump = predictor.kl_divergence(target, h_student, t, s)
    return jump + predictor.kl_divergence(teacher_probs, h_student, t, t)
