r"""The embedded path: train and sample on $h = xE$ instead of the ``(batch, seq, vocab)`` state.

When a backbone's first layer is linear, $h = xE$ with its table $E \in \mathbb{R}^{V\times d}$,
the network never needs $x$ itself. On an interpolant $x_t = \sigma x_0 + \alpha e_x$,

$$h_t = x_t E = \sigma\,x_0E + \alpha\,E[x],\qquad x_0E \sim N(0, E^\top E)\ \text{per position},$$

so the noise can be drawn exactly as $zR$, $z \sim N(0, I_d)$, with $R^\top R = E^\top E$
(`noise_factor`). Every step rule of `flowlm.Interpolant.step` is linear in the state and the
prediction, so a sampler can carry $h$: $h_s = \mathrm{step}(h, \hat x_1E)$, and on the step onto the
data ($\gamma_s = 1$) the tokens are $\arg\max \hat x_1$. Training, sampling and the two-time
(FMLM) map then hold no ``(batch, seq, vocab)`` tensor at all: the head's output exists a
few positions at a time (`flowlm.chunked`). Section 4 and the flow-map
sections of the paper (arXiv 2602.16813) give the dense formulas that this reproduces exactly.

What is lost: token-space intermediate states. The state between steps is $h$ (a ``dim``-wide
vector per position), not a point of $\mathbb{R}^V$: each step gives the argmax of its
prediction, not of $x_t$, and samplers or targets that are not linear in $x$ (e.g. anything
reading $\arg\max x_t$ mid-path) need the dense path.
"""

from collections.abc import Sequence
from typing import Protocol, cast, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

from flowlm._checks import check_time, check_token_ids_fit, check_tokens, device_assert
from flowlm._tensors import broadcast_time
from flowlm._types import Logits, Probs, Time, TokenLoss, Tokens
from flowlm.chunked import (
    DEFAULT_CHUNK_SIZE,
    Features,
    chunked_cross_entropy,
    chunked_expectation_and_argmax,
    chunked_kl_divergence,
    chunked_softmax,
)
from flowlm.heads import XPredictor
from flowlm.interpolants import Interpolant
from flowlm.network_calls import record_network_call

Embedded = Float[Tensor, "batch seq dim"]
"""An embedded state $h = xE$: one ``dim``-wide vector per position."""

Table = Float[Tensor, "vocab dim"]
"""An input table $E$: row $v$ embeds token $v$."""


@runtime_checkable
class EmbeddedBackbone(Protocol):
    """A backbone whose first layer is ``x @ input_table``, runnable from that product.

    `flowlm.backbones.DiT` implements it. ``output_head(embedded_features(h, t, s))`` must be
    the logits the backbone gives for any state ``x`` with ``h = x @ input_table``, and the head
    must act on each position separately (so that it can be chunked).
    """

    @property
    def input_table(self) -> Table:
        r"""The table $E$ ($V \times d$)."""
        ...

    def embedded_features(self, h: Embedded, t: Time, s: Time | None = None, /) -> Features:
        """Per-position features, before the output head, from $h = xE$."""
        ...

    def output_head(self, features: Features, /) -> Logits:
        """The position-wise last layer: features to logits."""
        ...


def noise_factor(tables: Sequence[Float[Tensor, "vocab _"]]) -> Float[Tensor, "dims dims"]:
    r"""Upper-triangular $R$ with $R^\top R = E^\top E$ for $E = [E_1, \dots, E_k]$ side by side.

    Then $zR$ with $z \sim N(0, I)$ has the law of $\varepsilon E$, $\varepsilon \sim N(0, I_V)$:
    the joint noise of several tables (a teacher's and a student's). The Gram matrix is
    accumulated in the tables' dtype (at least float32; cost $V(\sum d_i)^2$), its Cholesky
    factor computed in float64 (cost $(\sum d_i)^3$) and returned in the tables' dtype;
    gradients flow through both, which gives an unbiased pathwise gradient of any expectation
    over the noise. Pass float64 tables for a float64 Gram.

    Raises:
        ValueError: if the tables have different vocabularies.
        RuntimeError: if the Gram matrix is singular: the tables' columns are linearly dependent,
            e.g. ``V < sum(dims)``, or a student table that is still an exact copy of its teacher's
            (then both networks can share one table and one draw).

    Examples:
        >>> table = torch.randn(50, 3)
        >>> r = noise_factor([table])
        >>> torch.allclose(r.mT @ r, table.mT @ table, atol=1e-4)
        True
    """
    joint = _side_by_side(tables)
    wide = joint.to(torch.promote_types(joint.dtype, torch.float32))
    lower, info = torch.linalg.cholesky_ex((wide.mT @ wide).to(torch.float64))
    device_assert(
        info == 0,
        "the Gram matrix of the input tables is singular: their columns are linearly dependent "
        "(a vocabulary smaller than the summed widths, or a student table equal to its teacher's)",
    )
    return lower.mT.to(joint.dtype)


def embedded_noise(
    tables: Sequence[Float[Tensor, "vocab _"]],
    batch: int,
    seq: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Float[Tensor, "batch seq _"], ...]:
    r"""Draw $\varepsilon E_i$ for every table, from one $\varepsilon \sim N(0, I_V)$ per position.

    Drawn as $zR$ (`noise_factor`) with $z \sim N(0, I_{\sum d_i})$ on the tables' device; when
    $V \le \sum d_i$ the factor may not exist and $\varepsilon$ itself is cheap, so
    $\varepsilon E$ is computed directly. Both are exact in distribution.

    Args:
        tables: one or more tables over the same vocabulary.
        batch: examples.
        seq: positions per example.
        generator: random generator on the tables' device.

    Examples:
        >>> (noise,) = embedded_noise([torch.randn(100, 4)], 2, 3)
        >>> noise.shape
        torch.Size([2, 3, 4])
    """
    joint = _side_by_side(tables)
    vocab, width = joint.shape
    direct = vocab <= width
    z = torch.randn(
        batch,
        seq,
        vocab if direct else width,
        generator=generator,
        device=joint.device,
        dtype=joint.dtype,
    )
    draw = z @ joint if direct else z @ noise_factor(tables)
    return draw.split([table.shape[1] for table in tables], dim=-1)


def embedded_sample(interpolant: Interpolant, noise: Embedded, data: Embedded, t: Time) -> Embedded:
    r"""$h_t = \sigma(\gamma)\,x_0E + \alpha(\gamma)\,E[x]$: `flowlm.Interpolant.sample` on embeddings.

    Equal to ``interpolant.sample(x0, one_hot(x), t) @ E`` when ``noise`` $= x_0E$ and
    ``data`` $= E[x]$ (`EmbeddedXPredictor.noise` and `EmbeddedXPredictor.embed_tokens`), with
    no ``(batch, seq, vocab)`` tensor; the path's vocabulary is not checked against the width.

    Examples:
        >>> from flowlm import LinearInterpolant, one_hot
        >>> table, path = torch.randn(5, 2), LinearInterpolant()
        >>> x0, tokens, t = torch.randn(1, 3, 5), torch.tensor([[0, 4, 2]]), torch.rand(1)
        >>> h_t = embedded_sample(path, x0 @ table, table[tokens], t)
        >>> torch.allclose(h_t, path.sample(x0, one_hot(tokens, 5), t) @ table, atol=1e-6)
        True
    """
    if noise.shape != data.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != data shape {tuple(data.shape)}")
    check_time(t, data)
    gamma = interpolant.reparam(t)
    out = torch.mul(noise, broadcast_time(interpolant.sigma(gamma), noise))
    return out.addcmul_(data, broadcast_time(interpolant.alpha(gamma), out))


def _side_by_side(tables: Sequence[Tensor]) -> Tensor:
    if not tables:
        raise ValueError("pass at least one input table")
    for table in tables:
        if table.ndim != 2 or not table.is_floating_point():
            raise ValueError(f"an input table is a float (vocab, dim) matrix, got {table.shape}")
    vocabularies = {table.shape[0] for table in tables}
    if len(vocabularies) != 1:
        raise ValueError(f"the tables must share one vocabulary, got sizes {sorted(vocabularies)}")
    return tables[0] if len(tables) == 1 else torch.cat(list(tables), dim=1)


class EmbeddedXPredictor(XPredictor):
    r"""An x-predictor on embedded states: $\hat x_1 = \mathrm{softmax}(f(h, t[, s]))$, $h = xE$.

    The same predictions as ``XPredictor(backbone)`` on $x$, computed from $h$; the head runs
    ``chunk_size`` positions at a time (`flowlm.chunked`), so probabilities are the only
    ``(batch, seq, vocab)`` tensor it allocates, and its losses none.

    Args:
        backbone: an `EmbeddedBackbone` (e.g. `flowlm.backbones.DiT`).
        chunk_size: positions per chunk of the output head.

    Examples:
        >>> from flowlm.backbones import DiT
        >>> dit = DiT(7, dim=8, depth=1, heads=2)
        >>> predictor = EmbeddedXPredictor(dit)
        >>> x, t = torch.rand(2, 3, 7), torch.rand(2)
        >>> torch.allclose(predictor(predictor.embed(x), t), XPredictor(dit)(x, t))
        True
    """

    def __init__(self, backbone: EmbeddedBackbone, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(cast(object, backbone), EmbeddedBackbone):
            raise TypeError(
                f"{type(backbone).__name__} is not an EmbeddedBackbone: it needs input_table, "
                "embedded_features and output_head"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
        super().__init__(cast(nn.Module, backbone))
        self.chunk_size = chunk_size

    @property
    def network(self) -> EmbeddedBackbone:
        """The wrapped backbone."""
        return cast(EmbeddedBackbone, self.backbone)

    @property
    def table(self) -> Table:
        r"""The backbone's input table $E$."""
        return self.network.input_table

    def embed(self, x: Probs) -> Embedded:
        r"""$xE$ for a state or probabilities $x$ over the vocabulary."""
        table = self.table
        if x.ndim != 3 or x.shape[-1] != table.shape[0]:
            raise ValueError(
                f"expected a (batch, seq, {table.shape[0]}) state over the vocabulary, "
                f"got {tuple(x.shape)}"
            )
        return x.to(table.dtype) @ table

    def embed_tokens(self, tokens: Tokens) -> Embedded:
        r"""$E[x]$: the embedding of one-hot data, by lookup."""
        check_tokens(tokens, self.table.shape[0])
        return F.embedding(tokens, self.table)

    def noise(self, batch: int, seq: int, *, generator: torch.Generator | None = None) -> Embedded:
        r"""Embedded noise $\varepsilon E$, drawn as $zR$ (`embedded_noise`)."""
        return embedded_noise([self.table], batch, seq, generator=generator)[0]

    def features(self, h: Embedded, t: Time, s: Time | None = None) -> Features:
        """The backbone's features before its output head, after checking the inputs.

        This is the network call (recorded with `flowlm.record_network_call`, so `rollout`
        counts it); every prediction and loss here makes exactly one.
        """
        if h.ndim != 3 or not h.is_floating_point():
            raise ValueError(f"h must be a float (batch, seq, dim) state, got {tuple(h.shape)}")
        if h.shape[-1] != self.table.shape[1]:
            raise ValueError(
                f"h has width {h.shape[-1]} but the input table embeds into {self.table.shape[1]}"
            )
        check_time(t, h)
        if s is not None:
            check_time(s, h, "s")
        features = (
            self.network.embedded_features(h, t)
            if s is None
            else self.network.embedded_features(h, t, s)
        )
        record_network_call()
        return features

    def logits(self, x_t: Embedded, t: Time, s: Time | None = None) -> Logits:
        """All logits at once (a ``(batch, seq, vocab)`` tensor; the losses avoid it)."""
        return self.network.output_head(self.features(x_t, t, s))

    def forward(self, x_t: Embedded, t: Time, s: Time | None = None) -> Probs:
        r"""Predicted data $\hat x_1$ from the embedded state ``x_t``, chunk by chunk."""
        return chunked_softmax(
            self.network.output_head, self.features(x_t, t, s), chunk_size=self.chunk_size
        )

    def embedded_prediction(
        self, h: Embedded, t: Time, s: Time | None = None
    ) -> tuple[Embedded, Tokens]:
        r"""$\hat x_1E$ and the tokens $\arg\max\hat x_1$, chunk by chunk: no ``(batch, seq, vocab)`` tensor.

        What a sampler on $h$ needs from one network call (`EmbeddedXPredMap`).
        """
        return chunked_expectation_and_argmax(
            self.network.output_head, self.features(h, t, s), self.table, chunk_size=self.chunk_size
        )

    def cross_entropy(
        self,
        h: Embedded,
        t: Time,
        tokens: Tokens,
        s: Time | None = None,
        *,
        checkpoint: bool = True,
    ) -> TokenLoss:
        r"""FLM's per-token loss $-\log\hat x_1[x]$ from ``h``, without the full logits."""
        return chunked_cross_entropy(
            self.network.output_head,
            self.features(h, t, s),
            tokens,
            chunk_size=self.chunk_size,
            checkpoint=checkpoint,
        )

    def kl_divergence(
        self,
        target: Probs,
        h: Embedded,
        t: Time,
        s: Time | None = None,
        *,
        checkpoint: bool = True,
    ) -> TokenLoss:
        r"""$\mathrm{KL}(p \,\Vert\, \hat x_1(h, t[, s]))$ per token, without the full logits."""
        return chunked_kl_divergence(
            target,
            self.network.output_head,
            self.features(h, t, s),
            chunk_size=self.chunk_size,
            checkpoint=checkpoint,
        )


SamplerState = Float[Tensor, "batch seq _"]
r"""What `EmbeddedXPredMap` returns: $[h_s, \text{token}]$, width ``dim + 1`` per position.

The first ``dim`` entries are the embedded state $h_s$; the last is the id (as a float) of
$\arg\max\hat x_1$ from the step's prediction, which after the step onto the data is the
sample (`sampled_tokens`).
"""


class EmbeddedXPredMap(nn.Module):
    r"""`flowlm.XPredMap` carried on $h = xE$: $h_s = \mathrm{step}(h, \hat x_1E)$, plus the tokens.

    It returns the `SamplerState` $[h_s, \arg\max\hat x_1]$ with
    $h_s = a\,h + b\,\hat x_1E$ (`flowlm.Interpolant.step_weights`), the image under $E$ of the
    dense step, and the most likely token of the step's prediction. On the step onto the data
    ($\gamma_s = 1$, where $(a, b) = (0, 1)$) the dense map returns $\hat x_1$, so the token
    entry is exactly the dense rollout's `flowlm.decode`: read it with `sampled_tokens`. Both
    come from one chunked pass of the head (`EmbeddedXPredictor.embedded_prediction`), so no
    ``(batch, seq, vocab)`` tensor is ever allocated, and nothing is read on the host: every
    step has the same output, whatever its times (per example or per token). With
    ``two_time=True`` the prediction is the two-time denoiser $\delta_{t,s}$ (FMLM; one call
    from noise to data). The input is $h$ (width ``dim``) or a previous `SamplerState`.

    Token ids are stored in the state's dtype, so it must represent every id exactly
    (float32 up to $2^{24}$ tokens; bfloat16 only 256).

    Args:
        predictor: the embedded x-predictor.
        interpolant: the path (any `flowlm.Interpolant`: their steps are linear).
        two_time: feed the target time to the predictor.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredMap, decode, rollout, time_grid
        >>> from flowlm.backbones import DiT
        >>> predictor = EmbeddedXPredictor(DiT(9, dim=8, depth=1, heads=2).eval())
        >>> path, x0 = LinearInterpolant(), torch.randn(2, 4, 9)
        >>> embedded = rollout(EmbeddedXPredMap(predictor, path), predictor.embed(x0), time_grid(3))
        >>> dense = rollout(XPredMap(XPredictor(predictor.backbone), path), x0, time_grid(3))
        >>> embedded.nfe, torch.equal(sampled_tokens(embedded.x), decode(dense.x))
        (3, True)
    """

    def __init__(
        self, predictor: EmbeddedXPredictor, interpolant: Interpolant, two_time: bool = False
    ) -> None:
        super().__init__()
        self.predictor = predictor
        self.interpolant = interpolant
        self.two_time = two_time

    def forward(self, x: Embedded | SamplerState, t: Time, s: Time) -> SamplerState:
        r"""$[h_s, \arg\max\hat x_1]$ from $h$ (or a `SamplerState`): one network call."""
        vocab, width = self.predictor.table.shape
        if x.ndim != 3 or x.shape[-1] not in (width, width + 1):
            raise ValueError(
                f"expected an embedded state (batch, seq, {width}) or a sampler state "
                f"(batch, seq, {width + 1}), got {tuple(x.shape)}"
            )
        check_token_ids_fit(vocab, x.dtype)
        h = x[..., :width]
        check_time(s, h, "s")
        x1_embedded, tokens = (
            self.predictor.embedded_prediction(h, t, s)
            if self.two_time
            else self.predictor.embedded_prediction(h, t)
        )
        h_s = self.interpolant.step(h, x1_embedded, t, s)
        return torch.cat([h_s, tokens.unsqueeze(-1).to(h_s.dtype)], dim=-1)


def sampler_state(h: Embedded) -> SamplerState:
    """$h$ as a `SamplerState` with token 0 (no prediction yet), to start a rollout on.

    A rollout from it keeps one width throughout, as ``save_states=True`` needs.

    Examples:
        >>> sampler_state(torch.ones(1, 2, 3)).shape
        torch.Size([1, 2, 4])
    """
    return torch.cat([h, h.new_zeros(*h.shape[:-1], 1)], dim=-1)


def sampled_tokens(state: SamplerState) -> Tokens:
    """The tokens of an `EmbeddedXPredMap` state: after the step onto the data, the sample.

    Examples:
        >>> sampled_tokens(torch.tensor([[[0.5, -1.0, 3.0]]]))
        tensor([[3]])
    """
    if state.ndim != 3 or state.shape[-1] < 2:
        raise ValueError(
            f"expected a sampler state (batch, seq, dim + 1), got {tuple(state.shape)}"
        )
    return state[..., -1].long()
