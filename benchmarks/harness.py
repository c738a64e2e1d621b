"""What every benchmark shares: flags, timing, machine context, result files and verdicts.

Not a script: the benchmarks import it (Python puts ``benchmarks/`` on the import path of a
script run from it). It builds only on `flowlm` and torch:

- Flags: `parse_flags` (``--out-dir``, ``--threads``, ``--seed``, ``--quick`` plus a
  benchmark's own), whose errors are one ``error: ...`` line and exit code 2.
- Timing: `stopwatch` (wall-clock and thread CPU seconds of a block) under
  `time_interleaved`, which times candidates in shuffled order over repeats (`Timing` holds
  the medians and quartiles), and `timed`, which records a `Phase` of a run.
- Machine: `machine_context` (load average, CPU model, cores, torch threads, versions).
- Results: `write_results` (JSON and markdown), `verdict` and `print_verdicts` (PASS/FAIL).
- Sampling: `flm_interpolant` (FLM's path) and `flow_sampler`, a `Sampler` of FLM or FMLM
  from fixed noise.
- Training: `TrainingSettings` and `train_on_tokens`, the recipe of every model a benchmark
  trains itself (seeded batches, AdamW, warm-up, clipping, EMA), cached in checkpoints named
  by `checkpoint_path`; `load_corpus` and `seeded_generator` give the data and the draws.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flowlm import (
    FlowMap,
    LinearInterpolant,
    State,
    TokenAccuracy,
    Tokens,
    decode,
    rollout,
    time_grid,
)
from flowlm.data import TextCorpus, load_kjv

# -- flags ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error: ...`` line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_flags(
    doc: str | None,
    add_flags: Callable[[argparse.ArgumentParser], object] | None = None,
    argv: list[str] | None = None,
) -> argparse.Namespace:
    """The flags of a benchmark: the shared ones and those ``add_flags`` adds.

    Shared: ``--out-dir`` (also spelled ``--results-dir``; default ``results``), ``--threads``
    (torch intra-op threads, default 1, set here), ``--seed`` and ``--quick`` (a run of
    seconds, for smoke tests). The description is the first paragraph of ``doc``.
    """
    description = (doc or "").split("\n\n")[0]
    parser = _Parser(description=description)
    parser.add_argument(
        "--out-dir", "--results-dir", dest="out_dir", type=Path, default=Path("results")
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a run of seconds, for tests")
    if add_flags is not None:
        add_flags(parser)
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    return arguments


# -- timing -----------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (both the value itself for a single value)."""
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


@dataclass
class Seconds:
    """Wall-clock and thread CPU seconds: a reading of `clock`, or the difference of two.

    Thread CPU time (`time.thread_time`) does not count time the thread spent descheduled on a
    loaded machine: it is the work done when torch runs on one thread.
    """

    wall: float = 0.0
    cpu: float = 0.0

    def __sub__(self, start: "Seconds") -> "Seconds":
        return Seconds(self.wall - start.wall, self.cpu - start.cpu)


def clock() -> Seconds:
    """The wall clock (`time.perf_counter`) and this thread's CPU clock, now."""
    return Seconds(time.perf_counter(), time.thread_time())


@contextmanager
def stopwatch() -> Iterator[Seconds]:
    """Measure the block: ``with stopwatch() as seconds: ...``, then read ``seconds.wall``."""
    seconds, start = Seconds(), clock()
    try:
        yield seconds
    finally:
        seconds.wall, seconds.cpu = astuple(clock() - start)


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate, one sample per repeat.

    ``wall`` is elapsed time; ``cpu`` is the CPU time of the calling thread, which does not
    count time the thread spent descheduled on a loaded machine (it equals the work done
    only when torch runs single-threaded, as the benchmarks do by default).
    """

    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def summary(self, scale: float = 1.0) -> dict[str, object]:
        """Medians and interquartile ranges, multiplied by ``scale`` (e.g. 1e6 for us)."""
        return {
            "wall_median": self.median * scale,
            "wall_quartiles": [value * scale for value in quartiles(self.wall)],
            "cpu_median": self.cpu_median * scale,
            "cpu_quartiles": [value * scale for value in quartiles(self.cpu)],
        }


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, calls: int = 1, warmup: int = 1
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, interleaved so all share the machine's noise.

    Each candidate is first called ``warmup`` times. Then, for every repeat, each candidate
    runs ``calls`` times back to back and records the mean seconds per call; the order of the
    candidates is shuffled (seeded) from one repeat to the next, so none always runs first or
    after the same other one (heavy bfloat16 work, for one, can slow what follows it).
    """
    for run in candidates.values():
        for _ in range(warmup):
            run()
    names = list(candidates)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            run = candidates[name]
            with stopwatch() as seconds:
                for _ in range(calls):
                    run()
            cpu[name].append(seconds.cpu / calls)
            wall[name].append(seconds.wall / calls)
    return {name: Timing(wall[name], cpu[name]) for name in names}


@dataclass
class Phase:
    """Seconds spent in one phase of a benchmark, and the machine's load around it."""

    name: str
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cached: bool = False


@contextmanager
def timed(name: str, phases: list[Phase], cached: bool = False) -> Iterator[Phase]:
    """Measure the block (`stopwatch`) as a `Phase` appended to ``phases``; print it at the end."""
    phase = Phase(name, load_before=os.getloadavg(), cached=cached)
    print(f"== {name}{' (cached checkpoint)' if cached else ''}", flush=True)
    with stopwatch() as seconds:
        yield phase
    phase.wall_seconds, phase.cpu_seconds = seconds.wall, seconds.cpu
    phase.load_after = os.getloadavg()
    phases.append(phase)
    print(
        f"   {name}: {phase.wall_seconds:.1f} s wall, {phase.cpu_seconds:.1f} s CPU, "
        f"load {phase.load_after[0]:.2f}",
        flush=True,
    )


def phase_table(phases: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of the `Phase` records of a results JSON: seconds, load, cached or not."""
    lines = [
        "| phase | wall s | CPU s | load before | load after | cached |",
        "|---|---|---|---|---|---|",
    ]
    for phase in phases:
        lines.append(
            f"| {phase['name']} | {phase['wall_seconds']:.1f} | {phase['cpu_seconds']:.1f} | "
            f"{phase['load_before'][0]:.2f} | {phase['load_after'][0]:.2f} | "
            f"{'yes' if phase['cached'] else 'no'} |"
        )
    return lines


# -- machine ----------------------------------------------------------------------------------


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to two decimals."""
    return [round(value, 2) for value in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_context() -> dict[str, object]:
    """What the figures depend on: load average, CPU, torch threads and versions."""
    return {
        "load_average_1_5_15min": list(os.getloadavg()),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def describe_machine(machine: dict[str, Any]) -> str:
    """One sentence for a results table: CPU, cores, threads and load."""
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_1_5_15min"])
    return (
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch thread(s), load average {load} (1, 5, 15 min)"
    )


# -- results ----------------------------------------------------------------------------------


def write_results(out_dir: Path, name: str, report: object, table: str | None = None) -> None:
    """Write ``<out_dir>/<name>.json`` and, given a table, ``<name>.md``; print what it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if table is not None:
        path.with_suffix(".md").write_text(table + "\n")
        print(table)
    print(f"\nwrote {path}{'' if table is None else ' and ' + path.name[:-5] + '.md'}", flush=True)


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def print_verdicts(targets: list[dict[str, Any]]) -> None:
    """One line per target: ``PASS`` or ``FAIL``, the target and its measured value."""
    for target in targets:
        value = target.get("value")
        measured = "no value" if value is None else f"{float(value):.4g}"
        print(f"{verdict(bool(target['pass']))}  {target['target']} ({measured})", flush=True)


# -- sampling ---------------------------------------------------------------------------------

Sampler = Callable[[int], tuple[Tokens, int]]
"""Samples at a number of steps: the tokens and the number of network calls made."""


def flm_interpolant(vocab_size: int) -> LinearInterpolant:
    """FLM's linear path on the decoding-accuracy clock, for a vocabulary of ``vocab_size``."""
    return LinearInterpolant(reparam=TokenAccuracy(vocab_size))


def flow_sampler(flow_map: FlowMap, noise: State) -> Sampler:
    """FLM or FMLM: `flowlm.rollout` from fixed noise on a uniform grid, then argmax."""

    def sample(n_steps: int) -> tuple[Tokens, int]:
        trajectory = rollout(flow_map, noise, time_grid(n_steps))
        return decode(trajectory.x), trajectory.nfe

    return sample


# -- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """What a model trained by a benchmark is: its data, size and optimization recipe.

    Attributes:
        length: tokens per training window.
        dim, depth, heads, dropout: the backbone's size.
        steps, batch_size, lr, warmup, schedule, grad_clip, ema_decay: AdamW with a linear
            warm-up to ``lr``, then constant or cosine decay to 0 (``schedule``), gradient-norm
            clipping and an exponential moving average of the weights.
        seed: seeds the initialization and every batch.
        log_every: steps between printed losses (the only host reads of the loop).
    """

    length: int = 64
    dim: int = 128
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 100
    schedule: str = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("length", "dim", "depth", "heads", "steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not (self.lr > 0 and self.grad_clip > 0 and 0 < self.ema_decay < 1):
            raise ValueError(
                f"need lr > 0, grad_clip > 0 and 0 < ema_decay < 1, got {self.lr}, "
                f"{self.grad_clip} and {self.ema_decay}"
            )

    def learning_rate(self, step: int) -> float:
        """The rate of (0-based) ``step``: linear warm-up, then constant or cosine to 0."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        done = (step - self.warmup + 1) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


TokenObjective = Callable[[Tokens, torch.Generator], Tensor]
"""A scalar training loss from a batch of tokens and the step's generator (noise, masks, times)."""


def load_corpus() -> TextCorpus:
    """The King James Bible at the character level, with whole books held out."""
    return TextCorpus.split(load_kjv())


def seeded_generator(seed: int, purpose: str, *indices: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, purpose, *indices)``."""
    key = json.dumps([seed, purpose, *indices]).encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8]))


def settings_key(settings: dict[str, object]) -> str:
    """A short hash of JSON-able settings: equal settings give equal keys."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_path(folder: Path, kind: str, settings: dict[str, object]) -> Path:
    """``folder/kind-<hash of settings>.pt``: a checkpoint is reused only for equal settings."""
    return folder / f"{kind}-{settings_key(settings | {'kind': kind})}.pt"


def saved_settings(path: Path) -> TrainingSettings:
    """The settings stored in a checkpoint written by `train_on_tokens`."""
    return TrainingSettings(**torch.load(path, map_location="cpu", weights_only=True)["settings"])


def train_on_tokens(
    model: nn.Module,
    objective: TokenObjective,
    settings: TrainingSettings,
    corpus: TextCorpus,
    path: Path,
    label: str,
    purpose: str = "train",
) -> nn.Module:
    """Train ``model`` on corpus windows, or load it from ``path``; return its EMA in eval mode.

    Step ``k`` draws its windows, then whatever ``objective`` draws, from
    ``seeded_generator(seed, purpose, k)``: every model trained with one purpose sees the same
    windows. The loss is read on the host at log steps only, where a non-finite loss stops
    the run; the checkpoint (settings and EMA weights) is written once, at the end, and only
    when every weight is finite. When ``path`` exists its weights are loaded and nothing trains.
    """
    ema = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True
    ).eval()
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        ema.module.load_state_dict(state["ema"])
        return ema.module.eval()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    model.train()
    for step in range(settings.steps):
        generator = seeded_generator(settings.seed, purpose, step)
        tokens = corpus.sample_windows("train", settings.batch_size, settings.length, generator)
        loss = objective(tokens, generator)
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimizer.step()
        ema.update_parameters(model)
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            value = loss.item()
            print(f"  {label} step {step + 1}/{settings.steps}: loss {value:.4f}", flush=True)
            if not math.isfinite(value):
                raise FloatingPointError(f"{label}: the loss is {value} at step {step + 1}")
    weights = ema.module.state_dict()
    if not all(bool(torch.isfinite(value).all()) for value in weights.values()):
        raise FloatingPointError(f"{label}: non-finite weights after training, not saved")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save({"settings": asdict(settings), "ema": weights}, partial)
    partial.replace(path)
    return ema.module.eval()
