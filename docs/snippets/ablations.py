import torch

import flowlm as fl
from flowlm import distill
from flowlm.backbones import DiT

V, L = 26, 8
predictor = fl.XPredictor(DiT(V, dim=32, depth=1, heads=2))

# The clock: one argument of the interpolant.
clocks = {
    "accuracy": fl.TokenAccuracy(V),  # the decoding-accuracy clock
    "identity": fl.Identity(),  # γ = t
    "power": fl.Power(0.5),  # γ = √t
    "composed": fl.Power(2.0) >> fl.TokenAccuracy(V),  # κ(t) = accuracy clock at t²
}
interpolant = fl.LinearInterpolant(reparam=clocks["identity"])

# The path, each with the accuracy clock of its own signal-to-noise ratio.
paths = {
    "linear": fl.LinearInterpolant(fl.TokenAccuracy(V)),
    "cosine": fl.CosineInterpolant(fl.TokenAccuracy(V, snr=fl.CosineInterpolant.signal_to_noise)),
    "sqrt-noise": fl.SqrtNoiseInterpolant(
        fl.TokenAccuracy(V, snr=fl.SqrtNoiseInterpolant.signal_to_noise)
    ),
}
interpolant = paths["cosine"]

# The solver: every sampler is a flow map, and every flow map goes into the same rollout.
velocity = fl.XPredVelocity(predictor, interpolant)
samplers = {
    "x-prediction map": fl.XPredMap(predictor, interpolant),  # FLM's step, 1 NFE
    "euler": fl.Euler(velocity),  # 1 NFE per step
    "midpoint": fl.Midpoint(velocity),  # 2 NFE per step
    "heun": fl.Heun(velocity, skip_at_data=True),  # 2 NFE per step, 1 onto the data
}
grid = fl.time_grid(8, warp=fl.Power(2.0))  # optional: smaller steps near the noise

# The distillation loss: (student, teacher, x_t, t, s) -> a loss per token.
losses = {
    "semigroup": distill.semigroup_kl_loss,
    "lagrangian": distill.lagrangian_kl_loss,
    "eulerian": distill.eulerian_kl_loss,
}

# Every combination runs through the same code.
for name, sampler in samplers.items():
    trajectory = fl.rollout(sampler, torch.randn(2, L, V), grid)
    print(f"{name:>16}: NFE {trajectory.nfe}")
student = fl.XPredMap(
    fl.XPredictor(DiT(V, dim=32, depth=1, heads=2, two_time=True)), interpolant, two_time=True
)
x1 = fl.one_hot(torch.randint(V, (2, L)), V)
t, s = fl.time_pairs(2)
x_t = interpolant.sample(torch.randn_like(x1), x1, t)
for loss_fn in losses.values():
    assert loss_fn(student, predictor, x_t, t, s).shape == (2, L)
