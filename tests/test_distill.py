"""Distillation losses against exact flow maps.

The oracle: V = 2, each position is e_0 or e_1 with probability 1/2, linear path. The exact
denoiser is D_γ(x) = softmax(γ x / (1 − γ)²), and the exact flow map is the ODE solution
dx/dγ = (D_γ(x) − x)/(1 − γ), integrated with RK4. The exact two-time denoiser follows from
X_{t→s}(x) = x + (γ_s − γ_t)/(1 − γ_t)·(δ_{t,s}(x) − x).
"""

import pytest
import torch
from torch import nn

import flowlm as fl
from flowlm import distill
from flowlm.backbones import DiT

RK4_STEPS = 40


def per_position(values):
    """Per-example (batch,) or per-token (batch, seq) values against a (batch, seq, vocab) state."""
    return values.reshape(*values.shape, *[1] * (3 - values.ndim))


def exact_denoiser(x, gamma):
    # At gamma = 1 the state is the data itself (a known, clean position).
    g = per_position(gamma)
    inside = torch.where(g < 1, g, 0.0)
    return torch.where(g < 1, torch.softmax(inside * x / (1 - inside) ** 2, -1), x)


def exact_map(x, gamma_t, gamma_s):
    h = per_position(gamma_s - gamma_t) / RK4_STEPS
    gamma = gamma_t.clone()
    step = (gamma_s - gamma_t) / RK4_STEPS

    def velocity(y, g):
        return (exact_denoiser(y, g) - y) / per_position((1 - g).clamp_min(1e-300))

    for _ in range(RK4_STEPS):
        k1 = velocity(x, gamma)
        k2 = velocity(x + 0.5 * h * k1, gamma + 0.5 * step)
        k3 = velocity(x + 0.5 * h * k2, gamma + 0.5 * step)
        k4 = velocity(x + h * k3, gamma + step)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        gamma = gamma + step
    return x


class OracleDenoiser(nn.Module):
    """Logits of the exact two-time denoiser δ_{t,s} (one-time: the exact D_t)."""

    def __init__(self, reparam, perturbation=0.0):
        super().__init__()
        self.reparam = reparam
        self.perturbation = perturbation
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, t, s=None):
        gamma_t = self.reparam(t)
        if s is None:
            probs = exact_denoiser(x, gamma_t)
        else:
            gamma_s = self.reparam(s)
            gap = per_position(gamma_s - gamma_t)
            safe_gap = torch.where(gap > 0, gap, 1.0)
            x_s = exact_map(x, gamma_t, gamma_s)
            jump = x + per_position(1 - gamma_t) / safe_gap * (x_s - x)
            probs = torch.where(gap > 0, jump, exact_denoiser(x, gamma_t))
        logits = torch.log(probs.clamp_min(1e-300))
        return self.scale * logits + self.perturbation * torch.sin(3 * x)


@pytest.fixture(params=["identity", "token-accuracy"])
def interpolant(request):
    clock = fl.Identity() if request.param == "identity" else fl.TokenAccuracy(2)
    return fl.LinearInterpolant(reparam=clock)


@pytest.fixture(params=["per_example", "per_token"])
def time_shape(request):
    """Every oracle holds with one time per example and with one time per token."""
    return request.param


def oracle_batch(interpolant, batch=6, length=3, seed=0, time_shape="per_example"):
    # Positions are independent in the oracle's data, so its denoiser and flow map are exact
    # per position: with per-token times each position follows its own clock.
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2, (batch, length), generator=g)
    shape = (batch,) if time_shape == "per_example" else (batch, length)
    t = torch.rand(shape, generator=g, dtype=torch.float64) * 0.5
    s = t + torch.rand(shape, generator=g, dtype=torch.float64) * (0.85 - t)
    x1 = fl.one_hot(tokens, 2, dtype=torch.float64)
    x_t = interpolant.sample(torch.randn(x1.shape, generator=g, dtype=torch.float64), x1, t)
    return tokens, x_t, t, s


@pytest.mark.parametrize("time_shape", ["per_example", "per_token"])
def test_semigroup_weight_composes_two_time_denoiser_maps(time_shape):
    g = torch.Generator().manual_seed(0)
    interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(16))
    t = torch.tensor([0.1, 0.3, 0.0], dtype=torch.float64)
    u = torch.tensor([0.4, 0.5, 0.5], dtype=torch.float64)
    s = torch.tensor([0.9, 0.7, 1.0], dtype=torch.float64)
    if time_shape == "per_token":  # each position its own jump, one of them known (t = s = 1)
        spread = torch.tensor([0.0, 0.05, 0.1, 0.0], dtype=torch.float64)
        t, u, s = (v[:, None] + spread for v in (t, u, s))
        s = s.clamp(max=1.0)
        t, u, s = (torch.where(spread == 0.05, 1.0, v) for v in (t, u, s))
    x = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    first = torch.softmax(torch.randn(3, 4, 16, generator=g, dtype=torch.float64), -1)
    second = torch.softmax(torch.randn(3, 4, 16, generator=g, dtype=torch.float64), -1)
    x_u = interp.step(x, first, t, u)
    composed = interp.step(x_u, second, u, s)
    w = per_position(distill.semigroup_weight(interp.reparam, t, u, s))
    direct = interp.step(x, w * first + (1 - w) * second, t, s)
    torch.testing.assert_close(composed, direct, rtol=1e-9, atol=1e-9)
    assert bool(((w >= 0) & (w <= 1)).all())


def test_oracle_is_a_flow_map(interpolant, time_shape):
    oracle = fl.XPredMap(fl.XPredictor(OracleDenoiser(interpolant.reparam)), interpolant, True)
    _, x_t, t, s = oracle_batch(interpolant, time_shape=time_shape)
    u = 0.5 * (t + s)
    # RK4 round-off of the oracle itself: 18 independent per-token jumps reach a larger max
    tolerance = 1e-7 if time_shape == "per_example" else 1e-6
    torch.testing.assert_close(
        oracle(oracle(x_t, t, u), u, s), oracle(x_t, t, s), atol=tolerance, rtol=tolerance
    )


LOSSES = {
    "semigroup": distill.semigroup_kl_loss,
    "lagrangian": distill.lagrangian_kl_loss,
    "eulerian": distill.eulerian_kl_loss,
}


def unclamped_positions(name, exact, teacher, x_t, t, s):
    """Positions where the logit-space targets' log argument stays above its 0.05 floor.

    There the logit form is exact: its log argument equals D / δ̂ (up to normalization).
    """
    if name == "semigroup":
        return torch.ones(x_t.shape[:2], dtype=torch.bool)
    jump = exact.predictor(x_t, t, s)
    if name == "lagrangian":
        ratio = teacher(exact(x_t, t, s), s) / jump
    else:
        ratio = teacher(x_t, t) / jump
    return ratio.amin(-1) > 0.06


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_kl_losses_vanish_on_the_exact_flow_map(interpolant, name, time_shape):
    teacher = fl.XPredictor(OracleDenoiser(interpolant.reparam))
    exact = fl.XPredMap(fl.XPredictor(OracleDenoiser(interpolant.reparam)), interpolant, True)
    wrong = fl.XPredMap(
        fl.XPredictor(OracleDenoiser(interpolant.reparam, perturbation=0.3)), interpolant, True
    )
    _, x_t, t, s = oracle_batch(interpolant, batch=16, time_shape=time_shape)
    exact_loss = LOSSES[name](exact, teacher, x_t, t, s)
    wrong_loss = LOSSES[name](wrong, teacher, x_t, t, s)
    assert exact_loss.shape == (16, 3)
    assert t.shape == ((16,) if time_shape == "per_example" else (16, 3))
    with torch.no_grad():
        unclamped = unclamped_positions(name, exact, teacher, x_t, t, s)
    assert unclamped.float().mean() > 0.5
    assert exact_loss[unclamped].abs().max() < 1e-7
    assert wrong_loss.mean() > 1e-3


def test_self_semigroup_loss_is_cross_entropy_on_the_diagonal_for_the_exact_map(
    interpolant, time_shape
):
    exact = fl.XPredMap(fl.XPredictor(OracleDenoiser(interpolant.reparam)), interpolant, True)
    tokens, x_t, t, s = oracle_batch(interpolant, time_shape=time_shape)
    loss = distill.self_semigroup_loss(exact, tokens, x_t, t, s)
    diagonal = fl.cross_entropy(exact.predictor.logits(x_t, t, t), tokens)
    torch.testing.assert_close(loss, diagonal, atol=1e-7, rtol=0)


def test_map_regression_vanishes_on_the_exact_map_and_not_elsewhere(interpolant, time_shape):
    exact = fl.XPredMap(fl.XPredictor(OracleDenoiser(interpolant.reparam)), interpolant, True)
    wrong = fl.XPredMap(
        fl.XPredictor(OracleDenoiser(interpolant.reparam, perturbation=0.3)), interpolant, True
    )
    _, x_t, t, s = oracle_batch(interpolant, time_shape=time_shape)
    assert distill.map_regression_loss(exact, exact, x_t, t, s).abs().max() == 0
    assert distill.map_regression_loss(wrong, exact, x_t, t, s).mean() > 1e-4


def test_map_regression_kl_vanishes_on_the_exact_map_and_not_elsewhere(interpolant, time_shape):
    exact = fl.XPredMap(fl.XPredictor(OracleDenoiser(interpolant.reparam)), interpolant, True)
    wrong = fl.XPredMap(
        fl.XPredictor(OracleDenoiser(interpolant.reparam, perturbation=0.3)), interpolant, True
    )
    _, x_t, t, s = oracle_batch(interpolant, time_shape=time_shape)
    assert distill.map_regression_kl_loss(exact, exact, x_t, t, s).abs().max() < 1e-9
    assert distill.map_regression_kl_loss(wrong, exact, x_t, t, s).mean() > 1e-3


def test_map_regression_kl_onto_one_euler_step_is_the_diagonal_kl(interpolant, time_shape):
    # A one-step teacher's jump implies its own denoiser D_t(x_t), whatever the jump's length.
    teacher = fl.XPredictor(OracleDenoiser(interpolant.reparam))
    student = fl.XPredMap(
        fl.XPredictor(OracleDenoiser(interpolant.reparam, perturbation=0.3)), interpolant, True
    )
    _, x_t, t, s = oracle_batch(interpolant, time_shape=time_shape)
    loss = distill.map_regression_kl_loss(student, fl.XPredMap(teacher, interpolant), x_t, t, s)
    expected = distill.kl_divergence(teacher(x_t, t), student.predictor.logits(x_t, t, s))
    torch.testing.assert_close(loss, expected, atol=1e-9, rtol=1e-9)


class PointDataField(nn.Module):
    """Exact velocity of a one-point data distribution e_0: v = (e_0 − x)/(1 − γ)."""

    def __init__(self, reparam):
        super().__init__()
        self.reparam = reparam

    def forward(self, x, t):
        target = torch.zeros_like(x)
        target[..., 0] = 1
        return (target - x) / per_position((1 - self.reparam(t)).clamp_min(1e-5))


def test_taylor_semigroup_loss_vanishes_for_a_linear_flow_and_not_for_a_wrong_correction(
    interpolant, time_shape
):
    # For one-point data the exact path is linear in γ, so the exact Taylor correction is g = 0.
    field = PointDataField(interpolant.reparam)
    _, x_t, t, s = oracle_batch(interpolant, time_shape=time_shape)
    exact = fl.TaylorMap(field, lambda x, t, s: torch.zeros_like(x))
    wrong = fl.TaylorMap(field, lambda x, t, s: torch.ones_like(x))
    assert distill.taylor_semigroup_loss(exact, x_t, t, s).abs().max() < 1e-9
    assert distill.taylor_semigroup_loss(wrong, x_t, t, s).mean() > 1e-3


def small_dit(two_time):
    torch.manual_seed(0)
    return DiT(5, dim=16, depth=1, heads=2, two_time=two_time, dropout=0.0)


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_fresh_students_start_as_the_teacher_euler_step():
    teacher_net = perturbed(small_dit(False))
    interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(5))
    teacher = fl.XPredictor(teacher_net)
    x = torch.randn(3, 4, 5)
    t, s = torch.tensor([0.0, 0.2, 0.5]), torch.tensor([0.3, 0.9, 1.0])
    euler = fl.XPredMap(teacher, interp)(x, t, s)

    two_time = small_dit(True)
    missing = distill.init_student(two_time, teacher_net)
    assert missing and all(name.startswith("target_time_embedding") for name in missing)
    student = fl.XPredMap(fl.XPredictor(two_time), interp, two_time=True)
    assert torch.equal(student(x, t, s), euler)

    correction = small_dit(True)
    distill.init_student(correction, teacher_net, zero=["output"])
    taylor = fl.TaylorMap(fl.XPredVelocity(teacher, interp), correction)
    torch.testing.assert_close(
        taylor(x, t.clamp(max=0.5), s.clamp(max=0.9)),
        fl.Euler(fl.XPredVelocity(teacher, interp))(x, t.clamp(max=0.5), s.clamp(max=0.9)),
    )


def test_init_student_rejects_foreign_weights():
    with pytest.raises(ValueError, match="no place in the student"):
        distill.init_student(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))


def test_teacher_parameters_receive_no_gradient():
    interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(5))
    teacher_net = perturbed(small_dit(False))
    student_net = small_dit(True)
    distill.init_student(student_net, teacher_net)
    perturbed(student_net)
    teacher = fl.XPredictor(teacher_net)
    student = fl.XPredMap(fl.XPredictor(student_net), interp, two_time=True)
    tokens = torch.randint(0, 5, (3, 4))
    pair = fl.time_pairs(3, boundary_prob=0.0, generator=torch.Generator().manual_seed(0))
    x_t = interp.sample(torch.randn(3, 4, 5), fl.one_hot(tokens, 5), pair.t)
    correction = perturbed(small_dit(True))
    taylor = fl.TaylorMap(fl.XPredVelocity(teacher, interp), correction)
    losses = [
        (distill.semigroup_kl_loss(student, teacher, x_t, pair.t, pair.s), student_net),
        (distill.lagrangian_kl_loss(student, teacher, x_t, pair.t, pair.s), student_net),
        (distill.eulerian_kl_loss(student, teacher, x_t, pair.t, pair.s), student_net),
        (distill.self_semigroup_loss(student, tokens, x_t, pair.t, pair.s), student_net),
        (distill.map_regression_loss(student, taylor, x_t, pair.t, pair.s), student_net),
        (distill.map_regression_kl_loss(student, taylor, x_t, pair.t, pair.s), student_net),
        (distill.taylor_semigroup_loss(taylor, x_t, pair.t, pair.s), correction),
    ]
    for loss, trained in losses:
        assert loss.shape == (3, 4)
        for model in (teacher_net, student_net, correction):
            model.zero_grad(set_to_none=True)
        fl.masked_mean(loss, torch.ones(3, 4, dtype=torch.bool)).backward()
        assert all(p.grad is None for p in teacher_net.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())


def test_kl_divergence_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 4, generator=g, dtype=torch.float64), -1)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    q = torch.softmax(logits, -1)
    torch.testing.assert_close(distill.kl_divergence(p, logits), (p * (p / q).log()).sum(-1))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_kl_losses_are_finite_on_the_whole_path_jump(name):
    interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(5))
    teacher_net = perturbed(small_dit(False))
    student_net = small_dit(True)
    distill.init_student(student_net, teacher_net)
    student = fl.XPredMap(fl.XPredictor(perturbed(student_net)), interp, two_time=True)
    x_t = torch.randn(2, 4, 5)
    t, s = torch.zeros(2), torch.ones(2)
    loss = LOSSES[name](student, fl.XPredictor(teacher_net), x_t, t, s)
    assert bool(torch.isfinite(loss).all())


# ---------------------------------------------------------------- jumps and per-token times


ALL_JUMP_LOSSES = [
    "semigroup",
    "lagrangian",
    "eulerian",
    "self",
    "regression",
    "regression_kl",
    "taylor",
]


def jump_loss(name, interpolant, x_t, t, s, tokens):
    exact = fl.XPredMap(fl.XPredictor(OracleDenoiser(interpolant.reparam)), interpolant, True)
    teacher = fl.XPredictor(OracleDenoiser(interpolant.reparam))
    if name in LOSSES:
        return LOSSES[name](exact, teacher, x_t, t, s)
    if name == "self":
        return distill.self_semigroup_loss(exact, tokens, x_t, t, s)
    if name == "regression":
        return distill.map_regression_loss(exact, fl.XPredMap(teacher, interpolant), x_t, t, s)
    if name == "regression_kl":
        return distill.map_regression_kl_loss(exact, fl.XPredMap(teacher, interpolant), x_t, t, s)
    taylor = fl.TaylorMap(PointDataField(interpolant.reparam), lambda x, t, s: 0.1 * x)
    return distill.taylor_semigroup_loss(taylor, x_t, t, s)


@pytest.mark.parametrize("name", ALL_JUMP_LOSSES)
@pytest.mark.parametrize("order", ["backward", "equal"])
def test_jump_losses_refuse_jumps_that_do_not_go_forward(interpolant, name, order):
    tokens, x_t, t, s = oracle_batch(interpolant)
    bad = t.clone()
    bad[2] = (s[2] + 0.1).clamp(max=1.0) if order == "backward" else s[2]
    with pytest.raises(RuntimeError, match="jump losses need s > t"):
        jump_loss(
            name, interpolant, x_t, bad.clamp(min=0.0) if order == "backward" else bad, s, tokens
        )


@pytest.mark.parametrize("name", ALL_JUMP_LOSSES)
def test_per_token_times_equal_to_per_example_give_the_same_loss(interpolant, name):
    tokens, x_t, t, s = oracle_batch(interpolant)
    per_example = jump_loss(name, interpolant, x_t, t, s, tokens)
    rows = (t[:, None].expand(x_t.shape[:2]), s[:, None].expand(x_t.shape[:2]))
    assert torch.equal(jump_loss(name, interpolant, x_t, *rows, tokens), per_example)


@pytest.mark.parametrize("name", ALL_JUMP_LOSSES)
def test_known_positions_at_time_one_give_finite_losses(interpolant, name):
    # A prompt: known positions are clean data with t = s = 1; the other positions' losses
    # are the ones they have without the prompt (the oracle's positions are independent).
    tokens, x_t, t, s = oracle_batch(interpolant, time_shape="per_token")
    known = torch.zeros_like(t, dtype=torch.bool)
    known[:, 0] = True
    x1 = fl.one_hot(tokens, 2, dtype=torch.float64)
    x_known = torch.where(known[..., None], x1, x_t)
    t_known, s_known = torch.where(known, 1.0, t), torch.where(known, 1.0, s)
    loss = jump_loss(name, interpolant, x_known, t_known, s_known, tokens)
    assert torch.isfinite(loss).all()
    free = jump_loss(name, interpolant, x_t, t, s, tokens)
    torch.testing.assert_close(loss[~known], free[~known], atol=1e-9, rtol=1e-9)
