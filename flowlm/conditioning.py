r"""Conditional samplers built on `rollout`: replacement, classifier-free guidance and blocks.

A context is clean data at time 1 (`Context`); these are the usual ways to sample with one:

- `Replacement`: training-free conditioning of an *unconditional* model. Before each step
  the known positions are reset to the interpolant's sample of their tokens at the current
  time, $x_{t,i} = \sigma(\gamma_t)\varepsilon_i + \alpha(\gamma_t)e_{x_i}$; the network never
  sees the context as clean, only through the noisy copies (the inpainting baseline).
- `Guidance`: classifier-free guidance $z_w = z_c + w(z_c - z_u)$ of a network trained with
  per-token times and dropped contexts; both branches run in one batched call.
- `block_rollout`: semi-autoregressive generation, blocks of $b$ positions in order, each a
  `rollout` with the earlier blocks as context: $\lceil L/b\rceil$ rollouts.
"""

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowlm._tensors import broadcast_time
from flowlm._types import Grid, Logits, Probs, State, Time, TokenTime
from flowlm.context import Context, SamplerState
from flowlm.interpolants import Interpolant, one_hot
from flowlm.protocols import Backbone, FlowMap
from flowlm.self_conditioning import SelfConditionedBackbone
from flowlm.solvers import Trajectory, decode, rollout


class Replacement(nn.Module):
    r"""Condition an unconditional flow map by re-imposing the known tokens at the current time.

    $X^{\mathrm{rep}}_{t\to s}(x) = R_s\big(X_{t\to s}(R_t(x))\big)$ where $R_t$ sets every
    known position $i$ to $\sigma(\gamma_t)\varepsilon_i + \alpha(\gamma_t)e_{x_i}$ with fresh
    noise $\varepsilon$ (one draw per step, shared by $R_t$ and $R_s$). The wrapped map is
    called with the per-example times it was trained on. At $\gamma_s = 1$, $R_s$ returns the
    one-hot tokens, so the final state holds the context exactly. Use it with a plain
    ``rollout`` (no ``context=``, which would pass per-token times to the network). On a
    self-conditioned sampler's lifted state, give ``context.lift()``: $R_t$ acts on the state
    half only (the estimate half is the sampler's: the model never saw the tokens clean).

    Args:
        flow_map: the unconditional map.
        context: the known tokens.
        interpolant: the path that noises them (the one the model was trained with).
        generator: random source on the state's device.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap, rollout, time_grid
        >>> path = LinearInterpolant()
        >>> step = XPredMap(XPredictor(lambda x, t: torch.zeros_like(x)), path)
        >>> context = Context.prefix(torch.tensor([[2, 0, 0]]), 1)
        >>> x = rollout(Replacement(step, context, path), torch.randn(1, 3, 3), time_grid(4)).x
        >>> x[0, 0]
        tensor([0., 0., 1.])
    """

    def __init__(
        self,
        flow_map: FlowMap,
        context: Context,
        interpolant: Interpolant,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.flow_map = flow_map
        self.context = context
        self.interpolant = interpolant
        self.generator = generator

    def forward(self, x: SamplerState, t: Time, s: Time) -> SamplerState:
        r"""$R_s(X_{t\to s}(R_t(x)))$ (on the state half of a lifted context's state)."""
        context = self.context
        if x.shape[:2] != context.known.shape:
            raise ValueError(
                f"a state of shape {tuple(x.shape)} does not fit a context of shape "
                f"{tuple(context.known.shape)}"
            )
        state = context.state(x)
        noise = torch.randn(
            state.shape, generator=self.generator, device=x.device, dtype=state.dtype
        )
        clean = one_hot(context.tokens, state.shape[-1], dtype=state.dtype)
        x = context.with_state(x, self._reset(state, noise, clean, t))
        moved = self.flow_map(x, t, s)
        return context.with_state(moved, self._reset(context.state(moved), noise, clean, s))

    def _reset(self, state: State, noise: State, clean: State, t: Time) -> State:
        """$R_t$: the known positions of ``state`` at the interpolant's sample of their tokens."""
        noised = self.interpolant.sample(noise, clean, t)
        return torch.where(self.context.known[..., None], noised, state)


class Guidance(nn.Module):
    r"""Classifier-free guidance of a backbone: $z_w = z_c + w\,(z_c - z_u)$, one batched call.

    The context is read from the times: positions at time 1 are clean data, the conditioning.
    The conditional branch $z_c$ is the backbone as called; the unconditional branch $z_u$
    *forgets* the clean positions, putting them back to pure noise at time 0 (fresh
    $\varepsilon \sim N(0, I)$, both times 0 for a two-time network): the continuous
    analogue of masking the prompt. Both branches go through the backbone as one batch of
    $2B$ rows, so a rollout counts one network call per step. $w = 0$ is the conditional
    model, larger $w$ sharpens the conditional. Train the backbone with ``p_uncond > 0``.

    A self-conditioned backbone stays one: ``previous=`` $\hat x_1'$ is passed to both
    branches, the unconditional one reading zeros (no estimate) at the forgotten positions,
    so that the prompt cannot reach it through the estimate. Inside
    ``flowlm.SelfConditionedMap(Guidance(f, w), ..., guidance=u)`` both guidances compose:
    $z = z_w(\hat x_1') + u\,(z_w(\hat x_1') - z_w(0))$, i.e.
    $(1+u)(1+w)\,z_c(\hat x_1') - (1+u)w\,z_u(\hat x_1') - u(1+w)\,z_c(0) + uw\,z_u(0)$
    (symmetric in the two: either order gives it), in one call on $4B$ rows.

    Args:
        backbone: a network trained with per-token times, plain or self-conditioned.
        weight: the guidance weight $w \ge 0$.
        generator: random source of the forgetting noise, on the state's device.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap, rollout, time_grid
        >>> class Copy(nn.Module):  # logits: the first position's state, everywhere
        ...     def forward(self, x, t): return x[:, :1].expand_as(x)
        >>> predictor = XPredictor(Guidance(Copy(), weight=0.0))
        >>> context = Context.prefix(torch.tensor([[1, 0]]), 1)
        >>> step = XPredMap(predictor, LinearInterpolant())
        >>> rollout(step, torch.randn(1, 2, 2), time_grid(1), context=context).nfe
        1
    """

    def __init__(
        self,
        backbone: Backbone | SelfConditionedBackbone,
        weight: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"the guidance weight must be >= 0, got {weight}")
        self.backbone = backbone
        self.weight = weight
        self.generator = generator

    def forward(
        self, x_t: State, t: Time, s: Time | None = None, /, previous: Probs | None = None
    ) -> Logits:
        """Guided logits (given the previous estimate, for a self-conditioned backbone)."""
        t = _per_token(t, x_t)
        clean = t >= 1
        noise = torch.randn(x_t.shape, generator=self.generator, device=x_t.device, dtype=x_t.dtype)
        x_both = torch.cat([x_t, torch.where(clean[..., None], noise, x_t)])
        times = [torch.cat([t, _forget(t, clean)])]
        if s is not None:
            s = _per_token(s, x_t)
            times.append(torch.cat([s, _forget(s, clean)]))
        inputs = {}
        if previous is not None:  # the unconditional branch forgets the estimate there too
            forgotten = torch.where(clean[..., None], torch.zeros_like(previous), previous)
            inputs = {"previous": torch.cat([previous, forgotten])}
        logits = self.backbone(x_both, *times, **inputs)
        conditional, unconditional = logits.chunk(2)
        return conditional + self.weight * (conditional - unconditional)


def _per_token(times: Time, x: State) -> TokenTime:
    """``times`` per token, in their own dtype (a bfloat16 state must not round 0.999 to 1)."""
    positions = torch.empty(x.shape[:2], dtype=torch.bool, device=x.device)
    return broadcast_time(times, positions).expand(x.shape[:2])


def _forget(times: Tensor, clean: Tensor) -> Tensor:
    return torch.where(clean, torch.zeros((), dtype=times.dtype, device=times.device), times)


def block_rollout(
    flow_map: FlowMap,
    x_init: State,
    grid: Grid,
    block_size: int,
    *,
    context: Context | None = None,
    first: int = 0,
    networks: Sequence[nn.Module] | None = None,
) -> Trajectory:
    r"""Semi-autoregressive sampling: blocks of ``block_size`` positions, in order.

    Positions ``first, ..., seq - 1`` are cut into blocks $B_1, B_2, \dots$ of $b$ positions
    (the last may be shorter). Block $k$ is one `rollout` along ``grid`` from ``x_init`` with
    the context plus the blocks before $k$ known at time 1; every unknown position follows
    the flow (as in prefix training) and the decoded tokens of block $k$ join the context.
    So $\mathrm{NFE} = \lceil (L - \text{first})/b\rceil \times$ (calls per rollout). Every
    position before ``first`` must be known (e.g. ``first`` = the prompt's length; checked once
    per call, on the host). A self-conditioned sampler (`flowlm.SelfConditionedMap`) runs from
    ``lift_state(noise)`` with a lifted context (`Context.lift`; for none,
    ``Context.none(tokens).lift()``): every block restarts from ``x_init`` (no estimate but
    the one-hot of the known tokens), and the blocks are decoded from the state half.

    Args:
        flow_map: a conditional flow map (trained with per-token times).
        x_init: the noise every block starts from.
        grid: model times of each block's rollout.
        block_size: positions per block, $b \ge 1$.
        context: known tokens (default: none, on a token state).
        first: where the first block starts.
        networks: modules whose calls count (as in `rollout`).

    Returns:
        The last block's trajectory with ``nfe`` summed over the blocks; every earlier block
        is one-hot at its decoded tokens.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap, time_grid
        >>> step = XPredMap(XPredictor(lambda x, t: torch.zeros_like(x)), LinearInterpolant())
        >>> block_rollout(step, torch.randn(2, 8, 3), time_grid(4), block_size=2).nfe
        16
    """
    batch, seq, _ = x_init.shape
    if block_size < 1 or not 0 <= first < seq:
        raise ValueError(
            f"need block_size >= 1 and 0 <= first < seq = {seq}, got {block_size} and {first}"
        )
    if context is None:
        context = Context.none(torch.zeros(batch, seq, dtype=torch.long, device=x_init.device))
    if first > 0 and not bool(context.known[:, :first].all()):
        raise ValueError(f"every position before first={first} must be known in the context")
    positions = torch.arange(seq, device=x_init.device)
    x, nfe = x_init, 0
    for start in range(first, seq, block_size):
        trajectory = rollout(flow_map, x_init, grid, networks=networks, context=context)
        x, nfe = trajectory.x, nfe + trajectory.nfe
        block = (positions >= start) & (positions < start + block_size)
        tokens = torch.where(block & context.unknown, decode(context.state(x)), context.tokens)
        context = dataclasses.replace(context, tokens=tokens, known=context.known | block)
    return Trajectory(x=x, nfe=nfe, grid=grid.to(x_init.device, x_init.dtype))
