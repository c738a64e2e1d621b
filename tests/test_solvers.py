"""Solvers: convergence orders on analytic fields, counted NFE, the FLM sampler by hand."""

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from jaxtyping import TypeCheckError
from live_tensors import LiveTensorBytes
from torch import Tensor, nn

from flowlm import (
    CosineInterpolant,
    Euler,
    FlowMap,
    Heun,
    Identity,
    LinearInterpolant,
    Midpoint,
    Power,
    TaylorMap,
    TimeReparam,
    TokenAccuracy,
    XPredictor,
    XPredMap,
    XPredVelocity,
    count_network_calls,
    decode,
    one_hot,
    record_network_call,
    rollout,
    time_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
B, L, V = 2, 3, 5


# ---------------------------------------------------------------- analytic fields


class Forced(nn.Module):
    """dx/dγ = −x + cos(ωγ): x(γ) = p(γ) + (x(0) − p(0))e^{−γ}, p = (cos ωγ + ω sin ωγ)/(1 + ω²)."""

    omega = 3.0

    def __init__(self, reparam: TimeReparam) -> None:
        super().__init__()
        self.clock = reparam
        self.calls = 0

    @property
    def reparam(self) -> TimeReparam:
        return self.clock

    def gamma(self, t: Tensor) -> Tensor:
        return self.clock(t)[:, None, None]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return -x + torch.cos(self.omega * self.gamma(t))

    def second(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """d²x/dγ² along the solution through (x, γ_t)."""
        w, g = self.omega, self.gamma(t)
        return x - torch.cos(w * g) - w * torch.sin(w * g)

    def exact(self, x0: Tensor, gamma: float) -> Tensor:
        w = self.omega

        def p(g: float) -> float:
            return (np.cos(w * g) + w * np.sin(w * g)) / (1 + w * w)

        return p(gamma) + (x0 - p(0.0)) * np.exp(-gamma)


class Riccati(nn.Module):
    """dx/dγ = x²: x(γ) = x(0)/(1 − x(0)γ) (finite on [0, 1] for x(0) < 1)."""

    def __init__(self, reparam: TimeReparam) -> None:
        super().__init__()
        self.clock = reparam

    @property
    def reparam(self) -> TimeReparam:
        return self.clock

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return x * x

    def second(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return 2 * x**3

    def exact(self, x0: Tensor, gamma: float) -> Tensor:
        return x0 / (1 - x0 * gamma)


FIELDS = {"forced": Forced, "riccati": Riccati}
CLOCKS: dict[str, Callable[[], TimeReparam]] = {"identity": Identity, "power2": lambda: Power(2.0)}
X_START = torch.linspace(-1.0, 0.5, B * L * V, dtype=F64).reshape(B, L, V)
STEPS = [8, 16, 32, 64]


def solve(flow_map: FlowMap, field: nn.Module, x: Tensor, grid: Tensor) -> Tensor:
    """Roll out a step rule on an analytic field, counting the field's calls as NFE."""
    return rollout(flow_map, x, grid, networks=[field]).x


def observed_order(steps: list[int], errors: list[float]) -> float:
    """Slope of log(error) against log(step size)."""
    return float(np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0])


@pytest.mark.parametrize("field_name", sorted(FIELDS))
@pytest.mark.parametrize("clock", sorted(CLOCKS))
@pytest.mark.parametrize(("method", "order"), [(Euler, 1), (Midpoint, 2), (Heun, 2)])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_convergence_order(
    field_name: str, clock: str, method: type[nn.Module], order: int, direction: str
):
    field = FIELDS[field_name](CLOCKS[clock]())
    steps = STEPS
    if method is Heun and direction == "forward":
        # Heun takes an Euler step onto gamma = 1 (the x-prediction velocity is singular there).
        # That last step's O(h^2) error keeps the order at 2 but, at 8-64 steps, partly cancels
        # the trapezoid's own O(h^2) error (observed slopes 1.5-2.4): fit further out.
        steps = [64, 128, 256, 512]
    errors = []
    for n in steps:
        if direction == "forward":
            x = solve(method(field), field, X_START, time_grid(n, dtype=F64))
            errors.append(float((x - field.exact(X_START, 1.0)).abs().max()))
        else:
            x_data = field.exact(X_START, 1.0)
            x = solve(method(field), field, x_data, time_grid(n, reverse=True, dtype=F64))
            errors.append(float((x - X_START).abs().max()))
    assert errors[-1] < errors[0]
    assert abs(observed_order(steps, errors) - order) <= 0.25, errors


@pytest.mark.parametrize("field_name", sorted(FIELDS))
@pytest.mark.parametrize("clock", sorted(CLOCKS))
@pytest.mark.parametrize(
    ("method", "order", "bound"), [(Euler, 1, 0.1), (Midpoint, 2, 1e-3), (Heun, 2, 1e-3)]
)
def test_round_trip_forward_then_backward(
    field_name: str, clock: str, method: type[nn.Module], order: int, bound: float
):
    field = FIELDS[field_name](CLOCKS[clock]())
    errors = []
    for n in STEPS:
        there = solve(method(field), field, X_START, time_grid(n, dtype=F64))
        back = solve(method(field), field, there, time_grid(n, reverse=True, dtype=F64))
        errors.append(float((back - X_START).abs().max()))
    # Back at the start within the method's error: O(h^order) (the midpoint rule even cancels
    # its leading term on the way back).
    assert errors[-1] <= bound
    assert observed_order(STEPS, errors) >= order - 0.25, errors


@pytest.mark.parametrize("field_name", sorted(FIELDS))
@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_taylor_map_with_exact_second_derivative_is_second_order(field_name: str, clock: str):
    field = FIELDS[field_name](CLOCKS[clock]())
    errors = []
    for n in STEPS:
        x = solve(TaylorMap(field, field.second), field, X_START, time_grid(n, dtype=F64))
        errors.append(float((x - field.exact(X_START, 1.0)).abs().max()))
    assert abs(observed_order(STEPS, errors) - 2) <= 0.25, errors


def test_taylor_map_with_zero_correction_equals_euler():
    field = Forced(Power(2.0))
    grid = time_grid(8, dtype=F64)
    taylor = rollout(TaylorMap(field, lambda x, t, s: torch.zeros_like(x)), X_START, grid)
    euler = rollout(Euler(field), X_START, grid, networks=[field])
    assert torch.equal(taylor.x, euler.x)
    assert taylor.nfe == euler.nfe == 8  # the correction's calls, recorded by the Taylor map


@pytest.mark.parametrize("method", [Euler, Midpoint, Heun])
def test_single_steps_by_hand(method: type[nn.Module]):
    field = Forced(Power(2.0))
    x = X_START
    t, s = torch.full((B,), 0.5, dtype=F64), torch.full((B,), 0.75, dtype=F64)
    g_t, g_s = 0.25, 0.5625
    h = g_s - g_t

    def v(y: Tensor, gamma: float) -> Tensor:
        return -y + np.cos(Forced.omega * gamma)

    if method is Euler:
        expected = x + h * v(x, g_t)
    elif method is Midpoint:
        expected = x + h * v(x + h / 2 * v(x, g_t), (g_t + g_s) / 2)
    else:
        expected = x + h / 2 * (v(x, g_t) + v(x + h * v(x, g_t), g_s))
    assert torch.allclose(method(field)(x, t, s), expected, rtol=0.0, atol=1e-14)


# ---------------------------------------------------------------- x-prediction assemblies


class Net(nn.Module):
    """A user backbone that counts its calls and records its time arguments."""

    def __init__(self, vocab: int = V, two_time: bool = False, dtype: torch.dtype = F64) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(vocab, vocab, generator=generator, dtype=dtype))
        self.time_bias = nn.Parameter(torch.randn(vocab, generator=generator, dtype=dtype))
        self.two_time = two_time
        self.calls = 0
        self.times: list[tuple[Tensor, ...]] = []
        self.poison = False

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
        assert (s is not None) == self.two_time
        self.calls += 1
        self.times.append((t.clone(),) if s is None else (t.clone(), s.clone()))
        time = t if s is None else t + 2 * s
        time = time.reshape(*time.shape, *[1] * (3 - time.ndim))  # per example or per token
        logits = 2.0 * x @ self.weight + time * self.time_bias
        return logits * np.nan if self.poison else logits


class Correction(nn.Module):
    """A Taylor-map correction g(x, t, s) that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.1, dtype=F64))
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        self.calls += 1
        gap = s - t
        return self.scale * x * gap.reshape(*gap.shape, *[1] * (3 - gap.ndim))


@functools.cache
def token_clock(vocab: int = V) -> TokenAccuracy:
    return TokenAccuracy(vocab)


def noise(seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def build(kind: str, net: Net, correction: Correction) -> nn.Module:
    predictor = XPredictor(net)
    interp = LinearInterpolant(reparam=token_clock())
    field = XPredVelocity(predictor, interp)
    maps: dict[str, Callable[[], nn.Module]] = {
        "xpred": lambda: XPredMap(predictor, interp),
        "euler": lambda: Euler(field),
        "midpoint": lambda: Midpoint(field),
        "heun": lambda: Heun(field),
        "heun_skip": lambda: Heun(field, skip_at_data=True),
        "taylor": lambda: TaylorMap(field, correction),
    }
    return maps[kind]()


@pytest.mark.parametrize(
    ("kind", "per_step", "saved_on_the_last_step"),
    [
        ("xpred", 1, 0),
        ("euler", 1, 0),
        ("midpoint", 2, 0),
        ("heun", 2, 0),
        ("heun_skip", 2, 1),
        ("taylor", 2, 0),
    ],
)
@pytest.mark.parametrize("n_steps", [1, 3, 8])
@pytest.mark.parametrize("reverse", [False, True])
def test_nfe_counts_real_network_calls(
    kind: str, per_step: int, saved_on_the_last_step: int, n_steps: int, reverse: bool
):
    # Heun(skip_at_data=True) skips its corrector on a step onto the data (gamma = 1), not on
    # one onto the noise; by default it always makes both calls (no host read).
    net, correction = Net(), Correction()
    grid = time_grid(n_steps, reverse=reverse, dtype=F64)
    trajectory = rollout(build(kind, net, correction), noise(), grid)
    assert net.calls + correction.calls == trajectory.nfe
    assert trajectory.nfe == per_step * n_steps - (0 if reverse else saved_on_the_last_step)
    assert torch.isfinite(trajectory.x).all()


def test_heun_onto_the_data_is_the_euler_step_per_example():
    # A batch where only some examples end at gamma = 1: those take the Euler step, the others
    # the trapezoid, each exactly as when stepped alone.
    field = XPredVelocity(XPredictor(Net()), LinearInterpolant(reparam=token_clock()))
    x = noise()
    t = torch.full((B,), 0.5, dtype=F64)
    s = torch.tensor([1.0, 0.75], dtype=F64)
    both = Heun(field)(x, t, s)
    for i in range(B):
        alone = Heun(field)(x[i : i + 1], t[i : i + 1], s[i : i + 1])
        assert torch.allclose(both[i : i + 1], alone, rtol=0.0, atol=1e-12)
    assert torch.equal(Heun(field)(x[:1], t[:1], s[:1]), Euler(field)(x[:1], t[:1], s[:1]))


def test_heun_skip_at_data_changes_the_calls_not_the_result():
    field = XPredVelocity(XPredictor(Net()), LinearInterpolant(reparam=token_clock()))
    grid = time_grid(3, dtype=F64)
    default = rollout(Heun(field), noise(), grid)
    skipping = rollout(Heun(field, skip_at_data=True), noise(), grid)
    assert torch.equal(default.x, skipping.x)
    assert (default.nfe, skipping.nfe) == (6, 5)


def test_nfe_of_a_plain_function_is_counted_by_the_predictor_it_calls():
    net = Net()
    predictor = XPredictor(net)
    interp = LinearInterpolant(reparam=token_clock())

    def flow_map(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return interp.step(x, predictor(x, t), t, s)

    grid = time_grid(4, dtype=F64)
    assert rollout(flow_map, noise(), grid).nfe == 4
    assert net.calls == 4


def test_a_flow_map_that_counts_nothing_is_an_error_unless_networks_are_named():
    net = Net()
    interp = LinearInterpolant(reparam=token_clock())

    def raw(x: Tensor, t: Tensor, s: Tensor) -> Tensor:  # calls the network directly
        return interp.step(x, torch.softmax(net(x, t), -1), t, s)

    grid = time_grid(4, dtype=F64)
    with pytest.raises(RuntimeError, match="counted no network call"):
        rollout(raw, noise(), grid)
    assert rollout(raw, noise(), grid, networks=[net]).nfe == 4
    assert net.calls == 8
    with pytest.raises(RuntimeError, match="counted no network call"):
        rollout(Euler(Forced(Identity())), X_START, grid)  # an analytic field counts nothing


def test_record_network_call_counts_in_a_custom_map():
    net = Net()
    interp = LinearInterpolant(reparam=token_clock())

    def raw(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        record_network_call()
        return interp.step(x, torch.softmax(net(x, t), -1), t, s)

    assert rollout(raw, noise(), time_grid(3, dtype=F64)).nfe == 3
    with count_network_calls() as outer:  # nested counters all see the calls
        assert rollout(raw, noise(), time_grid(2, dtype=F64)).nfe == 2
    assert outer.count == 2


@pytest.mark.parametrize("reverse", [False, True])
def test_save_states(reverse: bool):
    field = Forced(Identity())
    grid = time_grid(10, reverse=reverse, dtype=F64)
    x_init = X_START if not reverse else field.exact(X_START, 1.0)
    trajectory = rollout(Midpoint(field), x_init, grid, save_states=True, networks=[field])
    assert trajectory.states is not None
    assert len(trajectory.states) == len(grid) == 11
    assert torch.equal(trajectory.states[0], x_init)
    assert torch.equal(trajectory.states[-1], trajectory.x)
    assert torch.equal(trajectory.grid, grid)
    for state, t in zip(trajectory.states, grid.tolist(), strict=True):
        assert torch.allclose(state, field.exact(X_START, t), rtol=0.0, atol=1e-2)
    assert rollout(Midpoint(field), x_init, grid, networks=[field]).states is None


def test_grad_true_reaches_backbone_parameters():
    net = Net()
    flow_map = XPredMap(XPredictor(net), LinearInterpolant(reparam=token_clock()))
    trajectory = rollout(flow_map, noise(), time_grid(3, dtype=F64), grad=True)
    weights = torch.randn(B, L, V, generator=torch.Generator().manual_seed(9), dtype=F64)
    (trajectory.x * weights).sum().backward()
    assert net.weight.grad is not None
    assert net.time_bias.grad is not None
    assert net.weight.grad.abs().max() > 0
    assert net.time_bias.grad.abs().max() > 0


def test_grad_false_records_no_graph():
    net = Net()
    flow_map = XPredMap(XPredictor(net), LinearInterpolant(reparam=token_clock()))
    trajectory = rollout(flow_map, noise(), time_grid(3, dtype=F64), save_states=True)
    assert trajectory.states is not None
    for state in (trajectory.x, *trajectory.states[1:]):
        assert not state.requires_grad
        assert state.grad_fn is None


def test_two_time_map_from_noise_to_data_is_the_softmax():
    net = Net(two_time=True, dtype=torch.float32)
    flow_map = XPredMap(XPredictor(net), LinearInterpolant(reparam=token_clock()), two_time=True)
    x_init = noise(dtype=torch.float32)
    trajectory = rollout(flow_map, x_init, time_grid(1))
    assert trajectory.nfe == 1
    assert len(net.times) == 1
    assert torch.equal(net.times[0][0], torch.zeros(B))
    assert torch.equal(net.times[0][1], torch.ones(B))
    logits = net(x_init, torch.zeros(B), torch.ones(B))
    assert torch.equal(trajectory.x, torch.softmax(logits, -1))


def test_two_time_map_passes_each_step_end():
    net = Net(two_time=True)
    flow_map = XPredMap(XPredictor(net), LinearInterpolant(reparam=token_clock()), two_time=True)
    grid = time_grid(4, dtype=F64)
    rollout(flow_map, noise(), grid)
    assert [(t[0].item(), s[0].item()) for t, s in net.times] == list(
        zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True)
    )


@pytest.mark.parametrize("n_steps", [1, 2, 8])
def test_xpred_map_is_the_flm_euler_sampler(n_steps: int):
    # The FLM Euler sampler of the paper (arXiv 2602.16813), written out by hand.
    net = Net()
    kappa = token_clock()
    flow_map = XPredMap(XPredictor(net), LinearInterpolant(reparam=kappa))
    z = noise(seed=3)
    trajectory = rollout(flow_map, z, time_grid(n_steps, dtype=F64), save_states=True)
    assert trajectory.states is not None
    tau = [k / n_steps for k in range(n_steps + 1)]
    for i in range(n_steps):
        t_i = torch.full((B,), tau[i], dtype=F64)
        x1_hat = torch.softmax(net(z, t_i), -1)
        if i == n_steps - 1:
            z = x1_hat
            break
        gamma_i = kappa(torch.tensor([tau[i]], dtype=F64))
        gamma_next = kappa(torch.tensor([tau[i + 1]], dtype=F64))
        z = z + (gamma_next - gamma_i) * (x1_hat - z) / (1 - gamma_i)
        assert torch.allclose(trajectory.states[i + 1], z, rtol=0.0, atol=1e-12)
    assert torch.allclose(trajectory.x, z, rtol=0.0, atol=1e-12)
    assert torch.allclose(trajectory.x.sum(-1), torch.ones(B, L, dtype=F64))


def test_euler_on_xpred_velocity_equals_xpred_map_on_the_linear_path():
    net = Net()
    predictor = XPredictor(net)
    interp = LinearInterpolant(reparam=token_clock())
    grid = time_grid(6, dtype=F64)
    euler = rollout(Euler(XPredVelocity(predictor, interp)), noise(), grid).x
    xpred = rollout(XPredMap(predictor, interp), noise(), grid).x
    assert torch.allclose(euler, xpred, rtol=0.0, atol=1e-9)


# ---------------------------------------------------------------- grids, rollout checks, decode


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n_steps", [1, 3, 10])
def test_time_grid(n_steps: int, dtype: torch.dtype):
    grid = time_grid(n_steps, dtype=dtype)
    assert grid.shape == (n_steps + 1,)
    assert grid.dtype == dtype
    assert grid[0] == 0.0
    assert grid[-1] == 1.0
    assert torch.allclose(grid.diff(), torch.full((n_steps,), 1 / n_steps, dtype=dtype))
    assert torch.equal(time_grid(n_steps, reverse=True, dtype=dtype), grid.flip(0))
    warped = time_grid(n_steps, warp=Power(2.0), dtype=dtype)
    assert warped[0] == 0.0
    assert warped[-1] == 1.0
    assert torch.allclose(warped, grid**2)
    assert torch.equal(
        time_grid(n_steps, warp=Power(2.0), reverse=True, dtype=dtype), warped.flip(0)
    )


def test_time_grid_warp_pins_endpoints():
    grid = time_grid(4, warp=lambda t: 0.5 + 0.4 * (t - 0.5), dtype=F64)
    assert grid[0] == 0.0
    assert grid[-1] == 1.0
    assert torch.allclose(grid[1:-1], torch.tensor([0.4, 0.5, 0.6], dtype=F64))


@pytest.mark.parametrize("n_steps", [0, -2])
def test_time_grid_needs_a_step(n_steps: int):
    with pytest.raises(ValueError, match="at least one step"):
        time_grid(n_steps)


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ([0.0, 0.5, 0.4, 1.0], "strictly monotone"),
        ([0.0, 0.5, 0.5, 1.0], "strictly monotone"),
        ([0.0, 0.5, 1.2], r"lie in \[0, 1\]"),
        ([-0.1, 0.5, 1.0], r"lie in \[0, 1\]"),
        ([0.5], "at least 2"),
    ],
)
def test_rollout_rejects_bad_grids(grid: list[float], match: str):
    field = Forced(Identity())
    with pytest.raises(ValueError, match=match):
        rollout(Euler(field), X_START, torch.tensor(grid, dtype=F64), networks=[field])


def test_rollout_rejects_a_grid_given_as_a_list(checks: str):
    field = Forced(Identity())
    expected = (TypeCheckError, "grid") if checks == "jaxtyping" else (TypeError, "grid must be a")
    with pytest.raises(expected[0], match=expected[1]):
        rollout(Euler(field), X_START, [0.0, 0.5, 1.0], networks=[field])  # type: ignore[arg-type]


@pytest.mark.parametrize("n_steps", [2.5, "4", True])
def test_time_grid_needs_an_integer(checks: str, n_steps: object):
    integer = "n_steps must be an integer"
    expected = (TypeCheckError, "n_steps") if checks == "jaxtyping" else (TypeError, integer)
    if n_steps is True:  # a bool is an int to beartype: only flowlm's own check refuses it
        expected = (TypeError, integer)
    with pytest.raises(expected[0], match=expected[1]):
        time_grid(n_steps)  # type: ignore[arg-type]


class PoisonAfter(nn.Module):
    """A backbone that returns NaN from its ``calls``-th call on (0-based)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.remaining = calls

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.remaining -= 1
        return x * np.nan if self.remaining < 0 else x


@pytest.mark.parametrize("bad_step", [0, 2])
def test_rollout_names_the_step_that_made_nan(bad_step: int):
    flow_map = XPredMap(XPredictor(PoisonAfter(bad_step)), LinearInterpolant(reparam=token_clock()))
    grid = time_grid(4, dtype=F64)
    t, s = grid[bad_step].item(), grid[bad_step + 1].item()
    with pytest.raises(RuntimeError, match=rf"step {bad_step} \(t = {t:g} -> s = {s:g}\)"):
        rollout(flow_map, noise(), grid)


def test_decode_returns_the_largest_entry():
    # Each position's largest entry is planted: one-hot of known tokens plus noise below 1/2.
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, L), generator=generator)
    x = torch.eye(V)[tokens] + 0.49 * torch.rand(B, L, V, generator=generator)
    decoded = decode(x)
    assert not decoded.is_floating_point()
    assert torch.equal(decoded, tokens)
    assert torch.equal(decode(torch.eye(V)[None].expand(2, V, V)), torch.arange(V).expand(2, V))


# ---------------------------------------------------------------- per-token times


KINDS = ["xpred", "two_time", "euler", "midpoint", "heun", "heun_skip", "taylor"]


def build_any(kind: str) -> nn.Module:
    if kind == "two_time":
        predictor = XPredictor(Net(two_time=True))
        return XPredMap(predictor, LinearInterpolant(reparam=token_clock()), two_time=True)
    return build(kind, Net(), Correction())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("end", [0.75, 1.0])
def test_per_token_times_equal_to_per_example_give_the_same_step(kind: str, end: float):
    flow_map = build_any(kind)
    x = noise(seed=4)
    t, s = torch.tensor([0.25, 0.5], dtype=F64), torch.tensor([end, 0.9], dtype=F64)
    per_example = flow_map(x, t, s)
    per_token = flow_map(x, t[:, None].expand(B, L), s[:, None].expand(B, L))
    assert torch.equal(per_token, per_example)


@pytest.mark.parametrize("kind", KINDS)
def test_known_positions_at_time_one_are_returned_bit_for_bit(kind: str):
    flow_map = build_any(kind)
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (B, L), generator=generator)
    known = torch.tensor([[True, False, True], [False, False, True]])
    x = torch.where(known[..., None], one_hot(tokens, V, F64), noise(seed=6))
    t = torch.where(known, 1.0, torch.tensor([[0.2], [0.6]], dtype=F64))
    s = torch.where(known, 1.0, torch.tensor([[0.5], [0.8]], dtype=F64))
    out = flow_map(x, t, s)
    assert torch.equal(out[known], x[known])
    assert torch.isfinite(out).all()
    moved = ~known
    assert not torch.equal(out[moved], x[moved])


@pytest.mark.parametrize("kind", KINDS)
def test_rollout_with_per_token_times_keeps_a_prompt_exactly(kind: str):
    # A flow map bound to a prompt: known positions get t = s = 1 at every step.
    inner = build_any(kind)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(7))
    known = torch.tensor([[True, True, False], [True, False, False]])
    prompt = one_hot(tokens, V, F64)

    def conditioned(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        per_token = (t[:, None].expand(B, L), s[:, None].expand(B, L))
        return inner(x, *(torch.where(known, 1.0, time) for time in per_token))

    x_init = torch.where(known[..., None], prompt, noise(seed=8))
    trajectory = rollout(conditioned, x_init, time_grid(4, dtype=F64), save_states=True)
    assert trajectory.states is not None
    for state in trajectory.states:
        assert torch.equal(state[known], prompt[known])


def test_a_state_of_the_wrong_vocabulary_is_refused_by_the_flow_map():
    flow_map = XPredMap(XPredictor(Net(vocab=11)), LinearInterpolant(reparam=token_clock(8)))
    x = torch.randn(B, L, 11, dtype=F64)
    with pytest.raises(
        ValueError, match="vocabulary mismatch: x has 11 entries per position, expected 8"
    ):
        rollout(flow_map, x, time_grid(2, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", [LinearInterpolant, CosineInterpolant])
def test_rollout_keeps_a_low_precision_state(dtype: torch.dtype, path: type[LinearInterpolant]):
    flow_map = XPredMap(XPredictor(lambda x, t: 3 * x), path(reparam=token_clock()))
    trajectory = rollout(flow_map, noise(dtype=torch.float32).to(dtype), time_grid(4))
    assert trajectory.x.dtype == dtype
    assert trajectory.grid.dtype == torch.float32  # times stay float32 for a half state


def test_an_eight_step_rollout_holds_at_most_four_state_sized_tensors():
    interp = LinearInterpolant(reparam=token_clock(512))
    flow_map = XPredMap(XPredictor(lambda x, t: 2 * x), interp)
    x_init = torch.randn(4, 8, 512)
    unit = x_init.nbytes
    with LiveTensorBytes() as tracker:
        trajectory = rollout(flow_map, x_init, time_grid(8))
    del trajectory
    assert tracker.peak <= 4.05 * unit, tracker.peak / unit
    # per step: the logits, the probabilities and the fused step's output; nothing else big
    assert len(tracker.big(unit // 2)) == 3 * 8
