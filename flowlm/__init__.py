"""flowlm: composable, typed flow components for language modeling.

Noise at model time ``t = 0``, one-hot data at ``t = 1``; path time ``gamma = kappa(t)``;
flow maps go from ``t`` to ``s``. See the documentation's home page for the conventions.
"""

from flowlm._types import Grid, Logits, Probs, State, Time, Times, TokenLoss, TokenMask, Tokens
from flowlm.conditioning import Guidance, Replacement, block_rollout
from flowlm.context import (
    ConditionalMap,
    Context,
    bernoulli_context,
    prefix_context,
    span_context,
)
from flowlm.embeddings import TimeEmbedding, sinusoidal_features
from flowlm.heads import Backbone, LearnedTimeWeighting, XPredictor, cross_entropy, masked_mean
from flowlm.interpolants import (
    CosineInterpolant,
    Interpolant,
    LinearInterpolant,
    SqrtNoiseInterpolant,
    one_hot,
)
from flowlm.reparam import (
    Composed,
    Identity,
    Power,
    TimeReparam,
    TokenAccuracy,
    decoding_accuracy,
    linear_snr,
)
from flowlm.solvers import (
    Euler,
    FlowMap,
    Heun,
    Midpoint,
    Substeps,
    TaylorMap,
    Trajectory,
    VelocityField,
    XPredMap,
    XPredVelocity,
    decode,
    rollout,
    time_grid,
)
from flowlm.times import TimePair, time_pairs, uniform_times

__all__ = [
    "Backbone",
    "Composed",
    "ConditionalMap",
    "Context",
    "CosineInterpolant",
    "Euler",
    "FlowMap",
    "Grid",
    "Guidance",
    "Heun",
    "Identity",
    "Interpolant",
    "LearnedTimeWeighting",
    "LinearInterpolant",
    "Logits",
    "Midpoint",
    "Power",
    "Probs",
    "Replacement",
    "SqrtNoiseInterpolant",
    "State",
    "Substeps",
    "TaylorMap",
    "Time",
    "TimeEmbedding",
    "TimePair",
    "TimeReparam",
    "Times",
    "TokenAccuracy",
    "TokenLoss",
    "TokenMask",
    "Tokens",
    "Trajectory",
    "VelocityField",
    "XPredMap",
    "XPredVelocity",
    "XPredictor",
    "bernoulli_context",
    "block_rollout",
    "cross_entropy",
    "decode",
    "decoding_accuracy",
    "linear_snr",
    "masked_mean",
    "one_hot",
    "prefix_context",
    "rollout",
    "sinusoidal_features",
    "span_context",
    "time_grid",
    "time_pairs",
    "uniform_times",
]
