"""Time reparameterizations: the decoding-accuracy clock against independent oracles."""

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError
from scipy import integrate
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr, ndtri
from torch import Tensor

from flowlm import (
    Composed,
    CosineInterpolant,
    Identity,
    Interpolant,
    LinearInterpolant,
    Power,
    SqrtNoiseInterpolant,
    TimeReparam,
    TokenAccuracy,
    decoding_accuracy,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCABS = [2, 8, 64, 1024, 30522, 200_000]
F64 = torch.float64

# Past gamma ~ 0.92 (V = 2) to 0.93 (V = 2e5), 1 - tau(gamma) drops below 1e-16: tau rounds to
# 1 in float64, the table keeps only the endpoint gamma = 1 there, and tau^{-1} cannot recover
# gamma from t (many gammas share t = 1). Checks that go gamma -> t -> gamma stop below that.
GAMMA_BELOW_SATURATION = 0.9

SETTINGS = settings(max_examples=40, deadline=None)
unit_floats = st.lists(
    st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False), min_size=1, max_size=16
)


@pytest.fixture(scope="module", params=VOCABS, ids=lambda v: f"V={v}")
def kappa(request: pytest.FixtureRequest) -> TokenAccuracy:
    return TokenAccuracy(request.param)


# ---------------------------------------------------------------- independent oracles (numpy)

_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(100)
_Z = np.sqrt(2.0) * _NODES
_W = _WEIGHTS / np.sqrt(np.pi)


def tau_gauss_hermite(gamma: float, vocab: int) -> float:
    """The decoding-accuracy clock (paper §2; docs concepts page) written independently in numpy/scipy (100-node Gauss-Hermite)."""
    if gamma <= 0.0:
        return 0.0
    if gamma >= 1.0:
        return 1.0
    m = gamma / (1.0 - gamma)
    q = float(np.sum(_W * np.exp((vocab - 1) * log_ndtr(_Z + m))))
    return (vocab * q - 1.0) / (vocab - 1.0)


def tau_adaptive(gamma: float, vocab: int) -> float:
    """The same integral by adaptive quadrature (no Gauss-Hermite rule at all)."""
    m = gamma / (1.0 - gamma)

    def integrand(z: float) -> float:
        return float(np.exp((vocab - 1) * log_ndtr(z + m) - 0.5 * z * z) / np.sqrt(2.0 * np.pi))

    front = np.sqrt(2.0 * np.log(vocab)) - m  # where Phi(z + m)^(V-1) jumps from 0 to 1
    q = integrate.quad(integrand, -12.0, 12.0, points=[-m, front], limit=500, epsabs=1e-14)[0]
    return (vocab * q - 1.0) / (vocab - 1.0)


def invert(tau: Callable[[float, int], float], t: float, vocab: int) -> float:
    return brentq(lambda g: tau(g, vocab) - t, 1e-9, 1.0 - 1e-9, xtol=1e-14, rtol=1e-14)


def f64(values: object) -> Tensor:
    return torch.as_tensor(values, dtype=F64)


# ---------------------------------------------------------------- TokenAccuracy: basic contract


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_endpoints_exact(kappa: TokenAccuracy, dtype: torch.dtype):
    ends = torch.tensor([0.0, 1.0], dtype=dtype)
    assert torch.equal(kappa(ends), ends)
    assert torch.equal(kappa.inverse(ends), ends)


def test_strictly_monotone_forward_and_inverse(kappa: TokenAccuracy):
    t = torch.linspace(0.0, 1.0, 20_001, dtype=F64)
    assert (kappa(t).diff() > 0).all()
    gamma = torch.linspace(0.0, GAMMA_BELOW_SATURATION, 20_001, dtype=F64)
    assert (kappa.inverse(gamma).diff() > 0).all()
    # In the saturated end tau is only non-decreasing (it is 1 to float64 precision).
    tail = torch.linspace(GAMMA_BELOW_SATURATION, 1.0, 2_001, dtype=F64)
    assert (kappa.inverse(tail).diff() >= 0).all()
    assert kappa.inverse(tail)[-2] > 1.0 - 1e-9


@SETTINGS
@given(values=unit_floats)
def test_round_trip_t_gamma_t(kappa: TokenAccuracy, values: list[float]):
    t = f64(values)
    assert (kappa.inverse(kappa(t)) - t).abs().max() <= 1e-6


@SETTINGS
@given(values=st.lists(st.floats(0.0, GAMMA_BELOW_SATURATION), min_size=1, max_size=16))
def test_round_trip_gamma_t_gamma(kappa: TokenAccuracy, values: list[float]):
    gamma = f64(values)
    assert (kappa(kappa.inverse(gamma)) - gamma).abs().max() <= 1e-6


def test_round_trip_dense_grids(kappa: TokenAccuracy):
    t = torch.linspace(0.0, 1.0, 5_001, dtype=F64)
    assert (kappa.inverse(kappa(t)) - t).abs().max() <= 1e-6
    gamma = torch.linspace(0.0, GAMMA_BELOW_SATURATION, 5_001, dtype=F64)
    assert (kappa(kappa.inverse(gamma)) - gamma).abs().max() <= 1e-6
    # float32 times are looked up in float32: a grid position up to 2^14 keeps 2^-10 of a knot,
    # about 4e-7 in gamma, which tau' <= 13 turns into about 1e-6 in t.
    t32 = t.float()
    assert (kappa.inverse(kappa(t32)) - t32).abs().max() <= 2e-6


REFERENCE = {
    30522: [0.4831, 0.6312, 0.7359, 0.7735, 0.8045, 0.8281, 0.8450, 0.8676],
    50258: [0.5119, 0.6465, 0.7438, 0.7792, 0.8087, 0.8314, 0.8477, 0.8695],
}
REFERENCE_TIMES = [0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]


@pytest.mark.parametrize("vocab", sorted(REFERENCE))
def test_reference_table(vocab: int):
    got = TokenAccuracy(vocab)(f64(REFERENCE_TIMES))
    assert torch.allclose(got, f64(REFERENCE[vocab]), rtol=0.0, atol=1e-3)


@pytest.mark.parametrize(
    ("vocab", "expected"), [(8, 0.604), (28, 0.671), (64, 0.702), (256, 0.739), (1024, 0.764)]
)
def test_reference_half_time_small_vocabularies(vocab: int, expected: float):
    assert abs(TokenAccuracy(vocab)(f64([0.5])).item() - expected) <= 1e-3


def test_two_token_closed_form():
    # V = 2: argmax is right iff eps_0 + m > eps_1, so q = Phi(m / sqrt 2), tau = 2q - 1, and
    # kappa(t) = m / (1 + m) with m = sqrt(2) Phi^{-1}((1 + t) / 2).
    gamma = np.linspace(0.0, 0.9, 91)
    m = gamma / (1.0 - gamma)
    tau = decoding_accuracy(f64(gamma), 2)
    assert np.allclose(tau.numpy(), 2.0 * ndtr(m / np.sqrt(2.0)) - 1.0, rtol=0.0, atol=1e-12)
    t = np.linspace(0.0, 0.999, 200)
    m_t = np.sqrt(2.0) * ndtri((1.0 + t) / 2.0)
    got = TokenAccuracy(2)(f64(t)).numpy()
    assert np.abs(got - m_t / (1.0 + m_t)).max() <= 1e-6


EXACT_TIMES = [0.001, 0.002, 0.005, *np.linspace(0.01, 0.99, 50).tolist()]


def test_matches_independent_gauss_hermite_inverse(kappa: TokenAccuracy):
    vocab = kappa.vocab_size
    exact = np.array([invert(tau_gauss_hermite, t, vocab) for t in EXACT_TIMES])
    got = kappa(f64(EXACT_TIMES)).numpy()
    assert np.abs(got - exact).max() <= 1e-5


def test_matches_adaptive_quadrature(kappa: TokenAccuracy):
    # The 100-node Gauss-Hermite rule of the reference implementation is itself off by up to ~1e-4
    # in tau at V >= 3e4 (Phi(z + m)^(V-1) has a sharp front near z = sqrt(2 log V)); kappa is
    # then within ~1e-4 of the true integral, well inside the reference table's 1e-3.
    vocab = kappa.vocab_size
    times = np.linspace(0.01, 0.99, 15)
    exact = np.array([invert(tau_adaptive, t, vocab) for t in times])
    got = kappa(f64(times)).numpy()
    assert np.abs(got - exact).max() <= 2e-4


def chance_corrected_accuracies(
    path: type[Interpolant], gammas: list[float], vocab: int, n: int, seed: int
) -> list[tuple[float, float]]:
    """Monte Carlo (V·acc − 1)/(V − 1) of argmax(σ(γ)ε + α(γ)e_0), with its standard error.

    The same noise is reused for every γ (each estimate is still an honest one). The draws are
    float32: the standard error (~1e-3) dwarfs float32 rounding, and it halves the run time.
    """
    generator = torch.Generator().manual_seed(seed)
    g = f64(gammas)
    sigma, alpha = path.sigma(g).float(), path.alpha(g).float()
    hits = torch.zeros(len(gammas), dtype=torch.long)
    chunk = 50_000
    for _ in range(n // chunk):
        eps = torch.randn(chunk, vocab, generator=generator)
        for i in range(len(gammas)):
            x = sigma[i] * eps
            x[:, 0] += alpha[i]
            hits[i] += (x.argmax(-1) == 0).sum()
    out = []
    for acc in (hits.double() / n).tolist():
        stderr = vocab / (vocab - 1) * np.sqrt(acc * (1 - acc) / n)
        out.append(((vocab * acc - 1) / (vocab - 1), stderr))
    return out


@pytest.mark.parametrize("vocab", [8, 64])
def test_monte_carlo_argmax_accuracy_linear_path(vocab: int):
    kappa = TokenAccuracy(vocab)
    gammas = [0.3, 0.5, 0.6, 0.7, 0.8]
    estimates = chance_corrected_accuracies(LinearInterpolant, gammas, vocab, 200_000, vocab)
    predicted = kappa.inverse(f64(gammas)).tolist()
    for gamma, (estimate, stderr), tau in zip(gammas, estimates, predicted, strict=True):
        assert abs(estimate - tau) <= 4 * stderr + 1e-12, (gamma, estimate, tau)


@pytest.mark.parametrize("path", [CosineInterpolant, SqrtNoiseInterpolant])
def test_path_specific_clocks(path: type[Interpolant]):
    vocab = 16
    kappa = TokenAccuracy(vocab, snr=path.signal_to_noise)
    ends = f64([0.0, 1.0])
    assert torch.equal(kappa(ends), ends)
    t = torch.linspace(0.0, 1.0, 10_001, dtype=F64)
    assert (kappa(t).diff() > 0).all()
    assert (kappa.inverse(kappa(t)) - t).abs().max() <= 1e-6
    # The clock differs from the linear path's: it is really built from this path's snr.
    assert (kappa(f64([0.5])) - TokenAccuracy(vocab)(f64([0.5]))).abs().item() > 1e-2
    gammas = [0.2, 0.4, 0.6, 0.8]
    estimates = chance_corrected_accuracies(path, gammas, vocab, 200_000, 1)
    predicted = kappa.inverse(f64(gammas)).tolist()
    for gamma, (estimate, stderr), tau in zip(gammas, estimates, predicted, strict=True):
        assert abs(estimate - tau) <= 4 * stderr + 1e-12, (gamma, estimate, tau)


# ---------------------------------------------------------------- dtype, device, gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_dtype_device_shape_preserved(kappa: TokenAccuracy, dtype: torch.dtype, shape: tuple):
    t = torch.rand(shape, dtype=dtype)
    for out in (kappa(t), kappa.inverse(t), kappa.derivative(t)):
        assert out.dtype == dtype
        assert out.device == t.device
        assert out.shape == t.shape
    if dtype in (torch.bfloat16, torch.float16):  # looked up in float32, then rounded
        assert torch.equal(kappa(t), kappa(t.float()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_dtype_cast_keeps_a_valid_clock(dtype: torch.dtype):
    # `model.float()` / `model.to(torch.bfloat16)` cast every floating buffer of every submodule,
    # this clock included (e.g. inside an XPredMap). The clock must stay a valid bijection.
    kappa = TokenAccuracy(64).to(dtype)
    reference = TokenAccuracy(64)
    t = torch.linspace(0.0, 1.0, 1001)
    gamma = kappa(t)
    assert torch.isfinite(gamma).all()
    assert gamma[0] == 0.0
    assert gamma[-1] == 1.0
    assert (gamma.diff() >= 0).all()
    assert (gamma - reference(t)).abs().max() <= 1e-3


def test_gradient_matches_finite_differences(kappa: TokenAccuracy):
    # The table is piecewise linear: autograd returns the slope of the segment holding t, a
    # central difference with h = 1e-4 averages the slopes of the few segments it spans. Both
    # approximate the smooth kappa' to O(segment width), so they agree to ~1e-3, not to 1e-8;
    # a much smaller h would only re-measure one segment.
    t = torch.linspace(0.02, 0.98, 49, dtype=F64).requires_grad_()
    (grad,) = torch.autograd.grad(kappa(t).sum(), t)
    h = 1e-4
    with torch.no_grad():
        central = (kappa(t + h) - kappa(t - h)) / (2 * h)
    assert torch.allclose(grad, central, rtol=1e-2, atol=0.0)
    assert torch.allclose(kappa.derivative(t.detach()), grad, rtol=1e-12, atol=0.0)


def test_derivative_is_positive_on_the_closed_interval(kappa: TokenAccuracy):
    # kappa is strictly increasing, so its rate is positive everywhere, ends included (solvers
    # and the Lagrangian loss divide by it).
    t = torch.cat([f64([0.0, 1e-300, 1e-12]), torch.linspace(0, 1, 1001, dtype=F64), f64([1.0])])
    rate = kappa.derivative(t)
    assert bool((rate > 0).all() and torch.isfinite(rate).all())


def test_gradient_in_float32(kappa: TokenAccuracy):
    t = torch.linspace(0.05, 0.95, 19).requires_grad_()
    (grad,) = torch.autograd.grad(kappa(t).sum(), t)
    assert grad.dtype == torch.float32
    assert torch.allclose(grad, kappa.derivative(t.detach()), rtol=1e-5)
    assert (grad > 0).all()


# Float32 times near the ends: 0, the smallest normal, numbers below TIME_EDGE, the largest
# float32 below 1 (kappa ~0.9 there, not 1: float32 cannot get closer to 1) and 1 itself.
FLOAT32_EDGES = [0.0, 1e-38, 1e-20, 1e-9, 0.3, 1.0 - 2.0**-23, 1.0 - 2.0**-24, 1.0]


def test_float32_lookup_agrees_with_float64(kappa: TokenAccuracy):
    # The same float32 numbers, looked up in float32 and in float64 (the grid position keeps
    # 2^-10 of a knot in float32, hence 5e-7, not float32's 6e-8).
    t = torch.cat(
        [torch.rand(4096, generator=torch.Generator().manual_seed(0)), f64(FLOAT32_EDGES).float()]
    )
    assert (kappa(t).double() - kappa(t.double())).abs().max() <= 5e-7
    gamma = t[t <= GAMMA_BELOW_SATURATION]
    assert (kappa.inverse(gamma).double() - kappa.inverse(gamma.double())).abs().max() <= 2e-6
    below_one = f64([1.0 - 2.0**-24])
    assert kappa(below_one.float()).item() < 0.95 < 1.0 == kappa(f64([1.0]).float()).item()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_nan_times_give_nan(dtype: torch.dtype):
    kappa = TokenAccuracy(64)
    t = torch.tensor([0.5, float("nan")], dtype=dtype)
    for out in (kappa(t), kappa.inverse(t), kappa.derivative(t)):
        assert torch.isfinite(out[0]) and torch.isnan(out[1])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gradient_is_finite_and_values_unchanged_at_the_ends(kappa: TokenAccuracy, dtype):
    # A time that needs a gradient takes another path through logit(t) (torch.logit's own
    # gradient at t = 1 is 0/0 in float32); it must return the very same values.
    t = torch.tensor(FLOAT32_EDGES, dtype=dtype).requires_grad_()
    gamma = kappa(t)
    (grad,) = torch.autograd.grad(gamma.sum(), t)
    assert torch.equal(gamma.detach(), kappa(t.detach()))
    assert torch.isfinite(grad).all()
    assert grad[0] == grad[-1] == 0.0  # the table is flat beyond its end knots


# ---------------------------------------------------------------- Identity, Power, composition


def autograd_derivative(reparam: TimeReparam, t: Tensor) -> Tensor:
    t = t.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reparam(t).sum(), t)
    return grad


@SETTINGS
@given(values=unit_floats)
def test_identity(values: list[float]):
    t = f64(values)
    identity = Identity()
    assert torch.equal(identity(t), t)
    assert torch.equal(identity.inverse(t), t)
    assert torch.equal(identity.derivative(t), torch.ones_like(t))
    assert torch.equal(autograd_derivative(identity, t), torch.ones_like(t))


@SETTINGS
@given(values=unit_floats, exponent=st.sampled_from([0.5, 2.0, 3.7]))
def test_power(values: list[float], exponent: float):
    t = f64(values)
    power = Power(exponent)
    assert torch.allclose(power(t), t**exponent, rtol=1e-15, atol=0.0)
    assert torch.allclose(power.inverse(power(t)), t, rtol=1e-12, atol=1e-12)
    assert torch.allclose(power(power.inverse(t)), t, rtol=1e-12, atol=1e-12)
    interior = t.clamp(1e-3, 1.0)
    assert torch.allclose(
        power.derivative(interior), autograd_derivative(power, interior), rtol=1e-12
    )
    assert torch.allclose(power.derivative(interior), exponent * interior ** (exponent - 1))


@pytest.mark.parametrize("exponent", [0.0, -1.0, float("nan")])
def test_power_rejects_non_positive_exponent(exponent: float):
    with pytest.raises(ValueError, match="positive exponent"):
        Power(exponent)


@pytest.fixture(scope="module")
def token64() -> TokenAccuracy:
    return TokenAccuracy(64)


@pytest.mark.parametrize("order", ["power_then_token", "token_then_power"])
def test_composition(token64: TokenAccuracy, order: str):
    power = Power(2.0)
    first, then = (power, token64) if order == "power_then_token" else (token64, power)
    composed = first >> then
    assert isinstance(composed, Composed)
    t = torch.linspace(0.0, 1.0, 1001, dtype=F64)
    assert torch.equal(composed(t), then(first(t)))
    # TokenAccuracy >> Power(2) saturates at 0.92^2 ~ 0.85, not 0.92: stay below 0.8.
    gamma = torch.linspace(0.0, 0.8, 1001, dtype=F64)
    assert torch.equal(composed.inverse(gamma), first.inverse(then.inverse(gamma)))
    assert (composed(composed.inverse(gamma)) - gamma).abs().max() <= 1e-6
    assert (composed.inverse(composed(t)) - t).abs().max() <= 1e-6
    assert torch.equal(composed(f64([0.0, 1.0])), f64([0.0, 1.0]))
    interior = torch.linspace(0.05, 0.95, 19, dtype=F64)
    chain = then.derivative(first(interior)) * first.derivative(interior)
    assert torch.allclose(composed.derivative(interior), chain, rtol=1e-14, atol=0.0)
    assert torch.allclose(
        composed.derivative(interior), autograd_derivative(composed, interior), rtol=1e-12
    )


def test_composition_is_associative(token64: TokenAccuracy):
    a, b = Power(2.0), Power(0.5)
    t = torch.rand(100, dtype=F64)
    left, right = (a >> token64) >> b, a >> (token64 >> b)
    assert torch.allclose(left(t), right(t), rtol=1e-15, atol=0.0)
    assert torch.allclose(left.derivative(t), right.derivative(t), rtol=1e-12)


def test_power_composition_closed_form():
    t = torch.rand(100, dtype=F64)
    assert torch.allclose((Power(2.0) >> Power(3.0))(t), t**6, rtol=1e-14)
    assert torch.allclose((Power(2.0) >> Power(0.5))(t), t, rtol=1e-14)


@pytest.mark.parametrize("vocab", [1, 0, -3])
def test_vocab_size_below_two_raises(vocab: int):
    with pytest.raises(ValueError, match="at least 2"):
        TokenAccuracy(vocab)


@pytest.mark.parametrize("size", [2.5, "8", None])
def test_token_accuracy_needs_an_integer_vocabulary(checks: str, size: object):
    expected = TypeCheckError if checks == "jaxtyping" else TypeError
    match = "vocab_size" if checks == "jaxtyping" else "TokenAccuracy needs an integer vocabulary"
    with pytest.raises(expected, match=match):
        TokenAccuracy(size)  # type: ignore[arg-type]


def test_token_accuracy_names_its_vocabulary():
    assert TokenAccuracy(12).vocab_size == 12
    assert (Power(2.0) >> TokenAccuracy(12)).vocab_size == 12
    assert Identity().vocab_size is None
