"""A diffusion transformer (DiT) on one-hot states, with one or two time inputs."""

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

from flowlm._checks import check_state, check_time, check_tokens
from flowlm._types import Logits, Probs, State, Time, Tokens
from flowlm.backbones.layers import MLP, AdaLNModulation, Attention, modulate
from flowlm.embeddings import TimeEmbedding


class _DiTBlock(nn.Module):
    """Pre-LayerNorm block with adaLN-Zero: bidirectional attention, then MLP, both gated."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(dim, heads, causal=False)
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim)
        self.modulation = AdaLNModulation(dim, count=6)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        h: Float[Tensor, "batch seq dim"],
        c: Float[Tensor, "batch dim"] | Float[Tensor, "batch seq dim"],
    ) -> Float[Tensor, "batch seq dim"]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        h = h + gate1 * self.dropout(
            self.attention(modulate(self.attention_norm(h), shift1, scale1))
        )
        return h + gate2 * self.dropout(self.mlp(modulate(self.mlp_norm(h), shift2, scale2)))


class DiT(nn.Module):
    r"""Diffusion transformer: a state at time ``t`` (and ``s``) to logits over the vocabulary.

    The input is a float state $x_t \in \mathbb{R}^{L \times V}$, embedded as $x_t E$ with the
    table $E \in \mathbb{R}^{V \times d}$ (a bias-free linear map, computed in the dtype of the
    weights, fp32 under autocast), or integer tokens, embedded by looking up the same table, so
    tokens and their one-hot states give identical outputs. The conditioning vector is

    $$c = \mathrm{SiLU}\big(e_t(t) + e_s(s)\big),$$

    with $e_s$ present only when ``two_time=True`` and zero at init (so a fresh two-time model
    equals the one-time model with the same other weights). Times are per example
    ``(batch,)``, giving one $c$ per example, or per token ``(batch, seq)``, giving one $c$ per
    position (per-position adaLN; a prompt is its tokens at time 1); the per-example path
    keeps its ``(batch, dim)`` cost. Each block is pre-LayerNorm with
    adaLN-Zero (shift, scale, gate for attention and for the MLP), rotary positions,
    bidirectional attention with logits soft-capped at 50, and a tanh-GELU MLP of width $4d$.
    The output layer is LayerNorm, adaLN (shift, scale) and a linear map $d \to V$; the
    modulations and the output map start at zero, so the model predicts exactly uniform
    probabilities at init.

    With ``self_conditioning=True`` the network also reads a previous estimate
    $\hat x_1' \in \mathbb{R}^{L \times V}$ (self-conditioning, see
    `flowlm.self_conditioning`): the input embedding becomes
    $x_t E + \hat x_1' P$ with a bias-free $P \in \mathbb{R}^{V \times d}$ that starts at zero,
    so a fresh model ignores the estimate, and no estimate (``previous=None``) means
    $\hat x_1' = 0$. The map is created after every other weight, so the other weights of a
    seeded model are the same with or without it. On the embedded path the estimate enters
    as its product $q = \hat x_1'P$ (`previous_table`,
    ``embedded_features(h, t, previous=q)``; see `flowlm.embedded_self_conditioning`).

    Args:
        vocab_size: $V$, entries per position.
        dim: model width $d$.
        depth: number of blocks.
        heads: attention heads; ``dim / heads`` must be even.
        two_time: also condition on a second time ``s`` (a flow map $X_{t \to s}$).
        dropout: dropout on the attention and MLP outputs.
        frequency_dim: sinusoidal features per time embedding.
        self_conditioning: also read a previous estimate ``previous`` (zero-initialised map).

    Examples:
        >>> model = DiT(5, dim=16, depth=1, heads=2)
        >>> logits = model(torch.rand(2, 3, 5), torch.rand(2))
        >>> logits.shape, bool((logits == 0).all())
        (torch.Size([2, 3, 5]), True)
        >>> conditioned = DiT(5, dim=16, depth=1, heads=2, self_conditioning=True)
        >>> x, t, previous = torch.rand(2, 3, 5), torch.rand(2), torch.rand(2, 3, 5)
        >>> torch.equal(conditioned(x, t, previous=previous), conditioned(x, t))  # P = 0 at init
        True
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        depth: int = 8,
        heads: int = 8,
        two_time: bool = False,
        dropout: float = 0.1,
        frequency_dim: int = 256,
        self_conditioning: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.two_time = two_time
        self.embedding = nn.Embedding(vocab_size, dim)
        self.time_embedding = TimeEmbedding(dim, frequency_dim)
        self.target_time_embedding = (
            TimeEmbedding(dim, frequency_dim, zero_init=True) if two_time else None
        )
        self.blocks = nn.ModuleList(_DiTBlock(dim, heads, dropout) for _ in range(depth))
        self.output_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.output_modulation = AdaLNModulation(dim, count=2)
        self.output = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.previous_embedding = (
            nn.Linear(vocab_size, dim, bias=False) if self_conditioning else None
        )
        if self.previous_embedding is not None:
            nn.init.zeros_(self.previous_embedding.weight)

    def forward(
        self,
        x_t: State | Tokens,
        t: Time,
        s: Time | None = None,
        /,
        previous: Probs | None = None,
    ) -> Logits:
        """Logits of the data at every position, given the state ``x_t`` at time ``t`` (and ``s``).

        ``previous`` is the self-conditioning estimate (models built with
        ``self_conditioning=True`` only; ``None`` means zeros).

        Raises:
            ValueError: on a wrong shape or vocabulary, a batch mismatch between ``x_t`` and the
                times, ``s`` passed to a one-time model or missing from a two-time model, or
                ``previous`` passed to a model without self-conditioning or of the wrong shape.
        """
        h = self._embed(x_t)
        embedded_previous = None if previous is None else self._embed_previous(previous, h)
        return self.forward_embedded(h, t, s, previous=embedded_previous)

    @property
    def input_table(self) -> Float[Tensor, "vocab dim"]:
        r"""The input table $E$ ($V \times d$): a state $x$ enters the network as $h = xE$."""
        return self.embedding.weight

    @property
    def previous_table(self) -> Float[Tensor, "vocab dim"] | None:
        r"""The estimate's input table $P$ ($V \times d$; ``None`` without self-conditioning).

        An estimate $\hat x_1'$ enters the network as $\hat x_1' P$, added to $h = x_t E$; the
        table is a view of the ``previous_embedding`` weight.
        """
        return None if self.previous_embedding is None else self.previous_embedding.weight.T

    def forward_embedded(
        self,
        h: Float[Tensor, "batch seq dim"],
        t: Time,
        s: Time | None = None,
        /,
        previous: Float[Tensor, "batch seq dim"] | None = None,
    ) -> Logits:
        r"""Logits from an embedded state $h = x_t E$: ``forward(x_t, ...)`` without the table.

        ``previous`` is the embedded estimate $\hat x_1' P$ (`previous_table`), so that
        ``forward_embedded(x @ input_table, t, previous=p @ previous_table)`` equals
        ``forward(x, t, previous=p)``.

        Examples:
            >>> model = DiT(5, dim=16, depth=1, heads=2)
            >>> x, t = torch.rand(2, 3, 5), torch.rand(2)
            >>> torch.equal(model.forward_embedded(x @ model.input_table, t), model(x, t))
            True
        """
        return self.output_head(self.embedded_features(h, t, s, previous=previous))

    def embedded_features(
        self,
        h: Float[Tensor, "batch seq dim"],
        t: Time,
        s: Time | None = None,
        /,
        previous: Float[Tensor, "batch seq dim"] | None = None,
    ) -> Float[Tensor, "batch seq dim"]:
        r"""The features `output_head` maps to logits, position by position, from $h = x_t E$.

        ``previous`` is the self-conditioning input in embedded form, $\hat x_1' P$ with
        $P$ = `previous_table` (``None``: no estimate): the network reads $h + \hat x_1' P$,
        which is how `forward` reads an estimate given over the vocabulary.

        Raises:
            ValueError: as `forward`, or on an embedded ``previous`` of another shape than ``h``.

        Examples:
            >>> model = DiT(5, dim=16, depth=1, heads=2, self_conditioning=True)
            >>> x, t, p = torch.rand(2, 3, 5), torch.rand(2), torch.rand(2, 3, 5)
            >>> assert model.previous_table is not None
            >>> features = model.embedded_features(
            ...     x @ model.input_table, t, previous=p @ model.previous_table
            ... )
            >>> torch.allclose(model.output_head(features), model(x, t, previous=p))
            True
        """
        if previous is not None:
            if self.previous_embedding is None:
                raise ValueError(
                    "this DiT has no self-conditioning input: build it with "
                    "self_conditioning=True to pass previous"
                )
            if previous.shape != h.shape:
                raise ValueError(
                    f"the embedded estimate previous has shape {tuple(previous.shape)}, the "
                    f"embedded state {tuple(h.shape)}: they must match"
                )
            h = h + previous
        check_time(t, h, "t")
        c = self.time_embedding(t)
        if self.target_time_embedding is None:
            if s is not None:
                raise ValueError("this DiT takes one time; build it with two_time=True to pass s")
        else:
            if s is None:
                raise ValueError("this DiT was built with two_time=True: pass the target time s")
            check_time(s, h, "s")
            c_s = self.target_time_embedding(s)
            if c.ndim != c_s.ndim:  # one time per example, the other per token
                c, c_s = (c[:, None], c_s) if c.ndim == 2 else (c, c_s[:, None])
            c = c + c_s
        c = F.silu(c)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.output_modulation(c)
        return modulate(self.output_norm(h), shift, scale)

    def output_head(self, features: Float[Tensor, "batch seq dim"], /) -> Logits:
        r"""The output map $d \to V$, applied to each position's features independently."""
        return self.output(features)

    def _embed_previous(
        self, previous: Probs, h: Float[Tensor, "batch seq dim"]
    ) -> Float[Tensor, "batch seq dim"]:
        if self.previous_embedding is None:
            raise ValueError(
                "this DiT has no self-conditioning input: build it with self_conditioning=True "
                "to pass previous"
            )
        check_state(previous, self.vocab_size, "previous")
        if previous.shape[:2] != h.shape[:2]:
            raise ValueError(
                f"previous has shape {tuple(previous.shape)} but the state has "
                f"(batch, seq) = {tuple(h.shape[:2])}"
            )
        weight = self.previous_embedding.weight
        with torch.autocast(previous.device.type, enabled=False):
            return previous.to(weight.dtype) @ weight.T

    def _embed(self, x_t: State | Tokens) -> Float[Tensor, "batch seq dim"]:
        table = self.embedding.weight
        if not x_t.is_floating_point():
            if x_t.ndim != 2:
                raise ValueError(f"tokens must have shape (batch, seq), got {tuple(x_t.shape)}")
            check_tokens(x_t, self.vocab_size)
            return F.embedding(x_t, table)
        check_state(x_t, self.vocab_size, "x_t")
        with torch.autocast(x_t.device.type, enabled=False):
            return x_t.to(table.dtype) @ table
