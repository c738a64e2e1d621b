"""flowlm: composable, typed flow components for language modeling.

Noise at model time ``t = 0``, one-hot data at ``t = 1``; path time ``gamma = kappa(t)``;
flow maps go from ``t`` to ``s``. See the documentation's home page for the conventions.
"""

from flowlm._types import (
    ExampleTime,
    Grid,
    Logits,
    Probs,
    State,
    Time,
    Times,
    TokenLoss,
    TokenMask,
    Tokens,
    TokenTime,
)
from flowlm.conditioning import Guidance, Replacement, block_rollout
from flowlm.context import (
    ConditionalMap,
    Context,
    bernoulli_context,
    prefix_context,
    span_context,
)
from flowlm.embedded_self_conditioning import (
    EmbeddedSelfConditionedMap,
    EmbeddedWithPrevious,
    draw_embedded_previous,
    embedded_self_conditioned_loss,
)
from flowlm.embeddings import TimeEmbedding, sinusoidal_features
from flowlm.gamma_sampling import GammaSampling
from flowlm.heads import LearnedTimeWeighting, XPredictor, cross_entropy, masked_mean
from flowlm.interpolants import (
    CosineInterpolant,
    Interpolant,
    LinearInterpolant,
    SqrtNoiseInterpolant,
    one_hot,
)
from flowlm.network_calls import NetworkCalls, count_network_calls, record_network_call
from flowlm.protocols import (
    Backbone,
    FlowMap,
    Predictor,
    TwoTimeMap,
    TwoTimePredictor,
    VelocityField,
)
from flowlm.recipes import SoftCapped, diagonal_split, soft_cap, split_semigroup_kl_loss
from flowlm.reparam import (
    Composed,
    Identity,
    Power,
    TimeReparam,
    TokenAccuracy,
    decoding_accuracy,
    linear_snr,
)
from flowlm.self_conditioning import (
    SelfConditionedMap,
    WithOwnEstimate,
    WithPrevious,
    draw_previous,
    lift_state,
    self_conditioned_logits,
    split_state,
)
from flowlm.solvers import (
    Euler,
    Heun,
    Midpoint,
    Substeps,
    TaylorMap,
    Trajectory,
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
    "EmbeddedSelfConditionedMap",
    "EmbeddedWithPrevious",
    "Euler",
    "ExampleTime",
    "FlowMap",
    "GammaSampling",
    "Grid",
    "Guidance",
    "Heun",
    "Identity",
    "Interpolant",
    "LearnedTimeWeighting",
    "LinearInterpolant",
    "Logits",
    "Midpoint",
    "NetworkCalls",
    "Power",
    "Predictor",
    "Probs",
    "Replacement",
    "SelfConditionedMap",
    "SoftCapped",
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
    "TokenTime",
    "Tokens",
    "Trajectory",
    "TwoTimeMap",
    "TwoTimePredictor",
    "VelocityField",
    "WithOwnEstimate",
    "WithPrevious",
    "XPredMap",
    "XPredVelocity",
    "XPredictor",
    "bernoulli_context",
    "block_rollout",
    "count_network_calls",
    "cross_entropy",
    "decode",
    "decoding_accuracy",
    "diagonal_split",
    "draw_embedded_previous",
    "draw_previous",
    "embedded_self_conditioned_loss",
    "lift_state",
    "linear_snr",
    "masked_mean",
    "one_hot",
    "prefix_context",
    "record_network_call",
    "rollout",
    "self_conditioned_logits",
    "sinusoidal_features",
    "soft_cap",
    "span_context",
    "split_semigroup_kl_loss",
    "split_state",
    "time_grid",
    "time_pairs",
    "uniform_times",
]
