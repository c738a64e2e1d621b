import torch

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.embedded import EmbeddedXPredictor, EmbeddedXPredMap, embedded_sample, sampled_tokens

torch.manual_seed(0)
V, B, L = 500, 4, 16  # a vocabulary larger than the model width: the noise is drawn as z R
model = DiT(V, dim=32, depth=1, heads=2)
predictor = EmbeddedXPredictor(model, chunk_size=8)  # the head runs 8 positions at a time
path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

tokens = torch.randint(V, (B, L))
for _ in range(3):  # FLM training on h = x E: no (B, L, V) noise, state or logits
    t = fl.uniform_times(B)
    h_t = embedded_sample(path, predictor.noise(B, L), predictor.embed_tokens(tokens), t)
    loss = fl.masked_mean(predictor.cross_entropy(h_t, t, tokens))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

# Sampling carries h and each step's argmax token (no (B, L, V) tensor). Same noise, same tokens:
model.eval()
x0 = torch.randn(B, L, V)
dense = fl.rollout(fl.XPredMap(fl.XPredictor(model), path), x0, fl.time_grid(8))
embedded = fl.rollout(EmbeddedXPredMap(predictor, path), predictor.embed(x0), fl.time_grid(8))
print(
    f"loss {loss.item():.3f}, NFE {embedded.nfe}, tokens identical:",
    torch.equal(sampled_tokens(embedded.x), fl.decode(dense.x)),
)
