"""Pieces shared by the reference backbones: rotary positions, soft-capped attention, MLP, adaLN.

Each piece is one concept; `DiT` and `CausalTransformer` assemble them into blocks.
"""

import math

import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from flowlm._tensors import float32_or_wider


def rotary(
    x: Float[Tensor, "batch heads seq head_dim"],
    positions: Int[Tensor, " seq"],
    base: float = 10_000.0,
) -> Float[Tensor, "batch heads seq head_dim"]:
    r"""Rotary position embedding: rotate pairs of channels by an angle proportional to position.

    Channel ``j`` of the first half is paired with channel ``j + h`` of the second half
    (``h = head_dim / 2``) and the pair is rotated by $p\,\theta_j$, $\theta_j = b^{-j/h}$:

    $$(x_j, x_{j+h}) \mapsto (x_j \cos p\theta_j - x_{j+h} \sin p\theta_j,\;
    x_j \sin p\theta_j + x_{j+h} \cos p\theta_j).$$

    So the dot product of a rotated query at position $p$ and a rotated key at position $q$
    depends on the positions only through $p - q$. Angles are computed in at least fp32.

    Args:
        x: queries or keys; ``head_dim`` must be even.
        positions: the position of each entry along ``seq``.
        base: the base $b$ of the frequencies.

    Examples:
        >>> q = torch.randn(1, 2, 3, 4)
        >>> rotary(q, torch.arange(3)).shape
        torch.Size([1, 2, 3, 4])
        >>> bool(torch.equal(rotary(q, torch.zeros(3, dtype=torch.long)), q))
        True
    """
    half = x.shape[-1] // 2
    dtype = float32_or_wider(x.dtype)
    frequencies = base ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = positions.to(dtype)[:, None] * frequencies[None, :]
    cos, sin = torch.cos(angles), torch.sin(angles)
    first, second = x[..., :half].to(dtype), x[..., half:].to(dtype)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)


class KVCache:
    """Keys and values of every position one causal attention layer has processed so far.

    Create one empty cache per layer before decoding; each `Attention` call appends the
    keys and values of its new positions, so the next call only computes the new ones.

    Examples:
        >>> cache = KVCache()
        >>> keys, values = cache.extend(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
        >>> cache.length
        3
    """

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    @property
    def length(self) -> int:
        """Number of positions held."""
        return 0 if self.keys is None else self.keys.shape[2]

    def extend(
        self,
        keys: Float[Tensor, "batch heads new head_dim"],
        values: Float[Tensor, "batch heads new head_dim"],
    ) -> tuple[
        Float[Tensor, "batch heads total head_dim"], Float[Tensor, "batch heads total head_dim"]
    ]:
        """Append the keys and values of new positions; return those of all positions."""
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values


class Attention(nn.Module):
    r"""Multi-head self-attention with rotary positions and tanh soft-capped logits.

    $$a_{ij} = c \tanh\!\Big(\frac{q_i \cdot k_j}{c \sqrt{d_h}}\Big), \qquad
    y_i = \sum_j \operatorname{softmax}_j(a_{ij})\, v_j,$$

    with $c$ = ``soft_cap`` bounding the logits to $(-c, c)$. With ``causal=True``, position
    $i$ attends only to $j \le i$, and an optional `KVCache` lets the input hold only the new
    positions (their positions continue after those already cached).

    Args:
        dim: model width.
        heads: number of heads; ``dim / heads`` must be an even integer.
        causal: mask attention to the future.
        soft_cap: the cap $c$ on the attention logits.

    Examples:
        >>> attention = Attention(8, heads=2, causal=True)
        >>> attention(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, heads: int, causal: bool, soft_cap: float = 50.0) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim / heads must be an even integer for rotary, got {dim} / {heads}")
        self.heads = heads
        self.causal = causal
        self.soft_cap = soft_cap
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: Float[Tensor, "batch seq dim"], cache: KVCache | None = None
    ) -> Float[Tensor, "batch seq dim"]:
        """Attend from every position of ``x`` (after the cached ones, if any)."""
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs causal attention")
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = rotary(q, positions), rotary(k, positions)
        if cache is not None:
            k, v = cache.extend(k, v)
        scores = einsum(q, k, "b h i d, b h j d -> b h i j") / math.sqrt(q.shape[-1])
        scores = self.soft_cap * torch.tanh(scores / self.soft_cap)
        if self.causal:
            key_positions = torch.arange(k.shape[2], device=x.device)
            future = key_positions[None, :] > positions[:, None]
            scores = scores.masked_fill(future, -math.inf)
        mixed = einsum(scores.softmax(dim=-1), v, "b h i j, b h j d -> b h i d")
        return self.out(rearrange(mixed, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    r"""Position-wise feed-forward network of hidden width ``4 * dim`` with tanh-GELU.

    $$\mathrm{MLP}(x) = W_2\, \mathrm{GELU}_{\tanh}(W_1 x + b_1) + b_2.$$

    Examples:
        >>> MLP(8)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )

    def forward(self, x: Float[Tensor, "batch seq dim"]) -> Float[Tensor, "batch seq dim"]:
        """Apply the MLP at every position."""
        return self.net(x)


class AdaLNModulation(nn.Module):
    """Zero-initialised linear map from a conditioning vector to ``count`` modulation vectors.

    The outputs (shifts, scales, gates) are exactly 0 at init, so a modulated block starts as
    the identity (adaLN-Zero). Use them with `modulate`. The conditioning is one vector per
    example ``(batch, dim)`` (the outputs broadcast over positions, ``(batch, 1, dim)``) or
    one per position ``(batch, seq, dim)`` (per-token times).

    Args:
        dim: width of the conditioning vector and of each output.
        count: number of modulation vectors.

    Examples:
        >>> shift, scale = AdaLNModulation(8, count=2)(torch.randn(3, 8))
        >>> shift.shape, bool((scale == 0).all())
        (torch.Size([3, 1, 8]), True)
        >>> AdaLNModulation(8, count=2)(torch.randn(3, 5, 8)).shape
        torch.Size([2, 3, 5, 8])
    """

    def __init__(self, dim: int, count: int) -> None:
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(
        self, c: Float[Tensor, "batch dim"] | Float[Tensor, "batch seq dim"]
    ) -> Float[Tensor, "count batch 1 dim"] | Float[Tensor, "count batch seq dim"]:
        """Return the modulation vectors, stacked on the first axis (unpack them)."""
        per_position = c if c.ndim == 3 else c[:, None]
        return rearrange(
            self.linear(per_position), "b n (count d) -> count b n d", count=self.count
        )


def modulate(
    x: Float[Tensor, "batch seq dim"],
    shift: Float[Tensor, "batch 1 dim"] | Float[Tensor, "batch seq dim"],
    scale: Float[Tensor, "batch 1 dim"] | Float[Tensor, "batch seq dim"],
) -> Float[Tensor, "batch seq dim"]:
    r"""Adaptive layer-norm modulation: $x \odot (1 + \text{scale}) + \text{shift}$.

    Examples:
        >>> x = torch.randn(2, 3, 4)
        >>> bool(torch.equal(modulate(x, torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)), x))
        True
    """
    return x * (1 + scale) + shift
