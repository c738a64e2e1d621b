"""Optional reference networks; the flowlm core never imports them.

- `DiT`: a diffusion transformer on one-hot states with one or two time inputs (a `Backbone`).
- `CausalTransformer`: an autoregressive model with a KV cache, the baseline and the judge.
"""

from flowlm.backbones.causal import CausalTransformer
from flowlm.backbones.dit import DiT
from flowlm.backbones.layers import KVCache

__all__ = ["CausalTransformer", "DiT", "KVCache"]
