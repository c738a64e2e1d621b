import jaxtyping

# Runtime shape checks (the import hook, or the pytest plugin) must be off inside compiled
# code: dynamo cannot trace the checks. `JAXTYPING_DISABLE=1` in the environment works too.
jaxtyping.config.update("jaxtyping_disable", True)

import torch  # noqa: E402

import flowlm as fl  # noqa: E402
from flowlm.backbones import DiT  # noqa: E402

V, L, B = 16, 12, 8
backbone = DiT(V, dim=32, depth=1, heads=2)
compiled = torch.compile(backbone)  # compile the network; flowlm's loop stays eager
predictor = fl.XPredictor(compiled)
interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3)

for _ in range(3):  # the first call compiles; later calls reuse the graph
    tokens = torch.randint(V, (B, L))
    x1 = fl.one_hot(tokens, V)
    t = fl.uniform_times(B)
    x_t = interpolant.sample(torch.randn_like(x1), x1, t)
    loss = fl.masked_mean(fl.cross_entropy(predictor.logits(x_t, t), tokens))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

trajectory = fl.rollout(fl.XPredMap(predictor, interpolant), torch.randn(B, L, V), fl.time_grid(4))
torch.save(backbone.state_dict(), "flm.pt")  # save the original module: no "_orig_mod." keys
print(f"loss {loss.item():.3f}, NFE {trajectory.nfe}")
