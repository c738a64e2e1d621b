import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import MarkovChain
from flowlm.metrics import token_entropy

torch.manual_seed(0)
chain = MarkovChain(vocab_size=8, order=1, seed=0)  # exact likelihood: a perfect judge
V, L, B = chain.vocab_size, 16, 32

backbone = DiT(V, dim=32, depth=1, heads=2, dropout=0.0)
predictor = fl.XPredictor(backbone)
interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
weighting = fl.LearnedTimeWeighting(dim=32)  # optional: e^{-w(t)} loss + w(t)
ema = AveragedModel(backbone, multi_avg_fn=get_ema_multi_avg_fn(0.99))
parameters = [*backbone.parameters(), *weighting.parameters()]
optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.0)

for _ in range(100):
    tokens = chain.sample(B, L)
    mask = torch.ones_like(tokens, dtype=torch.bool)  # False at padding, if any
    t = fl.uniform_times(B)  # stratified: one time per 1/B of [0, 1]
    x1 = fl.one_hot(tokens, V)
    x_t = interp.sample(torch.randn_like(x1), x1, t)
    token_loss = fl.cross_entropy(predictor.logits(x_t, t), tokens)  # (batch, seq)
    loss = fl.masked_mean(weighting(token_loss, t), mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    ema.update_parameters(backbone)

# Sample with the EMA weights from the same noise at several step counts.
sampler = fl.XPredMap(fl.XPredictor(ema.module.eval()), interp)
noise = torch.randn(256, L, V)
print(f"data: perplexity {chain.exact_perplexity(chain.sample(256, L)):.2f}")
for n_steps in (1, 4, 16):
    trajectory = fl.rollout(sampler, noise, fl.time_grid(n_steps))
    samples = fl.decode(trajectory.x)
    print(
        f"{n_steps:>2} steps, NFE {trajectory.nfe:>2}: "
        f"perplexity {chain.exact_perplexity(samples):.2f}, "
        f"entropy {token_entropy(samples).mean():.2f} nats"
    )
