r"""Self-conditioning on the embedded path: the previous estimate as its product $\hat x_1'P$.

A self-conditioned backbone whose estimate input is linear, $\hat x_1' \mapsto \hat x_1'P$ with
the estimate's table $P \in \mathbb{R}^{V \times d'}$ (`flowlm.backbones.DiT`'s
``previous_table``), needs only the ``(batch, seq, d')`` product $q = \hat x_1'P$, and for an
estimate $\hat x_1' = \mathrm{softmax}(z)$ that product is an expectation of $P$'s rows, computed
from the head's features a few positions at a time (`flowlm.chunked`). So self-conditioning
(`flowlm.self_conditioning`) runs on $h = xE$ (`flowlm.embedded`) without any
``(batch, seq, vocab)`` tensor, with the same values as the dense path:

- **Training** (`draw_embedded_previous`, `embedded_self_conditioned_loss`): per example, with
  probability $\tfrac12$, $q = \mathrm{sg}(\mathrm{softmax}(f(h_t, t, 0)))P$, else $0$ (the
  coin drawn on the device as `flowlm.draw_previous` draws it, so the same generator state
  gives the same coins); the loss is taken on $f(h_t, t, q)$.
- **Sampling** (`EmbeddedSelfConditionedMap`): the explicit state is $[h, q, \text{token}]$;
  each step reads the $q$ of the step before and passes on $\hat x_1P$ next to $\hat x_1E$ and
  $\arg\max\hat x_1$, all from one chunked pass of the head: one network call per step, the
  image of `flowlm.SelfConditionedMap`'s lifted state $[x, \hat x_1']$ under $E$ and $P$.
- **Distillation** of a self-conditioned student: bind its drawn estimate with
  `EmbeddedWithPrevious` and wrap it as any embedded student,
  ``EmbeddedXPredMap(EmbeddedXPredictor(EmbeddedWithPrevious(student, q)), path, two_time=True)``
  for `flowlm.embedded_distill.embedded_semigroup_kl_loss`.
"""

from dataclasses import dataclass
from typing import Protocol, TypedDict, Unpack, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from flowlm._checks import check_state, check_time, check_token_ids_fit
from flowlm._tensors import kept_per_example
from flowlm._types import Logits, State, Time, TokenLoss, Tokens
from flowlm.chunked import (
    DEFAULT_CHUNK_SIZE,
    Features,
    Head,
    chunked_expectation,
    chunked_expectations_and_argmax,
)
from flowlm.embedded import (
    Embedded,
    EmbeddedXPredictor,
    Table,
)
from flowlm.interpolants import Interpolant

EmbeddedEstimate = Float[Tensor, "batch seq previous"]
r"""An estimate in embedded form, $q = \hat x_1'P$: one ``previous``-wide vector per position."""

EmbeddedSelfConditionedState = Float[Tensor, "batch seq _"]
r"""What `EmbeddedSelfConditionedMap` returns: $[h_s, \hat x_1P, \text{token}]$ per position.

Width ``dim + previous + 1``: the embedded state, the embedded estimate the next step reads,
and the id (as a float) of $\arg\max\hat x_1$, which after the step onto the data is the
sample (`flowlm.embedded.sampled_tokens` reads it).
"""


@runtime_checkable
class EmbeddedSelfConditionedBackbone(Protocol):
    r"""An `flowlm.embedded.EmbeddedBackbone` that also reads an estimate as $\hat x_1'P$.

    ``output_head(embedded_features(x @ input_table, t, s, previous=p @ previous_table))``
    must be the logits the backbone gives for the state ``x`` and the estimate ``p`` over the
    vocabulary (``previous=None``: no estimate). `flowlm.backbones.DiT` implements it; its
    ``previous_table`` is ``None`` when it was built without self-conditioning.
    """

    @property
    def input_table(self) -> Table:
        r"""The state's table $E$ ($V \times d$)."""
        ...

    @property
    def previous_table(self) -> Table | None:
        r"""The estimate's table $P$ ($V \times d'$), ``None`` if the backbone reads no estimate."""
        ...

    def embedded_features(
        self, h: Embedded, t: Time, s: Time | None = None, /, previous: Tensor | None = None
    ) -> Features:
        r"""Per-position features, before the output head, from $h = xE$ and $q = \hat x_1'P$."""
        ...

    def output_head(self, features: Features, /) -> Logits:
        """The position-wise last layer: features to logits."""
        ...


def _estimate_table(backbone: EmbeddedSelfConditionedBackbone) -> Table:
    r"""The backbone's estimate table $P$, or a clear error if it reads no estimate."""
    table = backbone.previous_table
    if table is None:
        raise ValueError(
            f"this {type(backbone).__name__} reads no previous estimate: build it with "
            "self-conditioning (e.g. DiT(..., self_conditioning=True))"
        )
    return table


@dataclass(frozen=True)
class EmbeddedWithPrevious:
    r"""A self-conditioned embedded backbone with its embedded estimate $q$ bound.

    ``EmbeddedWithPrevious(f, q).embedded_features(h, t[, s]) = f.embedded_features(h, t[, s],
    previous=q)``: an `flowlm.embedded.EmbeddedBackbone`, so `flowlm.embedded.EmbeddedXPredictor`,
    its losses and `flowlm.embedded.EmbeddedXPredMap` use it unchanged (the embedded
    `flowlm.WithPrevious`). Called on a dense state $x_t$ it is a plain `flowlm.Backbone`
    (logits from $x_tE$ and the bound $q$).

    Attributes:
        backbone: the self-conditioned network.
        previous: the embedded estimate $q = \hat x_1'P$ it reads (``None``: no estimate).

    Examples:
        >>> from flowlm.backbones import DiT
        >>> model = DiT(7, dim=8, depth=1, heads=2, self_conditioning=True)
        >>> h, t, q = torch.randn(2, 3, 8), torch.rand(2), torch.randn(2, 3, 8)
        >>> bound = EmbeddedXPredictor(EmbeddedWithPrevious(model, q))
        >>> torch.equal(bound.logits(h, t), model.forward_embedded(h, t, previous=q))
        True
    """

    backbone: EmbeddedSelfConditionedBackbone
    previous: EmbeddedEstimate | None

    @property
    def input_table(self) -> Table:
        r"""The backbone's state table $E$."""
        return self.backbone.input_table

    def embedded_features(self, h: Embedded, t: Time, s: Time | None = None, /) -> Features:
        """The backbone's features given the bound estimate."""
        if s is None:
            return self.backbone.embedded_features(h, t, previous=self.previous)
        return self.backbone.embedded_features(h, t, s, previous=self.previous)

    def output_head(self, features: Features, /) -> Logits:
        """The backbone's output head."""
        return self.backbone.output_head(features)

    def __call__(self, x_t: State, t: Time, s: Time | None = None, /) -> Logits:
        r"""The logits on a dense state: $h = x_tE$, then the head on the bound features."""
        check_state(x_t, self.input_table.shape[0], "x_t")
        return self.output_head(
            self.embedded_features(x_t.to(self.input_table.dtype) @ self.input_table, t, s)
        )


class EmbeddedPreviousDraw(TypedDict, total=False):
    """How `draw_embedded_previous` draws, as keywords of `embedded_self_conditioned_loss`."""

    probability: float
    """Chance that an example gets the estimate rather than zeros (default 0.5)."""
    generator: torch.Generator | None
    """Random source on the state's device."""


def draw_embedded_previous(
    backbone: EmbeddedSelfConditionedBackbone,
    h_t: Embedded,
    t: Time,
    s: Time | None = None,
    *,
    probability: float = 0.5,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint: bool = True,
) -> EmbeddedEstimate:
    r"""The training-time embedded estimate: per example, $\mathrm{sg}(\hat x_1(h_t; 0))P$ or $0$.

    `flowlm.draw_previous` in embedded form: the first call $f(h_t, t[, s], 0)$ is made
    without gradient for every example (one recorded network call), its estimate's product
    with $P$ (``previous_table``) computed ``chunk_size`` positions at a time
    (`flowlm.chunked.chunked_expectation`); then a Bernoulli coin per example, drawn like
    `flowlm.draw_previous`'s (``torch.rand(batch)`` on ``h_t``'s device from ``generator``:
    the same generator state gives the same coins), keeps it with probability
    ``probability``. The stop-gradient is on the estimate $\hat x_1'$, as on the dense path:
    $q$ is differentiable in $P$ (the gradient the dense second call gives the estimate's
    input layer), and with ``checkpoint=True`` the backward pass recomputes each chunk's
    probabilities rather than keeping them. No ``(batch, seq, vocab)`` tensor, no host read.

    Args:
        backbone: the self-conditioned embedded network.
        h_t: embedded states $x_tE$ at time ``t``.
        t: model times, per example or per token.
        s: the second time of a two-time network.
        probability: chance that an example gets the estimate rather than zeros.
        generator: random source on ``h_t``'s device.
        chunk_size: positions per chunk of the output head.
        checkpoint: recompute each chunk's probabilities in the backward pass.

    Returns:
        $q$ in the estimate table's dtype: $\hat x_1P$ or zeros, per example.

    Examples:
        >>> from flowlm.backbones import DiT
        >>> model = DiT(7, dim=8, depth=1, heads=2, self_conditioning=True)
        >>> h, t = torch.randn(4, 3, 8), torch.rand(4)
        >>> q = draw_embedded_previous(model, h, t, probability=1.0)
        >>> uniform = model.previous_table.mean(0)  # a fresh DiT predicts uniform probabilities
        >>> torch.allclose(q, uniform.expand(4, 3, 8), atol=1e-6)
        True
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability}")
    with torch.no_grad():
        features = EmbeddedXPredictor(
            EmbeddedWithPrevious(backbone, None), chunk_size=chunk_size
        ).features(h_t, t, s)
    estimate = chunked_expectation(
        backbone.output_head,
        features,
        _estimate_table(backbone),
        chunk_size=chunk_size,
        checkpoint=checkpoint,
    )
    return kept_per_example(estimate, probability, generator)


def embedded_self_conditioned_loss(
    backbone: EmbeddedSelfConditionedBackbone,
    h_t: Embedded,
    t: Time,
    tokens: Tokens,
    s: Time | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint: bool = True,
    **draw: Unpack[EmbeddedPreviousDraw],
) -> TokenLoss:
    r"""FLM's per-token loss of a self-conditioned network on $h_t$: $-\log\mathrm{softmax}(f(h_t, t, q))[x]$.

    $q$ is `draw_embedded_previous` (two network calls, the first without gradient); the
    cross-entropy is `flowlm.embedded.EmbeddedXPredictor.cross_entropy`, chunked. Equal to
    ``cross_entropy(self_conditioned_logits(backbone, x_t, t), tokens)`` on the dense state
    with $h_t = x_tE$ and the same generator state, without any ``(batch, seq, vocab)`` tensor.

    Args:
        backbone: the self-conditioned embedded network.
        h_t: embedded states $x_tE$ at time ``t``.
        t: model times, per example or per token.
        tokens: the clean tokens.
        s: the second time of a two-time network.
        chunk_size: positions per chunk of the output head.
        checkpoint: recompute each chunk's logits in the backward pass instead of storing them.
        draw: ``probability`` and ``generator`` of `draw_embedded_previous`.

    Examples:
        >>> from flowlm.backbones import DiT
        >>> model = DiT(7, dim=8, depth=1, heads=2, self_conditioning=True)
        >>> h, t, tokens = torch.randn(2, 3, 8), torch.rand(2), torch.randint(7, (2, 3))
        >>> loss = embedded_self_conditioned_loss(model, h, t, tokens)
        >>> torch.allclose(loss, torch.full((2, 3), 7.0).log())  # fresh: uniform predictions
        True
    """
    previous = draw_embedded_previous(
        backbone, h_t, t, s, chunk_size=chunk_size, checkpoint=checkpoint, **draw
    )
    predictor = EmbeddedXPredictor(EmbeddedWithPrevious(backbone, previous), chunk_size)
    return predictor.cross_entropy(h_t, t, tokens, s, checkpoint=checkpoint)


class EmbeddedSelfConditionedMap(nn.Module):
    r"""`flowlm.SelfConditionedMap` on $[h, q]$: $h = xE$ and the embedded estimate $q = \hat x_1'P$.

    $$[h, q] \mapsto [\mathrm{step}(h, \hat x_1E),\ \hat x_1P,\ \arg\max\hat x_1],\qquad
      \hat x_1 = \mathrm{softmax}(f(h, t[, s], q)),$$

    one network call per step, and $\hat x_1E$, $\hat x_1P$ and the tokens come from one
    chunked pass of the head, so no ``(batch, seq, vocab)`` tensor is allocated and nothing
    is read on the host. The state is the image under $E$ and $P$ of the dense lifted state
    $[x, \hat x_1']$ (`flowlm.lift_state`), plus the tokens as in
    `flowlm.embedded.EmbeddedXPredMap`: after the step onto the data
    `flowlm.embedded.sampled_tokens` gives the dense sampler's `flowlm.decode`. The input is
    $h$ (no estimate yet) or a previous state; `initial_state` lifts $h$ for
    ``save_states=True``. Token ids are stored in the state's dtype (float32: up to $2^{24}$).

    Args:
        backbone: the self-conditioned embedded network.
        interpolant: the path (any `flowlm.Interpolant`: its steps are linear).
        two_time: call the network with both times (FMLM's two-time denoiser).
        guidance: $w$ of $z_w = z(q) + w(z(q) - z(0))$ (guidance on the estimate, as
            `flowlm.SelfConditionedMap`'s), both in one call on a doubled batch and combined
            chunk by chunk; ``None`` for no guidance. The guided estimate is passed on.
        estimate_first: first estimate $\hat x_1$ with the incoming estimate (same times),
            then make the step self-conditioned on it: 2 calls per step (the one-step FMLM
            sampler with an estimate).
        chunk_size: positions per chunk of the output head.

    Raises:
        ValueError: if the backbone reads no estimate (``previous_table`` is ``None``).

    Examples:
        >>> from flowlm import LinearInterpolant, SelfConditionedMap, decode, lift_state, rollout
        >>> from flowlm import split_state, time_grid
        >>> from flowlm.backbones import DiT
        >>> from flowlm.embedded import sampled_tokens
        >>> model = DiT(9, dim=8, depth=1, heads=2, self_conditioning=True).eval()
        >>> path, x0 = LinearInterpolant(), torch.randn(2, 4, 9)
        >>> embedded = rollout(EmbeddedSelfConditionedMap(model, path), x0 @ model.input_table, time_grid(3))
        >>> dense = rollout(SelfConditionedMap(model, path), lift_state(x0), time_grid(3))
        >>> embedded.nfe, torch.equal(sampled_tokens(embedded.x), decode(split_state(dense.x).x))
        (3, True)
    """

    def __init__(
        self,
        backbone: EmbeddedSelfConditionedBackbone,
        interpolant: Interpolant,
        *,
        two_time: bool = False,
        guidance: float | None = None,
        estimate_first: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        _estimate_table(backbone)  # refuse a backbone that reads no estimate, here
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
        self.backbone = backbone
        self.interpolant = interpolant
        self.two_time = two_time
        self.guidance = guidance
        self.estimate_first = estimate_first
        self.chunk_size = chunk_size

    def widths(self) -> tuple[int, int]:
        r"""$(d, d')$: the widths of $h$ and of $q$ in the state."""
        return self.backbone.input_table.shape[1], _estimate_table(self.backbone).shape[1]

    def initial_state(
        self, h: Embedded, previous: EmbeddedEstimate | None = None
    ) -> EmbeddedSelfConditionedState:
        r"""$[h, q, 0]$: a state to start a rollout on (no estimate: $q = 0$), token 0.

        A rollout from it keeps one width throughout, as ``save_states=True`` needs.
        """
        width, previous_width = self.widths()
        if h.ndim != 3 or h.shape[-1] != width:
            raise ValueError(
                f"expected an embedded state (batch, seq, {width}), got {tuple(h.shape)}"
            )
        if previous is None:
            previous = h.new_zeros(*h.shape[:-1], previous_width)
        elif previous.shape != (*h.shape[:-1], previous_width):
            raise ValueError(
                f"the embedded estimate has shape {tuple(previous.shape)}, expected "
                f"{(*h.shape[:-1], previous_width)}"
            )
        return torch.cat([h, previous.to(h.dtype), h.new_zeros(*h.shape[:-1], 1)], dim=-1)

    def forward(
        self, x: Embedded | EmbeddedSelfConditionedState, t: Time, s: Time
    ) -> EmbeddedSelfConditionedState:
        r"""$[h, q] \mapsto [h_s, \hat x_1P, \arg\max\hat x_1]$: one call (two with ``estimate_first``)."""
        width, previous_width = self.widths()
        full = width + previous_width + 1
        if x.ndim != 3 or x.shape[-1] not in (width, full):
            raise ValueError(
                f"expected an embedded state (batch, seq, {width}) or a self-conditioned "
                f"embedded state (batch, seq, {full}), got {tuple(x.shape)}"
            )
        vocab = self.backbone.input_table.shape[0]
        check_token_ids_fit(vocab, x.dtype)
        h = x[..., :width]
        previous = None if x.shape[-1] == width else x[..., width : width + previous_width]
        check_time(s, h, "s")
        if self.estimate_first:
            previous = self._predict(h, t, s, previous)[1]
        x1_embedded, x1_previous, tokens = self._predict(h, t, s, previous)
        h_s = self.interpolant.step(h, x1_embedded, t, s)
        carried = x1_previous.to(h_s.dtype)
        return torch.cat([h_s, carried, tokens.unsqueeze(-1).to(h_s.dtype)], dim=-1)

    def _predict(
        self, h: Embedded, t: Time, s: Time, previous: EmbeddedEstimate | None
    ) -> tuple[Embedded, EmbeddedEstimate, Tokens]:
        r"""$\hat x_1E$, $\hat x_1P$ and $\arg\max\hat x_1$ given $q$ (guided): one recorded call."""
        network = self.backbone
        features, head = self._features(h, t, s if self.two_time else None, previous)
        (x1_embedded, x1_previous), tokens = chunked_expectations_and_argmax(
            head,
            features,
            [network.input_table, _estimate_table(network)],
            chunk_size=self.chunk_size,
        )
        return x1_embedded, x1_previous, tokens

    def _features(
        self, h: Embedded, t: Time, s: Time | None, previous: EmbeddedEstimate | None
    ) -> tuple[Tensor, Head]:
        r"""The features and the head whose softmax is $\hat x_1$ (guided logits with guidance).

        With guidance, $f(h, q)$ and $f(h, 0)$ come from one call on the doubled batch and
        are joined along the width; the head maps each half and combines the logits
        $z(q) + w(z(q) - z(0))$, chunk by chunk like any head.
        """
        network = self.backbone
        if self.guidance is None:
            predictor = EmbeddedXPredictor(EmbeddedWithPrevious(network, previous), self.chunk_size)
            return predictor.features(h, t, s), network.output_head
        if previous is None:
            previous = h.new_zeros(*h.shape[:-1], self.widths()[1])
        doubled = EmbeddedXPredictor(
            EmbeddedWithPrevious(network, torch.cat([previous, torch.zeros_like(previous)])),
            self.chunk_size,
        )
        both = doubled.features(
            torch.cat([h, h]), torch.cat([t, t]), None if s is None else torch.cat([s, s])
        )
        conditioned, unconditioned = both.chunk(2)
        width, weight = conditioned.shape[-1], self.guidance

        def guided(features: Tensor) -> Logits:
            logits = network.output_head(features[..., :width])
            return logits + weight * (logits - network.output_head(features[..., width:]))

        return torch.cat([conditioned, unconditioned], dim=-1), guided
