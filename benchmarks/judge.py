"""The judge: an autoregressive model of the corpus that scores every method's samples.

A `CausalTransformer` (``benchmarks/autoregressive.py``, with its own, larger settings)
trained on windows of the training books of the King James Bible, at the character level
(V = 63). The judge perplexity of a set of samples is

    judge PPL = exp(mean over all sample tokens of -log p_judge(x_i | x_<i)),

i.e. ``flowlm.metrics.GenerativePerplexity(judge.token_nll)``. The first token of a window is
scored after the judge's BOS, like the first token of a sample. The checkpoint is cached at
``<results-dir>/judge_L{length}.pt`` and reused when present; a cached judge trained with
other settings is an error (delete the file or pass another ``--results-dir``).

Usage (trains or loads the judge of a preset, prints its held-out perplexity):
    python benchmarks/judge.py --preset quick          # L = 32, a few minutes on 2 cores
    python benchmarks/judge.py --preset full --results-dir results
"""

import argparse
import dataclasses
from pathlib import Path

import torch
from autoregressive import perplexity, train
from harness import examples_common, load_corpus

from flowlm.backbones import CausalTransformer
from flowlm.data import TextCorpus

Config = examples_common.Config

JUDGES: dict[str, Config] = {
    "smoke": Config(
        length=8, dim=16, depth=1, heads=2, steps=4, batch_size=8, lr=1e-3, warmup=2, log_every=2
    ),
    "quick": Config(
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
    "full": Config(
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
    config: Config, task: examples_common.Task, results_dir: Path
) -> CausalTransformer:
    """The judge of ``config``: loaded from ``results_dir`` when cached, trained otherwise.

    Raises:
        ValueError: if the cached judge was trained with other settings.
    """
    path = judge_path(results_dir, config.length)
    if path.exists():
        saved = Config(**examples_common.load_checkpoint(path)["config"])
        if saved != config:
            raise ValueError(
                f"the judge cached at {path} was trained with other settings ({saved}); "
                f"delete it to train the judge of {config}"
            )
    return train(config, task, path, label="judge")


def held_out_report(
    judge: CausalTransformer, corpus: TextCorpus, length: int
) -> dict[str, float | int]:
    """The judge's perplexity on non-overlapping windows of the held-out books."""
    count = min(VALIDATION_WINDOWS, corpus.tokens("validation").numel() // length)
    windows = corpus.fixed_windows("validation", length, count=count)
    return {"validation_ppl": perplexity(judge, windows), "validation_windows": count}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(JUDGES), default="quick")
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    config = JUDGES[arguments.preset]
    judge = load_or_train(config, examples_common.build_task(config), arguments.results_dir)
    report = held_out_report(judge, load_corpus(), config.length)
    print(
        f"judge ({dataclasses.asdict(config)}): perplexity {report['validation_ppl']:.3f} on "
        f"{report['validation_windows']} held-out windows of {config.length} characters"
    )


if __name__ == "__main__":
    main()
