import torch

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat

torch.manual_seed(0)
task = AlphaRepeat(vocab_size=8, length=6)  # "cccccc", "ffffff", ...
V = task.vocab_size
interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))  # γ = κ(t): the accuracy clock
predictor = fl.XPredictor(DiT(V, dim=32, depth=1, heads=2, dropout=0.0))
optimizer = torch.optim.AdamW(predictor.parameters(), lr=3e-3)

for _ in range(150):  # FLM: x-prediction trained with cross-entropy
    tokens = task.sample(64)
    x1 = fl.one_hot(tokens, V)
    t = fl.uniform_times(len(tokens))
    x_t = interp.sample(torch.randn_like(x1), x1, t)
    loss = fl.masked_mean(fl.cross_entropy(predictor.logits(x_t, t), tokens))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

sampler = fl.XPredMap(predictor, interp)  # FLM's Euler step, a flow map X_{t→s}
traj = fl.rollout(sampler, torch.randn(256, task.length, V), fl.time_grid(8))
samples = fl.decode(traj.x)
print(f"loss {loss.item():.3f}, NFE {traj.nfe}, valid {task.valid_rate(samples):.2f}")
print(task.decode(samples[:4]))
