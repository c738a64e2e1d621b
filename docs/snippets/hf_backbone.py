# Needs `pip install transformers` (not a flowlm dependency).
import torch
from torch import nn
from transformers import BertConfig, BertModel

import flowlm as fl
from flowlm.data import AlphaRepeat


class EncoderBackbone(nn.Module):
    """A Hugging Face encoder that accepts `inputs_embeds`, as a flowlm Backbone.

    The state (B, L, V) is multiplied by the encoder's own token-embedding table, so a
    one-hot state embeds exactly like its tokens; a time embedding is added at every position.
    """

    def __init__(self, encoder: nn.Module, two_time: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        hidden, vocab_size = encoder.config.hidden_size, encoder.config.vocab_size
        self.time = fl.TimeEmbedding(hidden)
        self.end_time = fl.TimeEmbedding(hidden, zero_init=True) if two_time else None
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x_t: fl.State, t: fl.Time, s: fl.Time | None = None) -> fl.Logits:
        table = self.encoder.get_input_embeddings().weight  # (V, hidden)
        c = self.time(t)
        if self.end_time is not None and s is not None:
            c = c + self.end_time(s)
        embeds = x_t.to(table.dtype) @ table + c[:, None, :]
        hidden = self.encoder(inputs_embeds=embeds).last_hidden_state
        return self.head(hidden)


torch.manual_seed(0)
task = AlphaRepeat(vocab_size=6, length=5)
V = task.vocab_size
config = BertConfig(  # a tiny encoder from scratch; or BertModel.from_pretrained(name)
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=task.length,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
predictor = fl.XPredictor(EncoderBackbone(BertModel(config, add_pooling_layer=False)))
interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
optimizer = torch.optim.AdamW(predictor.parameters(), lr=3e-3)
for _ in range(100):
    tokens = task.sample(64)
    x1 = fl.one_hot(tokens, V)
    t = fl.uniform_times(len(tokens))
    x_t = interpolant.sample(torch.randn_like(x1), x1, t)
    loss = fl.masked_mean(fl.cross_entropy(predictor.logits(x_t, t), tokens))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

predictor.eval()
sampler = fl.XPredMap(predictor, interpolant)
trajectory = fl.rollout(sampler, torch.randn(64, task.length, V), fl.time_grid(8))
print(
    f"loss {loss.item():.3f}, NFE {trajectory.nfe}, valid {task.valid_rate(fl.decode(trajectory.x)):.2f}"
)
