import torch

import flowlm as fl
from flowlm.backbones import DiT

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
V, L, B = 16, 12, 8
backbone = DiT(V, dim=32, depth=1, heads=2).to(device)  # weights stay in float32
predictor = fl.XPredictor(backbone)
interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V)).to(device)
optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3)

tokens = torch.randint(V, (B, L), device=device)
x1 = fl.one_hot(tokens, V)
t = fl.uniform_times(B, device=device)
x_t = interpolant.sample(torch.randn_like(x1), x1, t)  # the path stays in float32
with torch.autocast(device.type, dtype=torch.bfloat16):
    logits = predictor.logits(x_t, t)  # the transformer's matmuls run in bfloat16
    loss = fl.masked_mean(fl.cross_entropy(logits, tokens))  # computed in float32
optimizer.zero_grad(set_to_none=True)
loss.backward()  # outside autocast
optimizer.step()
print(logits.dtype, loss.dtype)

with torch.autocast(device.type, dtype=torch.bfloat16):  # sampling under autocast too
    trajectory = fl.rollout(
        fl.XPredMap(predictor, interpolant), torch.randn(4, L, V, device=device), fl.time_grid(4)
    )
print(trajectory.x.dtype)  # softmax and the state update run in float32
