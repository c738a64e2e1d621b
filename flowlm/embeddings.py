"""Sinusoidal time features and the small MLP that embeds a time for a network.

Shared by `LearnedTimeWeighting` and the reference backbones.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

from flowlm._types import Time


def sinusoidal_features(
    t: Time, dim: int, max_period: float = 10_000.0
) -> Float[Tensor, "*times features"]:
    r"""Sinusoidal features of an (unscaled) time, per example or per token.

    $$\phi(t) = [\cos(t f_0), \dots, \cos(t f_{h-1}), \sin(t f_0), \dots, \sin(t f_{h-1})],
    \quad f_j = P^{-j/h},\ h = \lfloor d/2 \rfloor$$

    with a zero appended when ``dim`` is odd; a new last axis on ``t``'s shape.

    Examples:
        >>> sinusoidal_features(torch.tensor([0.0, 0.5]), 4).shape
        torch.Size([2, 4])
        >>> sinusoidal_features(torch.rand(2, 3), 4).shape
        torch.Size([2, 3, 4])
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = t.float()[..., None] * freqs
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[..., :1])], dim=-1)
    return features


class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t`` through a two-layer MLP: ``Linear → SiLU → Linear``.

    Args:
        dim: output width.
        frequency_dim: number of sinusoidal features.
        zero_init: start the last layer at zero, so the embedding is exactly 0 at init.

    Examples:
        >>> emb = TimeEmbedding(8, zero_init=True)
        >>> emb(torch.rand(3)).abs().max().item()
        0.0
    """

    def __init__(self, dim: int, frequency_dim: int = 256, zero_init: bool = False) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.hidden = nn.Linear(frequency_dim, dim)
        self.out = nn.Linear(dim, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, t: Time) -> Float[Tensor, "*times dim"]:
        """Embed times per example ``(batch,)`` or per token ``(batch, seq)``."""
        features = sinusoidal_features(t, self.frequency_dim).to(self.hidden.weight.dtype)
        return self.out(F.silu(self.hidden(features)))
