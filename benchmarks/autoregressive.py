"""The autoregressive baseline: a `CausalTransformer` trained by next-token cross-entropy.

It is trained on the corpus windows that FLM sees (the same seeded batches, optimizer,
warm-up, clipping and EMA as ``examples/flm.py``) and samples token by token from
$p(x_i \\mid x_{<i})$ at temperature 1 with a KV cache: L network calls for L tokens. The same
class, bigger and trained longer, is the judge (``benchmarks/judge.py``).

Import it from other benchmarks (``benchmarks/`` on ``sys.path``)::

    from autoregressive import build_model, train, generate
    model = train(config, task, path)              # or loads the checkpoint at path
    tokens = generate(model, count=256, length=32, generator=generator)

Usage as a script (trains or loads, then prints the held-out perplexity and samples):
    python benchmarks/autoregressive.py [--length 32] [--dim 96] [--depth 3] [--heads 4]
        [--steps 800] [--batch-size 32] [--lr 1e-3] [--cache-dir results/cache] [--threads 1]
"""

import argparse
import dataclasses
from pathlib import Path

import torch
from harness import checkpoint_path, examples_common, load_corpus, train_on_tokens
from torch import Tensor

from flowlm import Tokens, masked_mean
from flowlm.backbones import CausalTransformer
from flowlm.metrics import GenerativePerplexity

SCORING_BATCH = 256
"""Sequences per judge call when scoring many windows."""


def build_model(config: examples_common.Config, vocab_size: int) -> CausalTransformer:
    """A causal transformer of the config's width, depth and heads, for windows of its length."""
    return CausalTransformer(
        vocab_size,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        max_len=config.length,
        dropout=config.dropout,
    )


def next_token_loss(model: CausalTransformer, tokens: Tokens) -> Tensor:
    """Mean next-token cross-entropy, every position counted."""
    return masked_mean(model.token_nll(tokens))


def train(
    config: examples_common.Config, task: examples_common.Task, path: Path, label: str = "AR"
) -> CausalTransformer:
    """Train a `build_model` network for ``config.steps`` steps, or load it from ``path``."""
    model = build_model(config, task.vocab_size)

    def objective(tokens: Tokens, generator: torch.Generator) -> Tensor:
        return next_token_loss(model, tokens)

    trained = train_on_tokens(model, objective, config, task, path, label)
    if not isinstance(trained, CausalTransformer):
        raise TypeError(f"expected a CausalTransformer, got {type(trained).__name__}")
    return trained.eval()


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


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cache-dir", type=Path, default=Path("results/cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    config = examples_common.Config(
        length=arguments.length,
        dim=arguments.dim,
        depth=arguments.depth,
        heads=arguments.heads,
        steps=arguments.steps,
        batch_size=arguments.batch_size,
        lr=arguments.lr,
        warmup=min(100, arguments.steps),
        ema_decay=0.995,
        seed=arguments.seed,
        log_every=100,
    )
    task = examples_common.build_task(config)
    path = checkpoint_path(arguments.cache_dir, "ar", dataclasses.asdict(config))
    model = train(config, task, path)
    held_out = load_corpus().fixed_windows("validation", config.length, count=1024)
    print(f"held-out perplexity: {perplexity(model, held_out):.3f} (1024 windows)")
    samples = generate(model, 4, config.length, torch.Generator().manual_seed(arguments.seed))
    for text in task.decode(samples):
        print(f"    {text!r}")
    print(f"checkpoint: {path}")


if __name__ == "__main__":
    main()
