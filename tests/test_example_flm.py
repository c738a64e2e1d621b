"""Tests of the FLM reference assembly, examples/flm.py, and of examples/common.py.

The example is imported from its folder (as ``python examples/flm.py`` sees it) and its
``main(argv)`` is called in-process; the DDP test launches it under ``torchrun``.
Run the slow training test with ``pytest -m slow tests/test_example_flm.py``.
"""

import importlib
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUALITY_KEY = {"corpus": "distinct_2", "alpha-repeat": "valid_rate", "markov": "exact_ppl"}


@pytest.fixture(scope="module")
def flm() -> Iterator[ModuleType]:
    """examples/flm.py, imported with examples/ first on the path; sys.modules left as found."""
    shadowed = {name: sys.modules.pop(name, None) for name in ("common", "flm")}
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("flm")
    finally:
        sys.path.remove(str(EXAMPLES))
        for name, module in shadowed.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module


@pytest.fixture(autouse=True)
def keep_thread_count() -> Iterator[None]:
    """main() sets torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(flm: ModuleType, *args: str | Path) -> dict[str, Any]:
    return flm.main([str(arg) for arg in args])


@pytest.mark.parametrize("task", ["corpus", "alpha-repeat", "markov"])
def test_smoke_run_writes_the_documented_json(flm: ModuleType, tmp_path: Path, task: str) -> None:
    path = tmp_path / "metrics.json"
    result = run(flm, "--smoke", "--task", task, "--json", path)
    written = json.loads(path.read_text())
    assert written == result
    assert written["task"] == task
    assert written["train_steps"] == flm.SMOKE["steps"]
    assert list(written["steps"]) == ["1", "2", "4", "8"]
    for n_steps, metrics in written["steps"].items():
        assert metrics["nfe"] == int(n_steps)
        assert 0 <= metrics["entropy"] <= math.log(64)
        assert metrics[QUALITY_KEY[task]] >= 0
    assert list(written["train_loss"]) == [str(step) for step in range(1, 9)]
    assert set(written["validation"]) == {"4", "8"}


@pytest.mark.parametrize(
    ("flags", "nfe_of_three_steps"),
    [
        (["--clock", "identity"], 3),
        (["--bf16"], 3),
        (["--solver", "midpoint"], 6),
        (["--solver", "heun"], 5),  # one call on the step onto the data
    ],
)
def test_ablation_flags_run(flm: ModuleType, flags: list[str], nfe_of_three_steps: int) -> None:
    result = run(
        flm, "--smoke", "--task", "alpha-repeat", "--steps", "2", "--sample-steps", "3", *flags
    )
    assert result["steps"]["3"]["nfe"] == nfe_of_three_steps
    assert all(torch.isfinite(torch.tensor(list(result["train_loss"].values()))))


def test_resume_replays_the_uninterrupted_run_exactly(flm: ModuleType, tmp_path: Path) -> None:
    common = ["--smoke", "--task", "alpha-repeat", "--dropout", "0.1", "--checkpoint-every", "3"]
    straight = run(flm, *common, "--steps", "6", "--out", tmp_path / "straight.pt")
    run(flm, *common, "--steps", "3", "--out", tmp_path / "resumed.pt")
    resumed = run(flm, *common, "--steps", "6", "--out", tmp_path / "resumed.pt", "--resume")
    assert list(resumed["train_loss"]) == ["4", "5", "6"]
    assert resumed["train_loss"] == {step: straight["train_loss"][step] for step in "456"}
    assert resumed["validation"]["6"] == straight["validation"]["6"]
    assert resumed["steps"] == straight["steps"]


def test_sample_only_reads_the_checkpoint(flm: ModuleType, tmp_path: Path) -> None:
    checkpoint = tmp_path / "flm.pt"
    trained = run(flm, "--smoke", "--task", "markov", "--out", checkpoint)
    sampled = run(flm, "--sample-only", "--out", checkpoint, "--json", tmp_path / "m.json")
    assert sampled["train_steps"] == trained["train_steps"]
    assert sampled["steps"] == trained["steps"]
    assert "train_loss" not in sampled


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    flm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "flm.pt"
    real_save: Callable[..., None] = torch.save
    saves: list[int] = []

    def crash_on_second_save(state: object, file: Any) -> None:
        saves.append(1)
        if len(saves) == 2:
            file.write(b"the first bytes of a checkpoint")
            raise OSError("simulated crash in the middle of a checkpoint write")
        real_save(state, file)

    monkeypatch.setattr(torch, "save", crash_on_second_save)
    args = ["--smoke", "--task", "alpha-repeat", "--out", checkpoint, "--checkpoint-every", "4"]
    with pytest.raises(OSError, match="simulated crash"):
        run(flm, *args)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [checkpoint]
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    assert run(flm, *args, "--resume")["train_steps"] == flm.SMOKE["steps"]


def test_two_processes_train_like_one_on_the_same_global_batch(
    flm: ModuleType, tmp_path: Path
) -> None:
    args = "--smoke --task alpha-repeat --dropout 0 --lr 3e-3 --steps 10".split()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    path = tmp_path / "ddp.json"
    launched = subprocess.run(
        [*launch, str(EXAMPLES / "flm.py"), *args, "--json", str(path)],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = json.loads(path.read_text())["train_loss"]
    one = run(flm, *args)["train_loss"]
    assert list(two) == list(one) == [str(step) for step in range(1, 11)]
    assert max(abs(two[step] - one[step]) for step in one) <= 1e-5


def test_a_checkpoint_of_another_vocabulary_is_refused(flm: ModuleType, tmp_path: Path) -> None:
    checkpoint = tmp_path / "alpha.pt"
    run(flm, "--smoke", "--task", "alpha-repeat", "--steps", "1", "--out", checkpoint)
    with pytest.raises(ValueError, match=r"vocabulary of 26 symbols.*this task has 16"):
        run(flm, "--task", "markov", "--sample-only", "--out", checkpoint)


def test_an_empty_text_is_refused(flm: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        run(flm, "--smoke", "--text", tmp_path / "empty.txt")


def test_a_sequence_longer_than_the_text_is_refused(flm: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text(
        "In the beginning God created the heaven and the earth. " * 10
    )
    with pytest.raises(ValueError, match="--length 64 is longer than the validation split"):
        run(flm, "--smoke", "--text", tmp_path / "short.txt", "--length", "64")


def test_text_belongs_to_the_corpus_task(flm: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--text gives the corpus task its text"):
        run(flm, "--smoke", "--task", "markov", "--text", tmp_path)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule(flm: ModuleType, schedule: str) -> None:
    common = sys.modules["common"]
    config = common.Config(steps=110, warmup=10, lr=2.0, schedule=schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

    def rate(step: int) -> float:
        common.set_learning_rate(optimizer, step, config)
        return optimizer.param_groups[0]["lr"]

    assert [rate(step) for step in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0])
    after_warmup = [rate(step) for step in range(10, 110)]
    if schedule == "constant":
        assert after_warmup == [2.0] * 100
    else:  # (1 + cos(pi p)) with p = 0.5 at step 59, 1 at the last step
        assert rate(59) == pytest.approx(1.0)
        assert after_warmup[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a > b for a, b in itertools.pairwise(after_warmup))


def test_a_non_finite_loss_stops_before_the_update(flm: ModuleType) -> None:
    common = sys.modules["common"]
    network = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in network.parameters()]
    parameters = list(network.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    ema = common.make_ema(network, 0.9)
    one_process = common.Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    config = common.Config(warmup=0)
    loss = network(torch.ones(1, 2)).sum() * float("nan")
    with pytest.raises(FloatingPointError, match="step 4: the training loss is nan"):
        common.optimizer_step(loss, optimizer, parameters, ema, network, 3, config, one_process)
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))
    finite = network(torch.ones(1, 2)).sum()
    mean = common.optimizer_step(
        finite, optimizer, parameters, ema, network, 3, config, one_process
    )
    assert mean == finite.detach()
    assert not all(torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))


def test_an_unknown_schedule_is_refused(flm: ModuleType) -> None:
    with pytest.raises(SystemExit):
        run(flm, "--smoke", "--schedule", "linear")


@pytest.mark.slow
def test_flm_learns_alpha_repeat(flm: ModuleType) -> None:
    result = run(flm, "--task", "alpha-repeat")
    assert result["steps"]["8"]["valid_rate"] >= 0.9
