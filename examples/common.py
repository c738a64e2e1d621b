"""What the reference assemblies share: settings, tasks, model, processes, checkpoints, reports.

`examples/flm.py` (train an FLM) and `examples/fmlm.py` (distil one into a few-step FMLM) are
each one training loop you can read top to bottom; this module holds the pieces around the
loop, so each assembly shows only what is particular to it.

- Settings: `Config` (what defines a run; saved in every checkpoint), `Options` (how this
  invocation runs it), `command_line_parser` and `parse_command_line`.
- Data: `build_task` returns a `Task` (training sequences, fixed validation sequences, a
  tokenizer and a quality measure): the embedded King James Bible or your own text, the
  synthetic ``alpha-repeat`` task, or a ``markov`` chain with an exact likelihood.
- Model: `build_backbone` (a `DiT`), `build_interpolant`, `make_ema`, `set_learning_rate`, `optimizer_step`.
- Processes: `distributed` sets up ``torchrun`` (gloo on CPU, NCCL on GPU) or one process.
- Randomness: every random draw of training step ``k`` comes from `seeded_generator`
  ``(seed, purpose, k)``, identical on every process, and each process keeps its own rows of
  the global batch (`draw_training_data`). So N processes train on exactly the batches of one
  process, and a run resumed at step ``k`` replays steps ``k+1, ...`` exactly: no random state
  needs saving.
- Checkpoints: `training_state`, `restore_training_state`, `save_checkpoint` (atomic: a crash
  mid-write leaves the previous checkpoint intact), `load_checkpoint`, `check_vocabulary`.
- Reports: `describe_run`, `validation_loss`, `sample_noise`, `sample_report`, `write_json`.
"""

import argparse
import gc
import json
import math
import os
import string
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat, CharTokenizer, MarkovChain, TextCorpus, load_kjv, load_text
from flowlm.metrics import distinct_n, token_entropy

TASKS = ("corpus", "alpha-repeat", "markov")
CLOCKS = ("token-accuracy", "identity")
SOLVERS = ("euler", "midpoint", "heun")
SCHEDULES = ("constant", "cosine")

ALPHA_SYMBOLS = 26
MARKOV_SYMBOLS = 16
MARKOV_ORDER = 1
MARKOV_SEED = 0
"""The Markov task is one fixed chain, whatever the run's seed."""
MIN_DOCUMENTS = 20
"""Your text is cut into this many pieces when it has fewer files, so 5% can be held out."""
VALIDATION_SEQUENCES = 64
VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Model times at which the validation cross-entropy is averaged (a fixed grid)."""
SHOWN_SAMPLES = 3


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; saved in its checkpoints and restored on ``--resume``."""

    task: str = "corpus"
    text: str | None = None
    length: int = 64
    dim: int = 128
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    clock: str = "token-accuracy"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 100
    schedule: str = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    sample_every: int = 500
    checkpoint_every: int = 500
    sample_steps: tuple[int, ...] = (1, 2, 4, 8)
    solver: str = "euler"
    samples: int = 64

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("task", self.task, TASKS),
            ("clock", self.clock, CLOCKS),
            ("solver", self.solver, SOLVERS),
            ("schedule", self.schedule, SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.text is not None and self.task != "corpus":
            raise ValueError(
                f"--text gives the corpus task its text; it has no use with {self.task}"
            )
        positive = ("length", "dim", "depth", "heads", "steps", "batch_size", "samples")
        positive += ("log_every", "eval_every", "sample_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.sample_steps or min(self.sample_steps) < 1:
            raise ValueError(f"sample_steps must be step counts >= 1, got {self.sample_steps}")
        if self.warmup < 0 or not 0 <= self.dropout < 1 or not 0 < self.ema_decay < 1:
            raise ValueError(
                "need warmup >= 0, 0 <= dropout < 1 and 0 < ema_decay < 1, got "
                f"{self.warmup}, {self.dropout} and {self.ema_decay}"
            )


@dataclass(frozen=True)
class Options:
    """How this invocation runs: where to save, whether to resume, threads, presets."""

    out: Path | None
    resume: bool
    sample_only: bool
    json: Path | None
    threads: int
    smoke: bool


def command_line_parser(description: str | None, default_threads: int) -> argparse.ArgumentParser:
    """The flags both assemblies take; add your own before `parse_command_line`.

    Flags that set a `Config` field are left out of the namespace unless given, so that
    given flags override the presets (or the resumed checkpoint's settings) and nothing else.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = parser.add_argument_group("invocation")
    run.add_argument("--out", type=Path, default=None, help="checkpoint file")
    run.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    run.add_argument("--sample-only", action="store_true", help="sample from --out, no training")
    run.add_argument("--json", type=Path, default=None, help="write the final metrics here")
    run.add_argument("--threads", type=int, default=default_threads, help="torch CPU threads")
    run.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (CI)")
    config = parser.add_argument_group("run settings (override the presets)")
    config.add_argument("--task", choices=TASKS, help="what to learn", default=argparse.SUPPRESS)
    config.add_argument(
        "--text", default=argparse.SUPPRESS, help="a .txt file or a folder of them (corpus task)"
    )
    for flag, kind, meaning in (
        ("--length", int, "tokens per sequence"),
        ("--dim", int, "DiT width"),
        ("--depth", int, "DiT blocks"),
        ("--heads", int, "attention heads"),
        ("--dropout", float, "dropout in the DiT blocks"),
        ("--steps", int, "optimizer steps in all"),
        ("--batch-size", int, "global batch, split over the processes"),
        ("--lr", float, "peak AdamW learning rate"),
        ("--warmup", int, "steps of linear learning-rate warm-up"),
        ("--grad-clip", float, "gradient-norm clipping"),
        ("--ema-decay", float, "decay of the weights' moving average"),
        ("--seed", int, "seed of every random draw"),
        ("--log-every", int, "steps between logged training losses"),
        ("--eval-every", int, "steps between validation losses"),
        ("--sample-every", int, "steps between sample previews"),
        ("--checkpoint-every", int, "steps between checkpoints"),
        ("--samples", int, "samples per step count in the final report"),
    ):
        config.add_argument(flag, type=kind, help=meaning, default=argparse.SUPPRESS)
    config.add_argument(
        "--clock", choices=CLOCKS, help="time reparameterization", default=argparse.SUPPRESS
    )
    config.add_argument("--solver", choices=SOLVERS, help="sampler", default=argparse.SUPPRESS)
    config.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="learning rate after the warm-up: constant, or cosine decay to 0 at the last step",
        default=argparse.SUPPRESS,
    )
    config.add_argument(
        "--sample-steps", type=int, nargs="+", help="step counts", default=argparse.SUPPRESS
    )
    config.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="train under bfloat16 autocast",
        default=argparse.SUPPRESS,
    )
    return parser


def parse_command_line(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[Options, dict[str, Any]]:
    """The invocation's `Options` and the `Config` fields given on the command line."""
    given = vars(parser.parse_args(argv))
    options = Options(**{field.name: given.pop(field.name) for field in fields(Options)})
    if options.threads < 1:
        parser.error(f"--threads must be at least 1, got {options.threads}")
    if (options.sample_only or options.resume) and options.out is None:
        parser.error("--resume and --sample-only read the checkpoint at --out: give --out")
    if "sample_steps" in given:
        given["sample_steps"] = tuple(given["sample_steps"])
    return options, given


@dataclass(frozen=True)
class Task:
    """Sequences to learn, fixed validation sequences, their vocabulary and a quality measure.

    Attributes:
        name: the task's name (one of `TASKS`).
        description: one line for the run's header.
        tokenizer: the vocabulary; saved with checkpoints.
        length: positions per sequence.
        draw: ``draw(batch_size, generator)`` returns training sequences.
        validation: fixed sequences for the validation loss.
        quality: task-specific measures of a batch of samples (entropy comes separately).
    """

    name: str
    description: str
    tokenizer: CharTokenizer
    length: int
    draw: Callable[[int, torch.Generator], fl.Tokens]
    validation: fl.Tokens
    quality: Callable[[fl.Tokens], dict[str, float]]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def decode(self, tokens: fl.Tokens) -> list[str]:
        return self.tokenizer.decode_batch(tokens)


def build_task(config: Config) -> Task:
    """The task named by ``config.task``, with sequences of ``config.length`` tokens."""
    if config.task == "alpha-repeat":
        return _alpha_repeat_task(config)
    if config.task == "markov":
        return _markov_task(config)
    return _corpus_task(config)


def _alpha_repeat_task(config: Config) -> Task:
    task = AlphaRepeat(ALPHA_SYMBOLS, config.length)
    return Task(
        name=config.task,
        description=f"alpha-repeat: one of {ALPHA_SYMBOLS} letters repeated {config.length} times",
        tokenizer=CharTokenizer(string.ascii_lowercase[:ALPHA_SYMBOLS]),
        length=config.length,
        draw=task.sample,
        validation=task.sample(VALIDATION_SEQUENCES, seeded_generator(config.seed, "validation")),
        quality=lambda tokens: {
            "valid_rate": task.valid_rate(tokens),
            "mode_coverage": task.mode_coverage(tokens),
        },
    )


def _markov_task(config: Config) -> Task:
    chain = MarkovChain(MARKOV_SYMBOLS, order=MARKOV_ORDER, seed=MARKOV_SEED)
    length = config.length
    entropy_rate = chain.entropy_rate()
    return Task(
        name=config.task,
        description=(
            f"markov: order-{MARKOV_ORDER} chain over {MARKOV_SYMBOLS} symbols, length {length}, "
            f"entropy rate {entropy_rate:.3f} nats (perplexity {np.exp(entropy_rate):.3f})"
        ),
        tokenizer=CharTokenizer(string.hexdigits[:MARKOV_SYMBOLS]),
        length=length,
        draw=lambda batch_size, generator: chain.sample(batch_size, length, generator),
        validation=chain.sample(
            VALIDATION_SEQUENCES, length, seeded_generator(config.seed, "validation")
        ),
        quality=lambda tokens: {"exact_ppl": chain.exact_perplexity(tokens)},
    )


def _corpus_task(config: Config) -> Task:
    if config.text is None:
        source, documents = "the King James Bible", load_kjv()
    else:
        source, documents = config.text, _enough_documents(load_text(config.text))
    corpus = TextCorpus.split(documents)
    for split in ("train", "validation"):
        available = corpus.tokens(split).numel()
        if available < config.length:
            raise ValueError(
                f"--length {config.length} is longer than the {split} split of {source} "
                f"({available} characters): lower --length or give more text"
            )
    windows = min(VALIDATION_SEQUENCES, corpus.tokens("validation").numel() // config.length)
    vocab_size = corpus.tokenizer.vocab_size
    known_words = {word for _, text in corpus.train for word in text.split()}

    def quality(tokens: fl.Tokens) -> dict[str, float]:
        return {
            "distinct_2": distinct_n(tokens, 2, vocab_size).item(),
            "known_words": _known_word_rate(corpus.tokenizer.decode_batch(tokens), known_words),
        }

    return Task(
        name=config.task,
        description=(
            f"corpus: {source}, {len(corpus.train)} training and {len(corpus.validation)} "
            f"validation documents, {vocab_size} characters, windows of {config.length}"
        ),
        tokenizer=corpus.tokenizer,
        length=config.length,
        draw=lambda batch_size, generator: corpus.sample_windows(
            "train", batch_size, config.length, generator
        ),
        validation=corpus.fixed_windows("validation", config.length, count=windows),
        quality=quality,
    )


def _enough_documents(documents: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Your documents, or, with fewer than `MIN_DOCUMENTS`, their text cut into that many."""
    if len(documents) >= MIN_DOCUMENTS:
        return documents
    text = "\n\n".join(text for _, text in documents)
    cuts = [len(text) * i // MIN_DOCUMENTS for i in range(MIN_DOCUMENTS + 1)]
    return [(f"part {i}", text[cuts[i] : cuts[i + 1]]) for i in range(MIN_DOCUMENTS)]


def _known_word_rate(texts: list[str], known_words: set[str]) -> float:
    """Fraction of the whole words of the samples (not the cut first and last) seen in training."""
    words = [word for text in texts for word in text.split()[1:-1]]
    return sum(word in known_words for word in words) / len(words) if words else 0.0


def build_backbone(config: Config, vocab_size: int, two_time: bool = False) -> DiT:
    """The reference DiT of ``config``'s size (METHOD.md §8)."""
    return DiT(
        vocab_size,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        two_time=two_time,
        dropout=config.dropout,
    )


def build_interpolant(config: Config, vocab_size: int) -> fl.LinearInterpolant:
    """FLM's linear path on the decoding-accuracy clock (or the identity clock, to ablate it)."""
    clock = fl.TokenAccuracy(vocab_size) if config.clock == "token-accuracy" else fl.Identity()
    return fl.LinearInterpolant(reparam=clock)


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights, kept in eval mode.

    Update it with ``ema.update_parameters(model)`` after each optimizer step; the first
    update copies the weights. Use ``ema.module`` to validate and sample.
    """
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return ema.eval()


def set_learning_rate(optimizer: Optimizer, step: int, config: Config) -> None:
    """The rate of (0-based) ``step``: linear warm-up to ``config.lr``, then ``config.schedule``.

    ``cosine`` multiplies ``config.lr`` by (1 + cos(pi p)) / 2, with p the fraction of the steps
    after the warm-up that are done: it reaches 0 at the last step.
    """
    if step < config.warmup:
        rate = config.lr * (step + 1) / config.warmup
    elif config.schedule == "cosine":
        done = (step - config.warmup + 1) / max(1, config.steps - config.warmup)
        rate = config.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    else:
        rate = config.lr
    for group in optimizer.param_groups:
        group["lr"] = rate


def optimizer_step(
    loss: Tensor,
    optimizer: Optimizer,
    parameters: list[nn.Parameter],
    ema: AveragedModel,
    network: nn.Module,
    step: int,
    config: Config,
    processes: "Distributed",
) -> Tensor:
    """One update of (0-based) ``step``: learning rate, backward, clipping, AdamW, EMA.

    Returns the loss averaged over the processes. A loss that is not finite on any process stops
    every process before it reaches the weights, so saved checkpoints stay finite.
    """
    mean_loss = processes.mean(loss.detach())
    if not bool(torch.isfinite(mean_loss)):
        raise FloatingPointError(
            f"step {step + 1}: the training loss is {mean_loss.item()}; stopped before the "
            "update (the last checkpoint is kept). Try a lower --lr or float32."
        )
    set_learning_rate(optimizer, step, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    optimizer.step()
    ema.update_parameters(network)
    return mean_loss


@dataclass(frozen=True)
class Distributed:
    """This process's place among the processes of the run.

    Attributes:
        rank: this process's index.
        world_size: number of processes.
        device: where this process computes.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, reports and JSON."""
        return self.rank == 0

    def rows(self, global_batch: Tensor) -> Tensor:
        """This process's rows of a batch drawn identically by every process."""
        size = global_batch.shape[0] // self.world_size
        return global_batch[self.rank * size : (self.rank + 1) * size]

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the processes."""
        if self.world_size == 1:
            return value
        total = value.clone()
        torch.distributed.all_reduce(total)
        return total / self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` whose gradients are averaged over the processes (DDP), when there are several."""
        if self.world_size == 1:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def share(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The main process's ``payload``, on every process."""
        if self.world_size == 1:
            return payload
        box = [payload]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


@contextmanager
def distributed() -> Iterator[Distributed]:
    """The processes of a ``torchrun`` launch (gloo on CPU, NCCL on GPU), or this one alone."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        yield Distributed(rank=0, world_size=1, device=torch.device("cuda" if cuda else "cpu"))
        return
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Distributed(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            device=device,
        )
    finally:
        # Free unreachable DDP wrappers (reference cycles) while their process group is alive:
        # collected later, during interpreter shutdown, gloo aborts the process (SIGABRT,
        # "terminate called without an active exception"; seen in 1 of 8 two-process runs).
        gc.collect()
        torch.distributed.destroy_process_group()


def derived_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 64-bit seed that depends only on ``(seed, purpose, *indices)``, in every process."""
    key = [seed, zlib.crc32(purpose.encode()), *indices]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


def seeded_generator(seed: int, purpose: str, *indices: int) -> torch.Generator:
    """A CPU generator seeded by `derived_seed`: e.g. ``(seed, "train", step)``."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, *indices))


def draw_training_data(
    task: Task, batch_size: int, generator: torch.Generator, processes: Distributed
) -> tuple[fl.Tokens, fl.State]:
    """This process's rows of a global batch of sequences and of its Gaussian noise.

    Every process draws the whole batch (``batch_size`` is global) from the same generator
    and keeps its rows: cheap at these sizes, and exactly the batch of a single process.
    """
    if batch_size % processes.world_size:
        raise ValueError(
            f"the global batch of {batch_size} does not split evenly over "
            f"{processes.world_size} processes"
        )
    tokens = task.draw(batch_size, generator)
    noise = torch.randn((*tokens.shape, task.vocab_size), generator=generator)
    return (
        processes.rows(tokens).to(processes.device),
        processes.rows(noise).to(processes.device),
    )


def training_state(
    step: int,
    model: nn.Module,
    ema: AveragedModel,
    optimizer: Optimizer,
    tokenizer: CharTokenizer,
    config: Config,
) -> dict[str, Any]:
    """What a checkpoint holds: enough to resume exactly, sample, or distil."""
    return {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "tokenizer": tokenizer.state_dict(),
        "config": asdict(config),
    }


def restore_training_state(
    checkpoint: Mapping[str, Any], model: nn.Module, ema: AveragedModel, optimizer: Optimizer
) -> int:
    """Load a `training_state` into the model, its average and the optimizer; return the step."""
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint["step"]


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one.

    ``write`` fills a temporary file in the same folder, which is flushed to disk and then
    renamed over ``path`` (an atomic replacement). If writing fails, the temporary file is
    removed; if the process is killed, a stray ``.partial`` file may remain beside ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Save a `training_state` atomically (see `atomic_write`)."""
    atomic_write(path, lambda file: torch.save(dict(state), file))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_vocabulary(checkpoint: Mapping[str, Any], tokenizer: CharTokenizer, path: Path) -> None:
    """Raise if the checkpoint was trained on another vocabulary than the task's."""
    saved = CharTokenizer.from_state_dict(checkpoint["tokenizer"])
    if saved != tokenizer:
        raise ValueError(
            f"the checkpoint {path} was trained on a vocabulary of {saved.vocab_size} symbols "
            f"({saved.alphabet[:40]!r}), but this task has {tokenizer.vocab_size} "
            f"({tokenizer.alphabet[:40]!r}): pass the task it was trained on, or another --out"
        )


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def describe_run(
    title: str,
    config: Config,
    options: Options,
    processes: Distributed,
    task: Task,
    model: nn.Module,
) -> str:
    """The run's header: what runs where, how fast the machine is busy, and the data's quality."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    precision = "bf16 autocast" if config.bf16 else "fp32"
    data_quality = {"entropy": token_entropy(task.validation).mean().item()}
    data_quality |= task.quality(task.validation)
    return "\n".join(
        (
            f"{title}: {task.description}",
            f"device {processes.device} x {processes.world_size} process(es), "
            f"{options.threads} thread(s) each, training in {precision}, sampling in fp32, "
            f"load average {load} on {os.cpu_count()} cores",
            f"model: DiT dim {config.dim}, depth {config.depth}, heads {config.heads}, "
            f"{parameter_count(model):,} parameters, {config.clock} clock",
            f"training: {config.steps} steps, global batch {config.batch_size}, "
            f"lr {config.lr} ({config.schedule} after warm-up {config.warmup}), "
            f"EMA {config.ema_decay}, seed {config.seed}",
            f"validation data: {format_metrics(data_quality)}",
        )
    )


def format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(
        f"{name} {value}" if isinstance(value, int) else f"{name} {value:.4f}"
        for name, value in metrics.items()
    )


@torch.no_grad()
def validation_loss(
    logits: Callable[[fl.State, fl.Time], fl.Logits],
    interpolant: fl.Interpolant,
    tokens: fl.Tokens,
    vocab_size: int,
    seed: int,
) -> float:
    r"""Mean cross-entropy $-\log \hat x_1[x]$ on fixed sequences, noise and times.

    Averaged over `VALIDATION_TIMES`; the noise is the same at every call. This is
    $\mathbb{E}_t\,\mathrm{CE}(x \mid x_t)$ on a grid, not a likelihood bound (METHOD.md §9).
    """
    generator = seeded_generator(seed, "validation-noise")
    x1 = fl.one_hot(tokens, vocab_size)
    losses = []
    for time_value in VALIDATION_TIMES:
        noise = torch.randn(x1.shape, generator=generator).to(x1.device)
        t = torch.full((len(tokens),), time_value, device=x1.device)
        x_t = interpolant.sample(noise, x1, t)
        losses.append(fl.masked_mean(fl.cross_entropy(logits(x_t, t), tokens)))
    return torch.stack(losses).mean().item()


def sample_noise(config: Config, task: Task, count: int, device: torch.device) -> fl.State:
    """The same starting noise for every report of a run: ``count`` sequences."""
    generator = seeded_generator(config.seed, "sample")
    return torch.randn((count, task.length, task.vocab_size), generator=generator).to(device)


def sample_report(
    flow_map: fl.FlowMap, label: str, task: Task, config: Config, device: torch.device
) -> dict[str, dict[str, float]]:
    """Sample with ``flow_map`` (named ``label``) at each of ``config.sample_steps``; print and
    return the metrics.

    For each step count: the network calls counted by `flowlm.rollout` (``nfe``), the mean
    unigram entropy of the samples and the task's quality measures. The same noise starts
    every step count.
    """
    noise = sample_noise(config, task, config.samples, device)
    report: dict[str, dict[str, float]] = {}
    for n_steps in config.sample_steps:
        started = time.perf_counter()
        trajectory = fl.rollout(flow_map, noise, fl.time_grid(n_steps))
        tokens = fl.decode(trajectory.x).cpu()
        metrics = {"nfe": trajectory.nfe, "entropy": token_entropy(tokens).mean().item()}
        metrics |= task.quality(tokens)
        report[str(n_steps)] = metrics
        seconds = time.perf_counter() - started
        print(f"{n_steps} step(s), {label}: {format_metrics(metrics)} ({seconds:.2f} s)")
        for text in task.decode(tokens[:SHOWN_SAMPLES]):
            print(f"    {text!r}")
    return report


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    atomic_write(path, lambda file: file.write(json.dumps(payload, indent=2).encode()))
