import torch
from torch import nn

import flowlm as fl
from flowlm.data import AlphaRepeat


class TinyTransformer(nn.Module):
    """A from-scratch backbone: (x_t, t, s=None) -> logits, all of shape (batch, seq, vocab)."""

    def __init__(self, vocab_size: int, length: int, dim: int = 32, two_time: bool = False):
        super().__init__()
        self.embed = nn.Linear(vocab_size, dim, bias=False)  # a state is a float (B, L, V)
        self.position = nn.Parameter(torch.zeros(length, dim))
        self.time = fl.TimeEmbedding(dim)  # sinusoidal features -> MLP
        self.end_time = fl.TimeEmbedding(dim, zero_init=True) if two_time else None
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=4 * dim, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, x_t: fl.State, t: fl.Time, s: fl.Time | None = None) -> fl.Logits:
        c = self.time(t)
        if self.end_time is not None and s is not None:  # a flow-map student's end time
            c = c + self.end_time(s)
        h = self.embed(x_t) + self.position + c[:, None, :]
        return self.out(self.encoder(h))


torch.manual_seed(0)
task = AlphaRepeat(vocab_size=6, length=5)
V = task.vocab_size
predictor = fl.XPredictor(TinyTransformer(V, task.length))  # any Backbone fits here
interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
optimizer = torch.optim.AdamW(predictor.parameters(), lr=3e-3)
for _ in range(100):
    tokens = task.sample(64)
    x1 = fl.one_hot(tokens, V)
    t = fl.uniform_times(len(tokens))
    x_t = interp.sample(torch.randn_like(x1), x1, t)
    loss = fl.masked_mean(fl.cross_entropy(predictor.logits(x_t, t), tokens))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

predictor.eval()
trajectory = fl.rollout(
    fl.XPredMap(predictor, interp), torch.randn(128, task.length, V), fl.time_grid(8)
)
print(f"NFE {trajectory.nfe}, valid {task.valid_rate(fl.decode(trajectory.x)):.2f}")
