"""What the quality and speed benchmarks share: the examples' recipe, samplers, caching, phases.

Not a script. Importing it puts ``examples/`` on the import path, so that the benchmarks build
the corpus task, the DiTs and the checkpoints exactly as the reference assemblies do
(``examples/common.py``, ``flm.py`` and ``fmlm.py``, imported here as ``examples_common``,
``examples_flm`` and ``examples_fmlm``). It holds:

- `ONE_PROCESS`: the examples' `Distributed` for a single CPU process.
- `load_corpus`: the King James Bible split into training and held-out books, as the
  examples split it.
- `Sampler` and `flow_sampler`: sampling at a number of steps, counting network calls.
- `checkpoint_path`: a checkpoint file named by a hash of the settings that produce it.
- `train_on_tokens`: the examples' training recipe (seeded batches, AdamW, warm-up, gradient
  clipping, EMA) for a model whose loss needs only the tokens: the AR baseline, the judge,
  MDLM and the outside peer. FLM and FMLM train with ``examples/flm.py`` and
  ``examples/fmlm.py`` themselves.
- `Phase` and `timed`: wall-clock and thread CPU seconds of a phase, with the load average.
"""

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

# The reference assemblies, from examples/ (on the path just above).
import common as examples_common  # noqa: E402
import flm as examples_flm  # noqa: E402
import fmlm as examples_fmlm  # noqa: E402

from flowlm import FlowMap, State, Tokens, decode, rollout, time_grid  # noqa: E402
from flowlm.data import TextCorpus, load_kjv  # noqa: E402

__all__ = [
    "ONE_PROCESS",
    "Phase",
    "Sampler",
    "TokenObjective",
    "checkpoint_path",
    "examples_common",
    "examples_flm",
    "examples_fmlm",
    "flow_sampler",
    "load_corpus",
    "settings_key",
    "timed",
    "train_on_tokens",
]

ONE_PROCESS = examples_common.Distributed(rank=0, world_size=1, device=torch.device("cpu"))
"""Every benchmark runs in one CPU process."""

Sampler = Callable[[int], tuple[Tokens, int]]
"""Samples at a number of steps: the tokens and the number of network calls made."""

TokenObjective = Callable[[Tokens, torch.Generator], Tensor]
"""A scalar training loss from a batch of tokens and the step's generator (for masks, times)."""


def load_corpus() -> TextCorpus:
    """The King James Bible with whole books held out, split as ``examples/common.py`` does."""
    return TextCorpus.split(load_kjv())


def flow_sampler(flow_map: FlowMap, noise: State) -> Sampler:
    """FLM or FMLM: `flowlm.rollout` from fixed noise on a uniform grid, then argmax."""

    def sample(n_steps: int) -> tuple[Tokens, int]:
        trajectory = rollout(flow_map, noise, time_grid(n_steps))
        return decode(trajectory.x), trajectory.nfe

    return sample


def settings_key(settings: dict[str, object]) -> str:
    """A short hash of JSON-able settings: equal settings give equal keys."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_path(folder: Path, kind: str, settings: dict[str, object]) -> Path:
    """``folder/kind-<hash of settings>.pt``: a checkpoint is reused only for equal settings."""
    return folder / f"{kind}-{settings_key(settings | {'kind': kind})}.pt"


def train_on_tokens(
    model: nn.Module,
    objective: TokenObjective,
    config: examples_common.Config,
    task: examples_common.Task,
    path: Path,
    label: str,
) -> nn.Module:
    """Train ``model`` with the examples' recipe, or load it from ``path``; return its EMA.

    Step ``k`` draws its batch from ``seeded_generator(seed, "train", k)``, the first draw of
    ``examples/flm.py``'s step ``k``, so every method sees the same sequences. The
    checkpoint (an examples ``training_state``) is written once, at the end; when ``path``
    exists its EMA weights are loaded and nothing trains.

    Returns:
        The EMA network, in eval mode.
    """
    ema = examples_common.make_ema(model, config.ema_decay)
    if path.exists():
        ema.load_state_dict(examples_common.load_checkpoint(path)["ema"])
        return ema.module
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    model.train()
    for step in range(config.steps):
        generator = examples_common.seeded_generator(config.seed, "train", step)
        torch.manual_seed(examples_common.derived_seed(config.seed, "dropout", step, 0))
        tokens = task.draw(config.batch_size, generator)
        loss = objective(tokens, generator)
        examples_common.optimizer_step(
            loss, optimizer, parameters, ema, model, step, config, ONE_PROCESS
        )
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            print(f"  {label} step {step + 1}/{config.steps}: loss {loss.item():.4f}", flush=True)
    state = examples_common.training_state(
        config.steps, model, ema, optimizer, task.tokenizer, config
    )
    examples_common.save_checkpoint(path, state)
    return ema.module


@dataclass
class Phase:
    """Seconds spent in one phase of a benchmark, and the machine's load around it."""

    name: str
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cached: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@contextmanager
def timed(name: str, phases: list[Phase], cached: bool = False) -> Iterator[Phase]:
    """Measure the block as a `Phase` appended to ``phases``, and print it when it ends.

    CPU seconds are the calling thread's (`time.thread_time`): the work done when torch runs
    on one thread, not inflated by other processes on a shared machine.
    """
    phase = Phase(name, load_before=os.getloadavg(), cached=cached)
    print(f"== {name}{' (cached checkpoint)' if cached else ''}", flush=True)
    wall, cpu = time.perf_counter(), time.thread_time()
    yield phase
    phase.wall_seconds = time.perf_counter() - wall
    phase.cpu_seconds = time.thread_time() - cpu
    phase.load_after = os.getloadavg()
    phases.append(phase)
    print(
        f"   {name}: {phase.wall_seconds:.1f} s wall, {phase.cpu_seconds:.1f} s CPU, "
        f"load {phase.load_after[0]:.2f}",
        flush=True,
    )
