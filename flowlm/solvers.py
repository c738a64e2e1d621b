r"""Flow maps, ODE step rules and the one sampling loop.

A flow map moves a state from model time ``t`` to model time ``s``: $X_{t \to s}$.
**Direction:** flowlm writes the start first; much of the literature writes $X_{s,t}$ for the
same map. Every sampler is a flow map applied along a grid by `rollout`:

- `XPredMap`: the x-prediction step (FLM's Euler sampler, or FMLM's two-time denoiser map);
- `Euler`, `Midpoint`, `Heun`: classic step rules on a `VelocityField`, integrating in path
  time $\gamma$ (the field is per unit $\gamma$, the network is fed model time);
- `TaylorMap`: $x + \Delta v + \tfrac12\Delta^2 g$, the v1 stage-1 map.
"""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from flowlm._checks import check_finite, check_state
from flowlm._tensors import broadcast_time, float32_or_wider
from flowlm._types import Grid, State, Time, Tokens
from flowlm.context import Context
from flowlm.heads import XPredictor
from flowlm.interpolants import Interpolant
from flowlm.network_calls import count_network_calls, record_network_call
from flowlm.protocols import Backbone, FlowMap, VelocityField
from flowlm.reparam import TimeReparam


class XPredVelocity(nn.Module):
    r"""The marginal velocity of an x-predictor: $v = \sigma'\hat x_0 + \alpha'\hat x_1$.

    For the linear path, $v(x, t) = (\hat x_1(x, t) - x)/(1 - \gamma)$.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor
        >>> field = XPredVelocity(XPredictor(lambda x, t: torch.zeros_like(x)), LinearInterpolant())
        >>> field(torch.zeros(1, 1, 2), torch.tensor([0.5]))
        tensor([[[1., 1.]]])
    """

    def __init__(self, predictor: XPredictor, interpolant: Interpolant) -> None:
        super().__init__()
        self.predictor = predictor
        self.interpolant = interpolant

    @property
    def reparam(self) -> TimeReparam:
        """The interpolant's clock."""
        return self.interpolant.reparam

    def forward(self, x: State, t: Time) -> State:
        r"""$dx/d\gamma$."""
        self.interpolant.check_state(x)
        return self.interpolant.velocity(x, self.predictor(x, t), t)


class XPredMap(nn.Module):
    r"""The x-prediction map $X_{t\to s}(x) = \sigma(\gamma_s)\hat x_0 + \alpha(\gamma_s)\hat x_1$.

    With ``two_time=False``, $\hat x_1 = D_t(x)$ and this is exactly FLM's Euler sampler step
    (linear path: $x + \frac{\gamma_s - \gamma_t}{1 - \gamma_t}(\hat x_1 - x)$). With
    ``two_time=True``, $\hat x_1 = \delta_{t,s}(x)$ is FMLM's two-time denoiser and
    $X_{t\to 1} = \delta_{t,1}$: one call from noise to data.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor
        >>> step = XPredMap(XPredictor(lambda x, t: 9 * x), LinearInterpolant())
        >>> x = torch.eye(3)[None]
        >>> torch.equal(step(x, torch.zeros(1), torch.ones(1)), torch.softmax(9 * x, -1))
        True
    """

    def __init__(
        self, predictor: XPredictor, interpolant: Interpolant, two_time: bool = False
    ) -> None:
        super().__init__()
        self.predictor = predictor
        self.interpolant = interpolant
        self.two_time = two_time

    def forward(self, x: State, t: Time, s: Time) -> State:
        r"""$X_{t \to s}(x)$: one network call."""
        self.interpolant.check_state(x)
        x1_hat = self.predictor(x, t, s) if self.two_time else self.predictor(x, t)
        return self.interpolant.step(x, x1_hat, t, s)

    def rows(self, index: Int[Tensor, " rows"]) -> "XPredMap":
        """This map for the rows ``index`` of its batch: `XPredictor.rows` (`flowlm.RowSelectable`)."""
        return XPredMap(self.predictor.rows(index), self.interpolant, self.two_time)


class Euler(nn.Module):
    r"""Euler in path time: $X_{t\to s}(x) = x + (\gamma_s - \gamma_t)\,v(x, t)$. Order 1, 1 call.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor
        >>> field = XPredVelocity(XPredictor(lambda x, t: 9 * x), LinearInterpolant())
        >>> x = torch.eye(3)[None]
        >>> torch.allclose(Euler(field)(x, torch.zeros(1), torch.ones(1)), torch.softmax(9 * x, -1))
        True
    """

    def __init__(self, field: VelocityField) -> None:
        super().__init__()
        self.field = field

    def forward(self, x: State, t: Time, s: Time) -> State:
        """One Euler step."""
        kappa = self.field.reparam
        return x + broadcast_time(kappa(s) - kappa(t), x) * self.field(x, t)


class Midpoint(nn.Module):
    r"""Explicit midpoint in path time. Order 2, 2 calls.

    $x_m = x + \tfrac{\Delta}{2} v(x, t)$ at $\gamma_m = \tfrac12(\gamma_t + \gamma_s)$, then
    $X_{t\to s}(x) = x + \Delta\, v(x_m, \kappa^{-1}(\gamma_m))$, $\Delta = \gamma_s - \gamma_t$.

    Examples:
        >>> from flowlm import Identity
        >>> class Decay(nn.Module):
        ...     reparam = Identity()
        ...     def forward(self, x, t): return -x
        >>> x1 = Midpoint(Decay())(torch.ones(1, 1, 1), torch.zeros(1), torch.ones(1))
        >>> x1.item()  # 1 - 1 + 1/2
        0.5
    """

    def __init__(self, field: VelocityField) -> None:
        super().__init__()
        self.field = field

    def forward(self, x: State, t: Time, s: Time) -> State:
        """One midpoint step."""
        kappa = self.field.reparam
        gamma_t, gamma_s = kappa(t), kappa(s)
        gamma_mid = 0.5 * (gamma_t + gamma_s)
        x_mid = x + broadcast_time(gamma_mid - gamma_t, x) * self.field(x, t)
        return x + broadcast_time(gamma_s - gamma_t, x) * self.field(
            x_mid, kappa.inverse(gamma_mid)
        )


class Heun(nn.Module):
    r"""Heun's method (explicit trapezoid) in path time. Order 2, 2 calls.

    $\tilde x = x + \Delta v(x, t)$, $X_{t\to s}(x) = x + \frac{\Delta}{2}(v(x,t) + v(\tilde x,s))$.
    Where $\gamma_s = 1$ the x-prediction velocity is singular, so those examples (or tokens)
    take the Euler step instead (as is usual for the last step). By default both calls are
    always made and the corrector is discarded there: $n$ steps cost $2n$ calls and no host
    sync. With ``skip_at_data=True`` the step reads one boolean on the host (a device sync
    per step) and skips the corrector when every position ends at $\gamma = 1$: $n$ steps
    onto the data then cost $2n - 1$ calls.

    Args:
        field: the velocity field.
        skip_at_data: skip the wasted corrector call on a step onto the data, at the price
            of one host read per step.

    Examples:
        >>> from flowlm import Identity
        >>> class Decay(nn.Module):
        ...     reparam = Identity()
        ...     def forward(self, x, t): return -x
        >>> Heun(Decay())(torch.ones(1, 1, 1), torch.zeros(1), torch.full((1,), 0.5)).item()
        0.625
    """

    def __init__(self, field: VelocityField, *, skip_at_data: bool = False) -> None:
        super().__init__()
        self.field = field
        self.skip_at_data = skip_at_data

    def forward(self, x: State, t: Time, s: Time) -> State:
        """One Heun step."""
        kappa = self.field.reparam
        gamma_s = kappa(s)
        delta = broadcast_time(gamma_s - kappa(t), x)
        v_start = self.field(x, t)
        x_euler = x + delta * v_start
        at_data = gamma_s >= 1
        if self.skip_at_data and bool(at_data.all()):
            return x_euler
        x_heun = x + 0.5 * delta * (v_start + self.field(x_euler, s))
        return torch.where(broadcast_time(at_data, x), x_euler, x_heun)


class TaylorMap(nn.Module):
    r"""Second-order map $X_{t\to s}(x) = x + \Delta v(x, t) + \tfrac12\Delta^2 g(x, t, s)$.

    $\Delta = \gamma_s - \gamma_t$, $v$ a (frozen teacher's) velocity field and $g$ a correction
    network with two time inputs. With $g \equiv 0$ it is the teacher's Euler step. 2 calls
    (the correction's call is recorded here with `record_network_call`; the field's by its
    own predictor).

    Args:
        field: the velocity field $v$.
        correction: the network $g$, called as ``correction(x, t, s)``.
        freeze_field: run the field without gradient (a frozen teacher, so only $g$ learns);
            ``False`` lets gradients flow through $v$ too.

    Examples:
        >>> from flowlm import Identity
        >>> class Decay(nn.Module):
        ...     reparam = Identity()
        ...     def forward(self, x, t): return -x
        >>> taylor = TaylorMap(Decay(), lambda x, t, s: x)  # g = -v' exactly for this field
        >>> taylor(torch.ones(1, 1, 1), torch.zeros(1), torch.ones(1)).item()
        0.5
    """

    def __init__(
        self, field: VelocityField, correction: Backbone, *, freeze_field: bool = True
    ) -> None:
        super().__init__()
        self.field = field
        self.correction = correction
        self.freeze_field = freeze_field

    def forward(self, x: State, t: Time, s: Time) -> State:
        """One Taylor step."""
        kappa = self.field.reparam
        delta = broadcast_time(kappa(s) - kappa(t), x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_field):
            velocity = self.field(x, t)
        correction = self.correction(x, t, s)
        record_network_call()
        return x + delta * velocity + 0.5 * delta**2 * correction


class Substeps(nn.Module):
    r"""A flow map made of ``n_steps`` steps of another on a uniform model-time subgrid.

    $X_{t\to s} = X_{t_{n-1}\to s}\circ\dots\circ X_{t\to t_1}$ with
    $t_k = t + \tfrac{k}{n}(s - t)$, per example. A many-step teacher for `map_regression_loss`.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor
        >>> step = XPredMap(XPredictor(lambda x, t: 3 * x), LinearInterpolant())
        >>> x, t, s = torch.randn(2, 3, 4), torch.zeros(2), torch.ones(2)
        >>> torch.equal(Substeps(step, 4)(x, t, s), rollout(step, x, time_grid(4)).x)
        True
    """

    def __init__(self, flow_map: FlowMap, n_steps: int) -> None:
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"Substeps needs n_steps >= 1, got {n_steps}")
        self.flow_map = flow_map
        self.n_steps = n_steps

    def forward(self, x: State, t: Time, s: Time) -> State:
        r"""$X_{t \to s}(x)$ in ``n_steps`` calls of the inner map."""
        start = t
        for k in range(1, self.n_steps + 1):
            end = torch.lerp(t, s, k / self.n_steps)
            x = self.flow_map(x, start, end)
            start = end
        return x


def time_grid(
    n_steps: int,
    warp: Callable[[Tensor], Tensor] | None = None,
    *,
    reverse: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Grid:
    """``n_steps + 1`` model times from 0 (noise) to 1 (data), uniform unless warped.

    Args:
        n_steps: number of steps (flow-map applications).
        warp: an increasing map of [0, 1] onto itself applied to the uniform grid
            (e.g. ``Power(2.0)`` for smaller steps near the noise).
        reverse: run from data (1) back to noise (0).
        dtype: dtype of the grid.
        device: device of the grid.

    Examples:
        >>> time_grid(4)
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"n_steps must be an integer, got {n_steps!r} ({type(n_steps).__name__})")
    if n_steps < 1:
        raise ValueError(f"a grid needs at least one step, got n_steps={n_steps}")
    grid = torch.linspace(0.0, 1.0, n_steps + 1, dtype=dtype, device=device)
    if warp is not None:
        grid = warp(grid)
        grid[0], grid[-1] = 0.0, 1.0
    return grid.flip(0) if reverse else grid


@dataclass(frozen=True)
class Trajectory:
    """What `rollout` returns.

    Attributes:
        x: the final state.
        nfe: network calls made, as recorded by the networks' callers (see `rollout`).
        grid: the model times visited.
        states: the state at every grid time (including the start), if saved.
    """

    x: State
    nfe: int
    grid: Grid
    states: tuple[State, ...] | None = None


def _grid_times(grid: object) -> list[float]:
    """The grid's times on the host (read once per rollout), after checking it."""
    if not isinstance(grid, Tensor):
        raise TypeError(
            f"grid must be a 1-d tensor of model times (e.g. flowlm.time_grid(8)), got "
            f"{type(grid).__name__}; write torch.tensor([...]) for a custom grid"
        )
    if grid.ndim != 1 or grid.numel() < 2 or not grid.is_floating_point():
        raise ValueError(
            f"a grid is a 1-d float tensor of at least 2 times, got {tuple(grid.shape)} {grid.dtype}"
        )
    times: list[float] = grid.tolist()
    steps = [b - a for a, b in itertools.pairwise(times)]
    if not (all(d > 0 for d in steps) or all(d < 0 for d in steps)):
        raise ValueError("grid times must be strictly monotone (all increasing or all decreasing)")
    if not all(0.0 <= v <= 1.0 for v in times):
        raise ValueError(f"grid times must lie in [0, 1], got {times}")
    return times


def rollout(
    flow_map: FlowMap,
    x_init: State,
    grid: Grid,
    *,
    save_states: bool = False,
    grad: bool = False,
    networks: Sequence[nn.Module] | None = None,
    context: Context | None = None,
) -> Trajectory:
    r"""Apply ``flow_map`` along ``grid``: $x \leftarrow X_{t_i \to t_{i+1}}(x)$ for each step.

    The inputs are checked once, here; the grid is read on the host once. After every step a
    device-side check (no host sync on an accelerator) raises if the state is not finite,
    naming the step and its times. The state keeps ``x_init``'s dtype (bfloat16 stays
    bfloat16); times are passed per example in at least float32.

    NFE is what the networks' callers record (`XPredictor` and `TaylorMap` do, through
    `record_network_call`) while the rollout runs. A flow map that records nothing is an
    error: pass ``networks=`` (modules whose forward calls count instead), or call
    `record_network_call` in it.

    Args:
        flow_map: any `FlowMap`.
        x_init: the starting state at time ``grid[0]`` (noise for a forward grid).
        grid: strictly monotone model times (forward or backward), a 1-d tensor.
        save_states: keep the state at every grid time.
        grad: record the autograd graph (e.g. to differentiate through sampling).
        networks: count the forward calls of these modules instead of the recorded calls.
        context: known tokens, held one-hot at time 1 through every step while the network
            sees per-token times (1 on known positions); see `Context.hold`.

    Raises:
        TypeError: if ``grid`` is not a tensor.
        ValueError: on a malformed grid or state.
        RuntimeError: if a step produces NaN or infinity, or no network call was counted.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor
        >>> step = XPredMap(XPredictor(lambda x, t: torch.zeros_like(x)), LinearInterpolant())
        >>> trajectory = rollout(step, torch.randn(2, 5, 3), time_grid(4))
        >>> trajectory.nfe, trajectory.x.shape
        (4, torch.Size([2, 5, 3]))
    """
    check_state(x_init, name="x_init")
    host_times = _grid_times(grid)
    hooked = [0]

    def count(*_: object) -> None:
        hooked[0] += 1

    handles: list[RemovableHandle] = (
        [] if networks is None else [m.register_forward_hook(count) for m in networks]
    )
    if context is not None:
        flow_map, x_init = context.hold(flow_map), context.impose(x_init)
    times = grid.to(x_init.device, float32_or_wider(x_init.dtype))
    batch = x_init.shape[0]
    x = x_init
    states = [x] if save_states else None
    try:
        with torch.set_grad_enabled(grad), count_network_calls() as recorded:
            for index, (start, end) in enumerate(itertools.pairwise(times)):
                x = flow_map(x, start.expand(batch), end.expand(batch))
                check_finite(
                    x,
                    f"rollout step {index} (t = {host_times[index]:.6g} -> s = "
                    f"{host_times[index + 1]:.6g}) produced NaN or infinite values",
                )
                if states is not None:
                    states.append(x)
    finally:
        for handle in handles:
            handle.remove()
    nfe = recorded.count if networks is None else hooked[0]
    if nfe == 0:
        raise RuntimeError(
            "rollout counted no network call: the flow map records none (XPredictor and "
            "TaylorMap record theirs); pass networks=[...] with the modules it calls, or call "
            "flowlm.record_network_call() where it evaluates a network"
        )
    return Trajectory(
        x=x, nfe=nfe, grid=times, states=tuple(states) if states is not None else None
    )


def decode(x: State) -> Tokens:
    """Tokens by argmax over the vocabulary at every position.

    Examples:
        >>> decode(torch.tensor([[[0.1, 0.9], [0.7, 0.3]]]))
        tensor([[1, 0]])
    """
    return x.argmax(dim=-1)
