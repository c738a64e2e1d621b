"""The autoregressive baseline: a `CausalTransformer` trained by next-token cross-entropy.

It is trained on the corpus windows that FLM sees (the same seeded batches and recipe,
`harness.train_on_tokens`) and samples token by token from $p(x_i \\mid x_{<i})$ at
temperature 1 with a KV cache: L network calls for L tokens. The same class, bigger and
trained longer, is the judge (``benchmarks/judge.py``).

Not a script: ``benchmarks/quality.py`` and ``benchmarks/judge.py`` import it::

    from autoregressive import train, generate
    model = train(settings, corpus, path)          # or loads the checkpoint at path
    tokens = generate(model, count=256, length=32, generator=generator)
"""

from pathlib import Path

import torch
from harness import TrainingSettings, train_on_tokens
from torch import Tensor

from flowlm import Tokens, masked_mean
from flowlm.backbones import CausalTransformer
from flowlm.data import TextCorpus
from flowlm.metrics import GenerativePerplexity

SCORING_BATCH = 256
"""Sequences per call when scoring many windows."""


def build_model(settings: TrainingSettings, vocab_size: int) -> CausalTransformer:
    """A causal transformer of the settings' width, depth and heads, for their windows."""
    return CausalTransformer(
        vocab_size,
        dim=settings.dim,
        depth=settings.depth,
        heads=settings.heads,
        max_len=settings.length,
        dropout=settings.dropout,
    )


def train(
    settings: TrainingSettings, corpus: TextCorpus, path: Path, label: str = "AR"
) -> CausalTransformer:
    """Train a `build_model` network by next-token cross-entropy, or load it from ``path``."""
    torch.manual_seed(settings.seed)
    model = build_model(settings, corpus.tokenizer.vocab_size)

    def objective(tokens: Tokens, generator: torch.Generator) -> Tensor:
        return masked_mean(model.token_nll(tokens))

    trained = train_on_tokens(model, objective, settings, corpus, path, label)
    if not isinstance(trained, CausalTransformer):
        raise TypeError(f"expected a CausalTransformer, got {type(trained).__name__}")
    return trained


def generate(
    model: CausalTransformer, count: int, length: int, generator: torch.Generator
) -> Tokens:
    """``count`` samples of ``length`` tokens at temperature 1, with the KV cache."""
    return model.generate(count, length, generator=generator, use_cache=True)


def perplexity(model: CausalTransformer, tokens: Tokens) -> float:
    """Perplexity of ``tokens`` under ``model``: `GenerativePerplexity` over batches of them."""
    metric = GenerativePerplexity(model.token_nll)
    for batch in tokens.split(SCORING_BATCH):
        metric.update(batch)
    return metric.compute().item()
