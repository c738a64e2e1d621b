"""The judge: an autoregressive model of the corpus that scores every method's samples.

A `CausalTransformer` (``benchmarks/autoregressive.py``, with its own, larger settings)
trained on windows of the training books of the King James Bible, at the character level
(V = 63). The judge perplexity of a set of samples is

    judge PPL = exp(mean over all sample tokens of -log p_judge(x_i | x_<i)),

i.e. ``flowlm.metrics.GenerativePerplexity(judge.token_nll)``. The first token of a window is
scored after the judge's BOS, like the first token of a sample. The checkpoint is cached at
``<out-dir>/judge_L{length}.pt`` and reused when present; a cached judge trained with
other settings is an error (delete the file or pass another ``--out-dir``).

Usage (trains or loads the judge of a preset, prints its held-out perplexity):
    python benchmarks/judge.py --preset quick          # L = 32, a few minutes on 2 cores
    python benchmarks/judge.py --preset full --out-dir results
"""

import argparse
import dataclasses
from pathlib import Path

from autoregressive import perplexity, train
from harness import TrainingSettings, load_corpus, parse_flags, saved_settings

from flowlm.backbones import CausalTransformer
from flowlm.data import TextCorpus

JUDGES: dict[str, TrainingSettings] = {
    "smoke": TrainingSettings(
        length=8, dim=16, depth=1, heads=2, steps=4, batch_size=8, lr=1e-3, warmup=2, log_every=2
    ),
    "quick": TrainingSettings(
        length=32,
        dim=128,
        depth=3,
        heads=4,
        steps=1200,
        batch_size=32,
        lr=1e-3,
        warmup=100,
        ema_decay=0.995,
        log_every=200,
    ),
    "full": TrainingSettings(
        length=64,
        dim=128,
        depth=4,
        heads=4,
        steps=3000,
        batch_size=32,
        lr=1e-3,
        warmup=100,
        ema_decay=0.998,
        log_every=500,
    ),
}
"""The judge of each preset of ``benchmarks/quality.py``: bigger or longer-trained than the
baselines it scores."""

VALIDATION_WINDOWS = 4096
"""Held-out windows scored for the judge's validation perplexity (fewer if they do not fit)."""


def judge_path(results_dir: Path, length: int) -> Path:
    return results_dir / f"judge_L{length}.pt"


def load_or_train(
    settings: TrainingSettings, corpus: TextCorpus, results_dir: Path
) -> CausalTransformer:
    """The judge of ``settings``: loaded from ``results_dir`` when cached, trained otherwise.

    Raises:
        ValueError: if the cached judge was trained with other settings.
    """
    path = judge_path(results_dir, settings.length)
    if path.exists() and (saved := saved_settings(path)) != settings:
        raise ValueError(
            f"the judge cached at {path} was trained with other settings ({saved}); "
            f"delete it to train the judge of {settings}"
        )
    return train(settings, corpus, path, label="judge")


def held_out_report(
    judge: CausalTransformer, corpus: TextCorpus, length: int
) -> dict[str, float | int]:
    """The judge's perplexity on non-overlapping windows of the held-out books."""
    count = min(VALIDATION_WINDOWS, corpus.tokens("validation").numel() // length)
    windows = corpus.fixed_windows("validation", length, count=count)
    return {"validation_ppl": perplexity(judge, windows), "validation_windows": count}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(JUDGES), default="quick")


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    settings = JUDGES["smoke" if arguments.quick else arguments.preset]
    corpus = load_corpus()
    judge = load_or_train(settings, corpus, arguments.out_dir)
    report = held_out_report(judge, corpus, settings.length)
    print(
        f"judge ({dataclasses.asdict(settings)}): perplexity {report['validation_ppl']:.3f} on "
        f"{report['validation_windows']} held-out windows of {settings.length} characters"
    )


if __name__ == "__main__":
    main()
