"""The MDLM baseline in benchmarks/mdlm.py: masking schedule, SUBS, sampler, factorized failure."""

import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import mdlm


class ConstantLogits(nn.Module):
    """A backbone returning fixed logits over V + 1 ids at every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*z_t.shape, -1)


@pytest.mark.parametrize("t", [0.05, 0.5, 0.9])
def test_masked_fraction_matches_the_log_linear_schedule(t: float) -> None:
    vocab_size, batch, length = 7, 32, 1024
    model = mdlm.MaskedDiffusion(ConstantLogits(torch.zeros(vocab_size + 1)), vocab_size)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab_size, (batch, length), generator=generator)
    z_t, masked = model.mask_tokens(tokens, torch.full((batch,), t), generator)
    tolerance = 5 * math.sqrt(t * (1 - t) / masked.numel())
    assert abs(masked.float().mean().item() - t) < tolerance
    assert torch.equal(z_t[masked], torch.full_like(z_t[masked], vocab_size))
    assert torch.equal(z_t[~masked], tokens[~masked])


def test_uniform_model_loss_is_log_vocab_per_token() -> None:
    # With uniform predictions every masked position costs log V, weighted by 1/t, and a
    # position is masked with probability t: the NELBO is exactly log V per token in expectation.
    vocab_size, batch, length = 11, 4096, 16
    model = mdlm.MaskedDiffusion(ConstantLogits(torch.zeros(vocab_size + 1)), vocab_size)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(vocab_size, (batch, length), generator=generator)
    loss = model.loss(tokens, generator).item()
    assert loss == pytest.approx(math.log(vocab_size), rel=0.03)


def test_mask_logit_is_dropped_and_sampler_reveals_every_position() -> None:
    vocab_size = 5
    logits = torch.zeros(vocab_size + 1)
    logits[vocab_size] = 1e4  # a backbone that would always predict MASK
    logits[2] = 3.0
    model = mdlm.MaskedDiffusion(ConstantLogits(logits), vocab_size)
    generator = torch.Generator().manual_seed(2)
    for steps in (1, 3, 8):
        tokens, nfe = model.sample(64, 12, steps, generator)
        assert nfe == steps
        assert tokens.dtype == torch.long
        assert bool(((tokens >= 0) & (tokens < vocab_size)).all())
    assert torch.exp(model.log_probs(tokens, torch.ones(64))).sum(-1).allclose(torch.ones(1))


@pytest.mark.usefixtures("one_thread")
def test_one_step_sampling_is_factorized_and_many_steps_recover_the_joint() -> None:
    # An ideal MDLM on alpha-repeat (26 letters, length 8) is valid with probability about
    # 26**-7 at 1 step, 0.59 at 8 steps and 0.94 at 64 steps: two positions revealed in the
    # same step before any letter is visible are drawn independently.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    task = AlphaRepeat(26, 8)
    backbone = DiT(task.vocab_size + 1, dim=64, depth=2, heads=4, dropout=0.0)
    model = mdlm.MaskedDiffusion(backbone, task.vocab_size)
    start = time.perf_counter()
    losses = mdlm.train(model, task, steps=250, batch=64, learning_rate=1e-3, generator=generator)
    print(f"trained in {time.perf_counter() - start:.1f} s, last loss {losses[-1]:.3f}")
    model.eval()
    one_step, _ = model.sample(256, task.length, 1, generator)
    many_steps, nfe = model.sample(256, task.length, 64, generator)
    assert nfe == 64
    assert task.valid_rate(one_step) < 0.05
    assert task.valid_rate(many_steps) >= 0.8
