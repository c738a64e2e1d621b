"""Shape aliases used in every flowlm signature.

The axis names are shared, so jaxtyping checks that a state, its time and its logits agree:
``batch`` examples, ``seq`` positions, ``vocab`` entries per position.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch seq"]
"""Integer token ids."""
State = Float[Tensor, "batch seq vocab"]
"""A point of the flow: one vector in R^vocab per position."""
Logits = Float[Tensor, "batch seq vocab"]
"""Unnormalized log-probabilities over the vocabulary."""
Probs = Float[Tensor, "batch seq vocab"]
"""Probabilities over the vocabulary (points on the simplex)."""
ExampleTime = Float[Tensor, " batch"]
"""Model time in [0, 1], one value per example."""
TokenTime = Float[Tensor, "batch seq"]
"""Model time in [0, 1], one value per token (a token at time 1 is clean: a prompt)."""
Time = ExampleTime | TokenTime
"""Model time in [0, 1]: one value per example ``(batch,)`` or per token ``(batch, seq)``."""
Times = Float[Tensor, "*times"]
"""Any tensor of times, handled elementwise (reparameterizations act on these)."""
Grid = Float[Tensor, " knots"]
"""A monotone sequence of model times visited by a sampler."""
TokenLoss = Float[Tensor, "batch seq"]
"""A loss per token; reduce it with `flowlm.masked_mean`."""
TokenMask = Bool[Tensor, "batch seq"]
"""True where a token counts (not padding)."""
