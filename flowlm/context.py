r"""Conditioning as clean data: a context is a set of positions already at time 1.

A position at model time $t_i = 1$ is clean (one-hot), so a prompt, the two sides of an
infill or an already written block need no new mechanism (the documentation's guide
*Prompts, infilling and guidance*; FMLM's posterior-refinement follow-up, arXiv 2606.24773):

- training: draw a context mask $m$, set $t_i = 1$ where $m_i$ (`Context.times`), build
  $x_t$ with the interpolant as usual (it returns $e_{x_i}$ exactly at $\gamma_i = 1$) and
  average the loss over the unknown positions only,
  ``masked_mean(cross_entropy(logits, tokens), context.unknown)``;
- sampling: ``rollout(flow_map, noise, grid, context=context)`` holds the known positions
  one-hot at time 1 through every step (`Context.hold`); two-time maps see $t = s = 1$ there,
  so one FMLM call fills every unknown position given the known ones. A self-conditioned
  sampler runs on the lifted state $[x, \hat x_1']$ (`flowlm.SelfConditionedMap`): hold
  ``context.lift()``, which imposes the tokens on the state $x$ and on the estimate.

The samplers `prefix_context`, `span_context` and `bernoulli_context` draw training contexts
on the tokens' device; each drops the whole context of a row with probability ``p_uncond``,
so the same network also stays unconditional (needed by `flowlm.Guidance`).
"""

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from flowlm._tensors import broadcast_time
from flowlm._types import State, Time, TokenMask, Tokens, TokenTime
from flowlm.interpolants import one_hot
from flowlm.protocols import FlowMap
from flowlm.self_conditioning import lift_state, split_state

SamplerState = Float[Tensor, "batch seq width"]
"""What a sampler runs on: a token state ``(batch, seq, vocab)`` or a lifted one (``2 * vocab``)."""


@dataclass(frozen=True)
class Context:
    r"""Known tokens: ``tokens`` where ``known`` is true; other entries of ``tokens`` are ignored.

    Attributes:
        tokens: integer ids ``(batch, seq)``.
        known: bool mask ``(batch, seq)``, true at the positions given (held at time 1).
        lifted: the sampler's state is a self-conditioned lifted state $[x, \hat x_1']$
            (`flowlm.lift_state`): the tokens are held one-hot in both halves (see `lift`).

    Raises:
        TypeError: if ``tokens`` are not integers or ``known`` is not bool.
        ValueError: if the shapes or devices differ, or are not ``(batch, seq)``.

    Examples:
        >>> context = Context(torch.tensor([[2, 0, 1]]), torch.tensor([[True, False, True]]))
        >>> context.times(torch.tensor([0.25]))
        tensor([[1.0000, 0.2500, 1.0000]])
        >>> context.impose(torch.zeros(1, 3, 3))
        tensor([[[0., 0., 1.],
                 [0., 0., 0.],
                 [0., 1., 0.]]])
    """

    tokens: Tokens
    known: TokenMask
    lifted: bool = False

    def __post_init__(self) -> None:
        tokens, known = self.tokens, self.known
        if tokens.ndim != 2:
            raise ValueError(f"context tokens must be (batch, seq), got {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"context tokens must be integer ids, got {tokens.dtype}")
        if known.dtype != torch.bool:
            raise TypeError(f"the known mask must be a bool tensor, got {known.dtype}")
        if known.shape != tokens.shape:
            raise ValueError(
                f"known mask {tuple(known.shape)} and tokens {tuple(tokens.shape)} "
                "must have the same (batch, seq) shape"
            )
        if known.device != tokens.device:
            raise ValueError(f"known mask on {known.device} but tokens on {tokens.device}")

    @classmethod
    def none(cls, tokens: Tokens) -> "Context":
        """Nothing known: unconditional generation or training.

        Examples:
            >>> Context.none(torch.zeros(1, 2, dtype=torch.long)).known
            tensor([[False, False]])
        """
        return cls(tokens, torch.zeros_like(tokens, dtype=torch.bool))

    @classmethod
    def prefix(cls, tokens: Tokens, length: int) -> "Context":
        """The first ``length`` positions known: a prompt.

        Examples:
            >>> Context.prefix(torch.tensor([[4, 5, 6]]), 2).known
            tensor([[ True,  True, False]])
        """
        if not 0 <= length <= tokens.shape[-1]:
            raise ValueError(f"prefix length must lie in [0, {tokens.shape[-1]}], got {length}")
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        return cls(tokens, (positions < length).expand(tokens.shape).clone())

    @classmethod
    def from_template(
        cls,
        template: str,
        encode: Callable[[str], Sequence[int] | Tensor],
        length: int,
        batch_size: int = 1,
        *,
        hole: str = "_",
        device: torch.device | str | None = None,
    ) -> "Context":
        """A context from text with holes: a prompt (``"In the"``) or an infill (``"In the ____ God"``).

        The text between holes is encoded with ``encode`` (any tokenizer's) and known; every
        ``hole`` character is one position to generate, and so is every position after the
        template, up to ``length``. The same context is repeated over ``batch_size`` rows.

        Raises:
            ValueError: if the template needs more than ``length`` positions, or ``hole`` is
                not one character.

        Examples:
            >>> from flowlm.data import CharTokenizer
            >>> context = Context.from_template("ab__a", CharTokenizer("ab").encode, 6)
            >>> context.tokens, context.known
            (tensor([[0, 1, 0, 0, 0, 0]]), tensor([[ True,  True, False, False,  True, False]]))
        """
        if len(hole) != 1:
            raise ValueError(f"a hole is one character, got {hole!r}")
        ids: list[int] = []
        known: list[bool] = []
        for piece in re.split(f"({re.escape(hole)}+)", template):
            if piece.startswith(hole):
                ids += [0] * len(piece)
                known += [False] * len(piece)
            elif piece:
                encoded = [int(i) for i in encode(piece)]
                ids += encoded
                known += [True] * len(encoded)
        if len(ids) > length:
            raise ValueError(
                f"the template {template!r} takes {len(ids)} positions but sequences have {length}"
            )
        ids += [0] * (length - len(ids))
        known += [False] * (length - len(known))
        tokens = torch.tensor(ids, dtype=torch.long, device=device)
        mask = torch.tensor(known, dtype=torch.bool, device=device)
        return cls(tokens.expand(batch_size, -1).clone(), mask.expand(batch_size, -1).clone())

    @property
    def unknown(self) -> TokenMask:
        """The positions to generate (and to train on): ``~known``."""
        return ~self.known

    def times(self, t: Time) -> TokenTime:
        r"""Per-token times: 1 on known positions, ``t`` elsewhere.

        ``t`` is one time per example ``(batch,)`` or per token ``(batch, seq)``.
        """
        one = torch.ones((), dtype=t.dtype, device=t.device)
        return torch.where(self.known, one, broadcast_time(t, self.known))

    def lift(self) -> "Context":
        r"""This context, held in a self-conditioned sampler's lifted state $[x, \hat x_1']$.

        At known positions both halves are the one-hot $e_{x_i}$: the state, which is data
        there, and the estimate, whose exact value it is ($\mathbb E[x_1 \mid x_t] = e_{x_i}$
        at time 1). Elsewhere the estimate half is the sampler's own. Pass it to
        `flowlm.rollout` or `flowlm.block_rollout` with a `flowlm.SelfConditionedMap` started
        from ``lift_state(noise)``; a context that is not lifted would read the lifted state
        as one of ``2 * vocab`` tokens.

        Examples:
            >>> from flowlm import lift_state
            >>> context = Context.prefix(torch.tensor([[1, 0]]), 1).lift()
            >>> context.impose(lift_state(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5)))
            tensor([[[0.0000, 1.0000, 0.0000, 1.0000],
                     [0.0000, 0.0000, 0.5000, 0.5000]]])
        """
        return dataclasses.replace(self, lifted=True)

    def state(self, x: SamplerState) -> State:
        """The token state a sampler's state holds: ``x``, or the state half of a lifted one.

        Examples:
            >>> Context.none(torch.zeros(1, 1, dtype=torch.long)).lift().state(torch.ones(1, 1, 4))
            tensor([[[1., 1.]]])
        """
        return split_state(x).x if self.lifted else x

    def with_state(self, x: SamplerState, state: State) -> SamplerState:
        """The sampler's state ``x`` with its token state (`state`) replaced by ``state``.

        Examples:
            >>> context = Context.none(torch.zeros(1, 1, dtype=torch.long)).lift()
            >>> context.with_state(torch.ones(1, 1, 4), torch.zeros(1, 1, 2))
            tensor([[[0., 0., 1., 1.]]])
        """
        return lift_state(state, split_state(x).previous) if self.lifted else state

    def impose(self, x: SamplerState) -> SamplerState:
        """``x`` with every known position replaced by the exact one-hot vector of its token.

        In a lifted context (`lift`), in both halves: the state and the estimate.
        """
        if x.ndim != 3 or x.shape[:2] != self.known.shape:
            raise ValueError(
                f"a state of shape {tuple(x.shape)} does not fit a context of shape "
                f"{tuple(self.known.shape)}: expected (batch, seq, vocab) with the same batch and seq"
            )
        if self.lifted:
            state, previous = split_state(x)
            return lift_state(self._one_hot_where_known(state), self._one_hot_where_known(previous))
        return self._one_hot_where_known(x)

    def _one_hot_where_known(self, x: State) -> State:
        clean = one_hot(self.tokens, x.shape[-1], dtype=x.dtype)
        return torch.where(self.known[..., None], clean, x)

    def hold(self, flow_map: FlowMap) -> "ConditionalMap":
        """``flow_map`` run with this context held at time 1 (what ``rollout(context=...)`` uses)."""
        return ConditionalMap(flow_map, self)


class ConditionalMap(nn.Module):
    r"""A flow map with a context held clean: $x \mapsto \Pi(X_{t'\to s'}(\Pi x))$.

    $\Pi$ sets the known positions to their one-hot tokens and $t'$, $s'$ are the per-token
    times with 1 on known positions (`Context.times`), so the network sees the prompt as data
    at time 1 and the returned state holds it bit for bit.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> step = XPredMap(XPredictor(lambda x, t: torch.zeros_like(x)), LinearInterpolant())
        >>> held = Context.prefix(torch.tensor([[1, 0]]), 1).hold(step)
        >>> held(torch.zeros(1, 2, 2), torch.zeros(1), torch.ones(1))
        tensor([[[0.0000, 1.0000],
                 [0.5000, 0.5000]]])
    """

    def __init__(self, flow_map: FlowMap, context: Context) -> None:
        super().__init__()
        self.flow_map = flow_map
        self.context = context

    def forward(self, x: SamplerState, t: Time, s: Time) -> SamplerState:
        r"""$X_{t\to s}$ with the known positions at time 1."""
        context = self.context
        moved = self.flow_map(context.impose(x), context.times(t), context.times(s))
        return context.impose(moved)


def _drop_rows(known: TokenMask, p_uncond: float, generator: torch.Generator | None) -> TokenMask:
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    draw = torch.rand(known.shape[0], generator=generator, device=known.device)
    return known & (draw >= p_uncond)[:, None]


def _row_rates(tokens: Tokens, generator: torch.Generator | None) -> Float[Tensor, "batch 1"]:
    return torch.rand(tokens.shape[0], 1, generator=generator, device=tokens.device)


def prefix_context(
    tokens: Tokens, *, p_uncond: float = 0.0, generator: torch.Generator | None = None
) -> Context:
    r"""A random prompt per row: the first $k$ positions known, $k \sim U\{0, \dots, L-1\}$.

    At least one position is always left to generate. Randomness is drawn on the tokens'
    device (pass a generator of that device); each process draws only its own rows, so seed
    each rank's generator differently.

    Args:
        tokens: the training batch.
        p_uncond: probability that a row's whole context is dropped.
        generator: random source, on ``tokens.device``.

    Examples:
        >>> tokens = torch.zeros(3, 4, dtype=torch.long)
        >>> known = prefix_context(tokens, generator=torch.Generator().manual_seed(0)).known
        >>> bool((known[:, 1:] <= known[:, :-1]).all() and (~known[:, -1]).all())  # prefixes
        True
    """
    batch, seq = tokens.shape
    length = torch.randint(seq, (batch, 1), generator=generator, device=tokens.device)
    known = torch.arange(seq, device=tokens.device) < length
    return Context(tokens, _drop_rows(known, p_uncond, generator))


def bernoulli_context(
    tokens: Tokens, *, p_uncond: float = 0.0, generator: torch.Generator | None = None
) -> Context:
    r"""Each position known independently with a rate drawn per row, $r \sim U[0, 1]$.

    Covers every mix of known and unknown positions, from unconditional ($r \approx 0$) to
    filling a single hole ($r \approx 1$).

    Args:
        tokens: the training batch.
        p_uncond: probability that a row's whole context is dropped.
        generator: random source, on ``tokens.device``.

    Examples:
        >>> tokens = torch.zeros(2000, 8, dtype=torch.long)
        >>> known = bernoulli_context(tokens, generator=torch.Generator().manual_seed(0)).known
        >>> round(known.float().mean().item(), 1)  # E[r] = 1/2
        0.5
    """
    rate = _row_rates(tokens, generator)
    known = torch.rand(tokens.shape, generator=generator, device=tokens.device) < rate
    return Context(tokens, _drop_rows(known, p_uncond, generator))


def span_context(
    tokens: Tokens,
    *,
    mean_span: float = 4.0,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
) -> Context:
    r"""Random spans: the row is cut into segments, each known with a per-row rate $r \sim U[0,1]$.

    A segment ends after each position with probability $1/\bar\ell$ (``mean_span``), so
    segment lengths are geometric with mean $\bar\ell$: known spans alternate with holes, as in
    infilling (both sides known).

    Args:
        tokens: the training batch.
        mean_span: mean segment length $\bar\ell \ge 1$.
        p_uncond: probability that a row's whole context is dropped.
        generator: random source, on ``tokens.device``.

    Examples:
        >>> tokens = torch.zeros(2, 12, dtype=torch.long)
        >>> span_context(tokens, generator=torch.Generator().manual_seed(1)).known.shape
        torch.Size([2, 12])
    """
    if mean_span < 1:
        raise ValueError(f"mean_span must be at least 1, got {mean_span}")
    batch, seq = tokens.shape
    device = tokens.device
    rate = _row_rates(tokens, generator)
    cuts = torch.rand(batch, seq, generator=generator, device=device) < 1.0 / mean_span
    cuts[:, 0] = False
    segment = cuts.long().cumsum(1)
    segment_known = torch.rand(batch, seq, generator=generator, device=device) < rate
    known = segment_known.gather(1, segment)
    return Context(tokens, _drop_rows(known, p_uncond, generator))
