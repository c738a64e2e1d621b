"""Self-conditioning: train on the network's own estimate, sample with it for free."""

import torch

import flowlm as fl
from flowlm.backbones import DiT

V = 32
model = DiT(V, dim=64, depth=2, heads=4, self_conditioning=True)
path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
tokens = torch.randint(0, V, (8, 16))
x1 = fl.one_hot(tokens, V)
t = fl.uniform_times(8)
x_t = path.sample(torch.randn_like(x1), x1, t)
loss = fl.cross_entropy(fl.self_conditioned_logits(model, x_t, t), tokens).mean()  # train

sampler = fl.SelfConditionedMap(model, path)  # guidance=3.0 for guidance on the estimate
trajectory = fl.rollout(sampler, fl.lift_state(torch.randn(4, 16, V)), fl.time_grid(8))
tokens = fl.decode(fl.split_state(trajectory.x).x)  # 8 network calls
