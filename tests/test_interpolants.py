"""Interpolants: exact endpoints, the velocity is the path's time derivative, exact steps."""

import functools

import pytest
import torch
from jaxtyping import TypeCheckError
from live_tensors import LiveTensorBytes
from torch import Tensor

from flowlm import (
    CosineInterpolant,
    Identity,
    Interpolant,
    LinearInterpolant,
    Power,
    SqrtNoiseInterpolant,
    TimeReparam,
    TokenAccuracy,
    one_hot,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
B, L, V = 4, 5, 8
PATHS = [LinearInterpolant, SqrtNoiseInterpolant, CosineInterpolant]
CLOCKS = ["identity", "power2", "token"]


@functools.cache
def make(path: type[Interpolant], clock: str) -> Interpolant:
    reparams: dict[str, TimeReparam] = {
        "identity": Identity(),
        "power2": Power(2.0),
        # Each path's own decoding-accuracy clock.
        "token": TokenAccuracy(V, snr=path.signal_to_noise),
    }
    return path(reparam=reparams[clock])


@pytest.fixture(
    params=[(p, c) for p in PATHS for c in CLOCKS], ids=lambda pc: f"{pc[0].__name__}-{pc[1]}"
)
def interp(request: pytest.FixtureRequest) -> Interpolant:
    return make(*request.param)


def data(seed: int = 0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, L, V, generator=generator, dtype=dtype)
    x1 = one_hot(torch.randint(V, (B, L), generator=generator), V, dtype=dtype)
    return x0, x1


def prediction(seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, V, generator=generator, dtype=F64).softmax(-1)


def per_example(values: Tensor) -> Tensor:
    return values[:, None, None]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_exact_endpoints(interp: Interpolant, dtype: torch.dtype):
    x0, x1 = data(dtype=dtype)
    assert torch.equal(interp.sample(x0, x1, torch.zeros(B, dtype=dtype)), x0)
    assert torch.equal(interp.sample(x0, x1, torch.ones(B, dtype=dtype)), x1)
    mixed = interp.sample(x0, x1, torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dtype))
    assert torch.equal(mixed[0::2], x0[0::2])
    assert torch.equal(mixed[1::2], x1[1::2])


def test_sample_formula(interp: Interpolant):
    x0, x1 = data()
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)
    gamma = per_example(interp.reparam(t))
    expected = interp.sigma(gamma) * x0 + interp.alpha(gamma) * x1
    assert torch.allclose(interp.sample(x0, x1, t), expected, rtol=0.0, atol=1e-15)


def test_time_derivative_is_reparam_rate_times_velocity(interp: Interpolant):
    x0, x1 = data()
    t = torch.tensor([0.1, 0.35, 0.6, 0.85], dtype=F64)
    x_t, dx_dt = torch.func.jvp(
        lambda time: interp.sample(x0, x1, time), (t,), (torch.ones_like(t),)
    )
    expected = per_example(interp.reparam.derivative(t)) * interp.velocity(x_t, x1, t)
    assert dx_dt.abs().max() > 0.1
    assert torch.allclose(dx_dt, expected, rtol=1e-10, atol=1e-10)


def test_predicted_noise_with_oracle_is_the_noise(interp: Interpolant):
    x0, x1 = data()
    t = torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=F64)
    x_t = interp.sample(x0, x1, t)
    assert torch.allclose(interp.predicted_noise(x_t, x1, t), x0, rtol=0.0, atol=1e-12)


def test_step_to_data_returns_prediction_exactly(interp: Interpolant):
    x_t, _ = data()
    x1_hat = prediction()
    t = torch.tensor([0.0, 0.3, 0.9, 0.999], dtype=F64)
    assert torch.equal(interp.step(x_t, x1_hat, t, torch.ones(B, dtype=F64)), x1_hat)


def test_step_from_one_to_one_keeps_the_state_exactly(interp: Interpolant):
    # A known (clean) position has t = s = 1: the step leaves it as it is, with no 0/0.
    x0, x1 = data()
    x1_hat = prediction()
    t = torch.tensor([[1.0, 0.2, 1.0, 0.5, 1.0]] * B, dtype=F64)
    s = torch.where(t == 1, 1.0, 0.9)
    x_t = interp.sample(x0, x1, t)
    out = interp.step(x_t, x1_hat, t, s)
    known = t == 1
    assert torch.equal(x_t[known], x1[known])
    assert torch.equal(out[known], x1[known])
    for j in (1, 3):  # the other positions move as with their per-example time
        alone = interp.step(x_t, x1_hat, t[:, j], s[:, j])
        assert torch.allclose(out[:, j], alone[:, j], rtol=0, atol=1e-12)
    assert torch.isfinite(interp.velocity(x_t, x1_hat, t)).all()


@pytest.mark.parametrize("method", ["sample", "step", "velocity", "implied_prediction"])
def test_per_token_times_equal_to_per_example_give_the_same_result(
    interp: Interpolant, method: str
):
    x0, x1 = data()
    x1_hat = prediction()
    t = torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=F64)
    s = torch.tensor([0.2, 0.5, 1.0, 0.95], dtype=F64)
    x_t = interp.sample(x0, x1, t)

    def run(start: Tensor, end: Tensor) -> Tensor:
        if method == "sample":
            return interp.sample(x0, x1, start)
        if method == "step":
            return interp.step(x_t, x1_hat, start, end)
        if method == "velocity":
            return interp.velocity(x_t, x1_hat, start)
        return interp.implied_prediction(x_t, interp.step(x_t, x1_hat, t, s), start, end)

    per_token = run(t[:, None].expand(B, L), s[:, None].expand(B, L))
    assert torch.equal(per_token, run(t, s))


def test_oracle_step_lands_on_data(interp: Interpolant):
    x0, x1 = data()
    t = torch.tensor([0.0, 0.3, 0.7, 0.99], dtype=F64)
    x_t = interp.sample(x0, x1, t)
    assert torch.equal(interp.step(x_t, x1, t, torch.ones(B, dtype=F64)), x1)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_oracle_step_follows_the_path(interp: Interpolant, direction: str):
    x0, x1 = data()
    early = torch.tensor([0.0, 0.1, 0.4, 0.5], dtype=F64)
    late = torch.tensor([0.2, 0.8, 0.6, 0.9], dtype=F64)
    t, s = (early, late) if direction == "forward" else (late, early)
    x_s = interp.step(interp.sample(x0, x1, t), x1, t, s)
    assert torch.allclose(x_s, interp.sample(x0, x1, s), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_implied_prediction_inverts_step(interp: Interpolant, direction: str):
    x_t, _ = data()
    x1_hat = prediction()
    early = torch.tensor([0.0, 0.1, 0.4, 0.5], dtype=F64)
    late = torch.tensor([0.2, 0.8, 0.6, 1.0], dtype=F64)
    t, s = (early, late) if direction == "forward" else (late, early)
    x_s = interp.step(x_t, x1_hat, t, s)
    torch.testing.assert_close(interp.implied_prediction(x_t, x_s, t, s), x1_hat)


def test_many_steps_imply_a_convex_combination_of_their_predictions(interp: Interpolant):
    # Four steps from t to s, each with its own prediction: the one-jump prediction that lands
    # on the same point is a convex combination of the four, so it stays on the simplex.
    x_t, _ = data()
    t, s = torch.zeros(B, dtype=F64), torch.tensor([0.3, 0.6, 0.9, 1.0], dtype=F64)
    x = x_t
    for k in range(4):
        start, end = torch.lerp(t, s, k / 4), torch.lerp(t, s, (k + 1) / 4)
        x = interp.step(x, prediction(seed=10 + k), start, end)
    implied = interp.implied_prediction(x_t, x, t, s)
    torch.testing.assert_close(implied.sum(-1), torch.ones(B, L, dtype=F64))
    assert implied.min() >= -1e-12
    torch.testing.assert_close(interp.step(x_t, implied, t, s), x)


@pytest.mark.parametrize("clock", CLOCKS)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_linear_step_is_the_euler_formula(clock: str, direction: str):
    interp = make(LinearInterpolant, clock)
    x, _ = data(seed=3)
    x1_hat = prediction(seed=4)
    early = torch.tensor([0.0, 0.1, 0.4, 0.5], dtype=F64)
    late = torch.tensor([0.2, 0.8, 0.6, 0.95], dtype=F64)
    t, s = (early, late) if direction == "forward" else (late, early)
    gamma_t, gamma_s = per_example(interp.reparam(t)), per_example(interp.reparam(s))
    euler = x + (gamma_s - gamma_t) / (1 - gamma_t) * (x1_hat - x)
    assert torch.allclose(interp.step(x, x1_hat, t, s), euler, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("clock", CLOCKS)
def test_linear_velocity_formula(clock: str):
    interp = make(LinearInterpolant, clock)
    x, _ = data(seed=5)
    x1_hat = prediction(seed=6)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9], dtype=F64)
    gamma = per_example(interp.reparam(t))
    expected = (x1_hat - x) / (1 - gamma)
    assert torch.allclose(interp.velocity(x, x1_hat, t), expected, rtol=1e-12, atol=1e-12)


def test_velocity_finite_at_data_end(interp: Interpolant):
    x, _ = data(seed=7)
    velocity = interp.velocity(x, prediction(), torch.ones(B, dtype=F64))
    assert torch.isfinite(velocity).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_coefficient_endpoints(path: type[Interpolant], dtype: torch.dtype):
    ends = torch.tensor([0.0, 1.0], dtype=dtype)
    assert torch.equal(path.alpha(ends), torch.tensor([0.0, 1.0], dtype=dtype))
    assert torch.equal(path.sigma(ends), torch.tensor([1.0, 0.0], dtype=dtype))


@pytest.mark.parametrize("path", PATHS)
def test_coefficient_rates_match_autograd(path: type[Interpolant]):
    gamma = torch.linspace(0.01, 0.99, 99, dtype=F64).requires_grad_()
    (d_alpha,) = torch.autograd.grad(path.alpha(gamma).sum(), gamma)
    (d_sigma,) = torch.autograd.grad(path.sigma(gamma).sum(), gamma)
    gamma = gamma.detach()
    assert torch.allclose(path.alpha_rate(gamma), d_alpha, rtol=1e-12, atol=1e-14)
    assert torch.allclose(path.sigma_rate(gamma), d_sigma, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", PATHS)
def test_coefficients_monotone_and_snr(path: type[Interpolant]):
    gamma = torch.linspace(0.0, 1.0, 1001, dtype=F64)
    assert (path.alpha(gamma).diff() > 0).all()
    assert (path.sigma(gamma).diff() < 0).all()
    inner = gamma[1:-1]
    assert torch.allclose(path.signal_to_noise(inner), path.alpha(inner) / path.sigma(inner))


def test_cosine_is_variance_preserving():
    gamma = torch.linspace(0.0, 1.0, 101, dtype=F64)
    total = CosineInterpolant.alpha(gamma) ** 2 + CosineInterpolant.sigma(gamma) ** 2
    assert torch.allclose(total, torch.ones_like(total), rtol=0.0, atol=1e-15)


def test_default_clock_is_identity():
    assert isinstance(LinearInterpolant().reparam, Identity)


# ---------------------------------------------------------------- one_hot


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_one_hot_values(dtype: torch.dtype):
    tokens = torch.tensor([[0, 3, 1], [2, 2, 0]])
    x = one_hot(tokens, 4, dtype=dtype)
    assert x.shape == (2, 3, 4)
    assert x.dtype == dtype
    assert torch.equal(x.sum(-1), torch.ones(2, 3, dtype=dtype))
    assert torch.equal(x.argmax(-1), tokens)
    assert torch.equal(one_hot(tokens.int(), 4), one_hot(tokens, 4))


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_one_hot_rejects_out_of_range(bad: int):
    with pytest.raises(RuntimeError, match=r"token ids out of range.*\[0, 4\)"):
        one_hot(torch.tensor([[0, bad]]), 4)


def test_one_hot_rejects_floats(checks: str):
    match = "parameter 'tokens'" if checks == "jaxtyping" else "token ids must be integers"
    with pytest.raises(TypeError, match=match):
        one_hot(torch.tensor([[0.0, 1.0]]), 4)


# ---------------------------------------------------------------- input validation


def test_shape_mismatch(checks: str):
    x0, x1 = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    match = "parameter 'x1'" if checks == "jaxtyping" else r"noise shape \(2, 3, 4\) != data shape"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        LinearInterpolant().sample(x0, x1, torch.rand(2))


def test_zero_dim_time(checks: str):
    x = torch.randn(2, 3, 4)
    match = "parameter 't'" if checks == "jaxtyping" else "tensor of model times, one per example"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        LinearInterpolant().sample(x, x, torch.tensor(0.5))


def test_batch_mismatch(checks: str):
    x = torch.randn(2, 3, 4)
    match = "parameter 't'" if checks == "jaxtyping" else r"t has shape \(3,\) but the state"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        LinearInterpolant().sample(x, x, torch.rand(3))
    match = "parameter 't'" if checks == "jaxtyping" else r"t has shape \(2, 4\) but the state"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        LinearInterpolant().sample(x, x, torch.rand(2, 4))  # per token, but 4 != seq 3
    match = "parameter 't'" if checks == "jaxtyping" else r"times of shape \(3,\) do not fit"
    with pytest.raises((TypeCheckError, ValueError), match=match):  # per-step: a shape check only
        LinearInterpolant().velocity(x, x.softmax(-1), torch.rand(3))


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), float("inf")])
def test_time_outside_unit_interval(checks: str, value: float):
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"outside \[0, 1\] \(or NaN\)"):
        LinearInterpolant().sample(x, x, torch.tensor([0.5, value]))
    with pytest.raises(RuntimeError, match=r"outside \[0, 1\] \(or NaN\)"):
        LinearInterpolant().sample(x, x, torch.tensor([[0.5, value, 0.1], [0.2, 0.3, 0.4]]))


def test_state_must_be_three_dimensional(checks: str):
    x = torch.randn(2, 4)
    match = "parameter 'x0'" if checks == "jaxtyping" else r"shape \(batch, seq, vocab\)"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        LinearInterpolant().sample(x, x, torch.rand(2))


# ---------------------------------------------------------------- bad inputs, memory, dtypes


def test_a_state_of_the_wrong_vocabulary_is_refused_by_a_token_accuracy_path(checks: str):
    path = LinearInterpolant(reparam=TokenAccuracy(8))
    x = torch.randn(2, 3, 11)
    with pytest.raises(ValueError, match="x1 has 11 entries per position, expected 8"):
        path.sample(x, x, torch.rand(2))
    composed = LinearInterpolant(reparam=Power(2.0) >> TokenAccuracy(8))
    assert composed.vocab_size == 8
    assert LinearInterpolant().vocab_size is None


@pytest.mark.parametrize("reparam", ["token", 8, TokenAccuracy])
def test_reparam_must_be_a_time_reparam(checks: str, reparam: object):
    expected = TypeCheckError if checks == "jaxtyping" else TypeError
    with pytest.raises(expected, match="reparam"):
        LinearInterpolant(reparam=reparam)  # type: ignore[arg-type]


def test_sqrt_noise_path_is_its_own_interpolant():
    assert not issubclass(SqrtNoiseInterpolant, LinearInterpolant)
    assert issubclass(SqrtNoiseInterpolant, Interpolant)


def test_sample_allocates_one_state_and_leaves_its_inputs_alone():
    x0, x1 = data(dtype=torch.float32)
    before = (x0.clone(), x1.clone())
    path = LinearInterpolant(reparam=TokenAccuracy(V))
    t = torch.rand(B)
    with LiveTensorBytes() as tracker:
        x_t = path.sample(x0, x1, t)
    assert tracker.big(x0.nbytes // 2) == [(x0.nbytes, torch.float32)]
    assert torch.equal(x0, before[0]) and torch.equal(x1, before[1])
    assert torch.allclose(x_t, path.sample(x0.double(), x1.double(), t.double()).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_hot_scatters_into_its_dtype_without_an_int64_temporary(dtype: torch.dtype):
    tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    unit = 4 * 8 * 64 * torch.finfo(dtype).bits // 8
    with LiveTensorBytes() as tracker:
        x = one_hot(tokens, 64, dtype)
    assert tracker.big(unit // 2) == [(unit, dtype)]
    assert torch.equal(x, torch.eye(64, dtype=dtype)[tokens])


@pytest.mark.parametrize("path", PATHS)
def test_step_allocates_one_state(path: type[Interpolant]):
    x_t, _ = data(dtype=torch.float32)
    x1_hat = prediction().float()
    interp = path(reparam=TokenAccuracy(V))
    with LiveTensorBytes() as tracker:
        interp.step(x_t, x1_hat, torch.full((B,), 0.3), torch.full((B,), 0.6))
    assert tracker.big(x_t.nbytes // 2) == [(x_t.nbytes, torch.float32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_low_precision_states_stay_low_precision(path: type[Interpolant], dtype: torch.dtype):
    x0, x1 = (v.to(dtype) for v in data(dtype=torch.float32))
    interp = path(reparam=TokenAccuracy(V))
    t, s = torch.full((B,), 0.3), torch.full((B,), 0.6)
    x_t = interp.sample(x0, x1, t)
    assert x_t.dtype == dtype
    x1_hat = prediction().float()  # predictions are float32 (softmax in float32)
    assert interp.step(x_t, x1_hat, t, s).dtype == dtype
    assert interp.velocity(x_t, x1_hat, t).dtype == dtype
    reference = interp.step(x_t.double(), x1_hat.double(), t.double(), s.double())
    assert torch.allclose(interp.step(x_t, x1_hat, t, s).double(), reference, atol=0.05)


def noise_generator(seed: int = 2) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-example", "per-token"])
def test_noised_is_sample_of_the_same_draw(
    interp: Interpolant, dtype: torch.dtype, per_token: bool
):
    tokens = torch.randint(V, (B, L), generator=torch.Generator().manual_seed(0))
    t = torch.rand((B, L) if per_token else (B,), generator=torch.Generator().manual_seed(1))
    t[0] = 1.0  # a clean example: exactly one-hot
    x_t = interp.noised(tokens, t, V, generator=noise_generator(), dtype=dtype)
    noise = torch.randn(B, L, V, generator=noise_generator(), dtype=dtype)
    assert x_t.dtype == dtype
    assert torch.equal(x_t, interp.sample(noise, one_hot(tokens, V, dtype), t))
    assert torch.equal(x_t[0], one_hot(tokens, V, dtype)[0])


@pytest.mark.parametrize("path", PATHS)
def test_noised_moments_by_monte_carlo(path: type[Interpolant]):
    rows, vocab = 20_000, 6
    interp = path(reparam=Power(2.0))
    tokens = torch.tensor([[0, 3, 5]]).expand(rows, 3)
    t = torch.tensor([0.2, 0.7]).repeat(rows // 2)  # two times, alternating rows
    x_t = interp.noised(tokens, t, vocab, generator=noise_generator(), dtype=F64)
    for parity in (0, 1):
        gamma = interp.reparam(t[parity : parity + 1].double())
        alpha, sigma = interp.alpha(gamma).item(), interp.sigma(gamma).item()
        sample = x_t[parity::2]
        n = sample.shape[0]
        expected_mean = alpha * one_hot(tokens[:1], vocab, F64)[0]
        mean_error = (sample.mean(0) - expected_mean).abs().max().item()
        assert mean_error < 5 * sigma / n**0.5
        variance_error = (sample.var(0) - sigma**2).abs().max().item()
        assert variance_error < 5 * sigma**2 * (2 / n) ** 0.5
        centred = (sample - expected_mean) / sigma  # entries are independent: no correlation
        correlation = (centred.reshape(n, -1).T @ centred.reshape(n, -1)) / n
        off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
        assert off_diagonal.abs().max().item() < 5 / n**0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32])
def test_noised_allocates_one_state(dtype: torch.dtype, token_dtype: torch.dtype):
    tokens = torch.randint(64, (4, 8), generator=torch.Generator().manual_seed(0)).to(token_dtype)
    unit = 4 * 8 * 64 * torch.finfo(dtype).bits // 8
    path = LinearInterpolant(reparam=TokenAccuracy(64))
    for t in (torch.rand(4), torch.rand(4, 8)):
        with LiveTensorBytes() as tracker:
            path.noised(tokens, t, generator=noise_generator(), dtype=dtype)
        assert tracker.big(unit // 8) == [(unit, dtype)]


def test_noised_without_a_generator_draws_from_the_global_one():
    path = LinearInterpolant()
    tokens, t = torch.tensor([[0, 1]]), torch.tensor([0.5])
    torch.manual_seed(5)
    first = path.noised(tokens, t, 3)
    torch.manual_seed(5)
    assert torch.equal(first, path.noised(tokens, t, 3))
    assert not torch.equal(first, path.noised(tokens, t, 3))


def test_noised_refuses_bad_input():
    tokens, t = torch.tensor([[0, 1, 2]]), torch.tensor([0.5])
    with pytest.raises(ValueError, match="names none, so pass vocab_size"):
        LinearInterpolant().noised(tokens, t)
    token_path = LinearInterpolant(reparam=TokenAccuracy(3))
    with pytest.raises(ValueError, match="vocab_size=4 but this path's clock is built for 3"):
        token_path.noised(tokens, t, 4)
    with pytest.raises(ValueError, match="vocab_size must be a positive"):
        LinearInterpolant().noised(tokens, t, 0)
    with pytest.raises((ValueError, TypeCheckError), match=r"shape \(batch, seq\)|batch"):
        token_path.noised(tokens[0], t)
    with pytest.raises(TypeError, match="floating-point dtype"):
        token_path.noised(tokens, t, dtype=torch.int64)
    with pytest.raises((TypeError, TypeCheckError)):
        token_path.noised(tokens.float(), t)
    with pytest.raises(RuntimeError, match="token ids out of range"):
        token_path.noised(torch.tensor([[0, 3]]), t)
    with pytest.raises((ValueError, TypeCheckError)):
        token_path.noised(tokens, torch.rand(2))
    with pytest.raises(RuntimeError, match="outside"):
        token_path.noised(tokens, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="the generator is on cpu but the tokens are on meta"):
        token_path.noised(tokens.to("meta"), t, generator=torch.Generator())
