r"""Training-loop helpers that are not the method: checkpoints, weight averages, seeds, processes.

The examples' scripts use these so that each reads as one loop; none of them knows about flows.

- Checkpoints: `save_checkpoint` writes atomically (a crash leaves the previous file) with a
  SHA-256 checksum of its content; `load_checkpoint` refuses an empty, truncated, corrupted or
  foreign file with one `CheckpointError`; `remove_partial_files` deletes what a killed write
  left behind.
- `EMA`: an exponential moving average of a model's weights, updated without a host sync.
- `derived_seed` and `seeded_generator`: a generator on any device for ``(seed, purpose, step,
  rank)``, so that a resumed run replays its draws exactly and every process draws its own.
- `Processes` and `processes`: one process, or the processes of a ``torchrun`` launch.
- `learning_rate`: linear warm-up, then constant or cosine decay to 0.
- `ArgumentParser`, `add_settings`, `check_settings` and `fail`: command-line flags from a
  settings dataclass, its values checked, and configuration errors as one ``error: ...`` line
  with exit code 2.
- `require_memory` and `transformer_step_bytes`: refuse a configuration that cannot fit
  before allocating it.
- `sample_rollout`: the examples' one sampling call, whatever the sampler's state and schedule;
  `soft_capped`: a network with its logits capped, or as it is.
"""

import argparse
import copy
import dataclasses
import gc
import hashlib
import io
import math
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

import numpy as np
import torch
import torch.distributed
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flowlm._types import State
from flowlm.conditioning import block_rollout
from flowlm.context import Context, bernoulli_context, prefix_context, span_context
from flowlm.data.tasks import Task
from flowlm.metrics import token_entropy
from flowlm.protocols import Backbone, FlowMap
from flowlm.recipes import SoftCapped
from flowlm.self_conditioning import (
    SelfConditionedBackbone,
    SelfConditionedMap,
    lift_state,
    split_state,
)
from flowlm.solvers import Trajectory, rollout, time_grid

__all__ = [
    "EMA",
    "FLM_PAPER_PRESETS",
    "FMLM_PAPER_PRESETS",
    "TRAINING_CONTEXTS",
    "ArgumentParser",
    "CheckpointError",
    "Processes",
    "add_run_flags",
    "add_settings",
    "atomic_write",
    "check_settings",
    "check_unchanged",
    "checkpoint_digest",
    "conditioning_flags",
    "derived_seed",
    "fail",
    "finite_loss",
    "learning_rate",
    "load_checkpoint",
    "optimizer_step",
    "processes",
    "remove_partial_files",
    "require_memory",
    "run_flags",
    "sample_measures",
    "sample_rollout",
    "save_checkpoint",
    "saved_run",
    "seeded_generator",
    "soft_capped",
    "template_context",
    "transformer_step_bytes",
]

# fmt: off
_PAPER_FLM: dict[str, Any] = dict(
    dim=768, depth=12, heads=12, dropout=0.1, steps=1_000_000, batch_size=512, lr=3e-4,
    warmup=2500, grad_clip=1.0, ema_decay=0.9999, bf16=True, eval_every=10_000,
    sample_every=50_000, checkpoint_every=10_000, samples=64,
)
FLM_PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "lm1b": _PAPER_FLM | dict(tokenizer="hf:bert-base-uncased", dataset="lm1b", lines=True,
                              length=128),
    "owt": _PAPER_FLM | dict(tokenizer="hf:gpt2", dataset="Skylion007/openwebtext", split="train",
                             length=1024),
}
"""The paper's FLM runs on LM1B and OpenWebText (§7): model, data and optimizer settings."""
_PAPER_FMLM: dict[str, Any] = dict(
    method="v2", steps=100_000, lr=3e-4, warmup=2500, ema_decay=0.9999, bf16=True,
    boundary_prob=1 / 32, checkpoint_every=5000, samples=64,
)
FMLM_PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "lm1b": _PAPER_FMLM | dict(batch_size=512),
    "owt": _PAPER_FMLM | dict(batch_size=128),
}
"""The paper's distillation settings, by the teacher's preset."""
# fmt: on
TRAINING_CONTEXTS: dict[str, Callable[..., Context]] = {
    "prefix": prefix_context,
    "spans": span_context,
    "bernoulli": bernoulli_context,
}
"""The ``--context`` choices: random known tokens at time 1 for conditional training."""

MAGIC = b"flowlm checkpoint v1\n"
"""The first bytes of every checkpoint; a SHA-256 digest (32 bytes) of the payload follows."""
_DIGEST_BYTES = 32


class CheckpointError(ValueError):
    """A file that is not a complete, intact checkpoint written by `save_checkpoint`."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``.

    The bytes go to a temporary ``.<name>.*.partial`` file beside ``path``, are flushed to disk
    and renamed over ``path`` (an atomic replacement). If writing fails the temporary file is
    removed; if the process is killed, `remove_partial_files` cleans it up on the next start.

    Args:
        path: the file to (re)place.
        data: its complete new content.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", b"hello")
        >>> (folder / "a.txt").read_bytes(), sorted(p.name for p in folder.iterdir())
        (b'hello', ['a.txt'])
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def remove_partial_files(path: Path) -> list[Path]:
    """Delete the temporary files that killed `atomic_write` calls for ``path`` left behind.

    Call it when a run starts, on one process only.

    Args:
        path: the file that `atomic_write` writes.

    Returns:
        The deleted files.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / ".run.pt.x1y2.partial").write_bytes(b"half a checkpoint")
        17
        >>> [p.name for p in remove_partial_files(folder / "run.pt")], list(folder.iterdir())
        (['.run.pt.x1y2.partial'], [])
    """
    stale = sorted(path.parent.glob(f".{path.name}.*.partial"))
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> str:
    """Save ``state`` (tensors, numbers, strings, lists, dicts) atomically, with a checksum.

    The file is `MAGIC`, the SHA-256 digest of the payload, then the payload (``torch.save``).

    Args:
        path: the checkpoint file.
        state: what to save.

    Returns:
        The payload's digest (hex), as `checkpoint_digest` reads it back.

    Examples:
        >>> path = Path(tempfile.mkdtemp()) / "run.pt"
        >>> digest = save_checkpoint(path, {"step": 3, "w": torch.ones(2)})
        >>> load_checkpoint(path)["step"], checkpoint_digest(path) == digest
        (3, True)
    """
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).digest()
    atomic_write(path, MAGIC + digest + payload)
    return digest.hex()


def _refusal(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a usable flowlm checkpoint ({reason}): the file is empty, truncated, "
        "corrupted or of another kind; train again or give another path"
    )


def _read_verified(path: Path) -> tuple[bytes, bytes]:
    """The digest and the payload of the checkpoint at ``path``, after checking both."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    raw = path.read_bytes()
    header = len(MAGIC) + _DIGEST_BYTES
    if len(raw) <= header or not raw.startswith(MAGIC):
        raise _refusal(path, f"{len(raw)} bytes without a checkpoint header")
    digest, payload = raw[len(MAGIC) : header], raw[header:]
    if hashlib.sha256(payload).digest() != digest:
        raise _refusal(path, "its checksum does not match its content")
    return digest, payload


def load_checkpoint(path: Path, kind: str | None = None) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, its tensors on the CPU.

    Args:
        path: the checkpoint file.
        kind: if given, the value the state's ``"kind"`` entry must have (e.g. ``"flm"``).

    Returns:
        The saved state.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file is empty, text, truncated or corrupted (checksum mismatch),
            or holds another kind of state than ``kind``.

    Examples:
        >>> path = Path(tempfile.mkdtemp()) / "run.pt"
        >>> _ = path.write_text("not a checkpoint")
        >>> load_checkpoint(path)
        Traceback (most recent call last):
        ...
        flowlm.train.CheckpointError: ... is not a usable flowlm checkpoint (16 bytes without ...
    """
    _, payload = _read_verified(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # an intact file whose content torch cannot read
        raise _refusal(path, f"torch.load failed: {error}") from error
    if not isinstance(state, dict):
        raise _refusal(path, f"it holds a {type(state).__name__}, not a dict")
    found = state.get("kind")  # pyright: ignore[reportUnknownMemberType]
    if kind is not None and found != kind:
        held = f"an {found!r} checkpoint" if found else "a checkpoint without a kind"
        raise CheckpointError(f"{path} is not an {kind!r} checkpoint: it holds {held}")
    return {str(key): value for key, value in state.items()}  # pyright: ignore[reportUnknownVariableType]


def checkpoint_digest(path: Path) -> str:
    """The SHA-256 digest (hex) of the checkpoint at ``path``, after verifying it.

    Store it in what is derived from the checkpoint (e.g. a distilled student) to notice when
    the file is later replaced by another run.

    Args:
        path: the checkpoint file.

    Examples:
        >>> path = Path(tempfile.mkdtemp()) / "run.pt"
        >>> checkpoint_digest(path) if save_checkpoint(path, {}) else None  # doctest: +ELLIPSIS
        '...'
    """
    digest, _ = _read_verified(path)
    return digest.hex()


class EMA(nn.Module):
    r"""An exponential moving average of a model's weights, updated without a host round trip.

    After each optimizer step $\bar\theta \leftarrow \beta\bar\theta + (1 - \beta)\theta$;
    buffers are copied.

    Starts as a copy of the model (in eval mode, without gradients). `update` launches no host
    round trip (unlike ``torch.optim.swa_utils.AveragedModel``, which reads its step counter).
    Validate and sample with ``ema.module``; `state_dict` is the averaged model's.

    Args:
        model: the trained model.
        decay: $\beta \in (0, 1)$.

    Examples:
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.fill_(0.0)
        >>> ema = EMA(model, decay=0.75)
        >>> _ = model.weight.data.fill_(1.0)
        >>> ema.update(model)
        >>> ema.module.weight.item()  # 0.75 * 0 + 0.25 * 1
        0.25
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (the same architecture)."""
        for average, current in zip(self.module.parameters(), model.parameters(), strict=True):
            average.lerp_(current, 1.0 - self.decay)
        for average, current in zip(self.module.buffers(), model.buffers(), strict=True):
            average.copy_(current)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # pyright: ignore[reportIncompatibleMethodOverride]
        """The averaged model's ``state_dict``."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> Any:
        """Load an averaged model's ``state_dict``."""
        return self.module.load_state_dict(state_dict, strict=strict)


def derived_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed that depends only on ``(seed, purpose, *indices)``.

    Args:
        seed: the run's seed.
        purpose: what is drawn, e.g. ``"noise"``.
        indices: e.g. the step and the process's rank.

    Examples:
        >>> derived_seed(0, "noise", 5, 1) == derived_seed(0, "noise", 5, 1)
        True
        >>> derived_seed(0, "noise", 5, 0) == derived_seed(0, "noise", 5, 1)
        False
    """
    key = [seed, zlib.crc32(purpose.encode()), *indices]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]) >> 1


def seeded_generator(
    seed: int, purpose: str, *indices: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on ``device`` seeded by `derived_seed`: e.g. ``(seed, "noise", step, rank)``.

    Drawing the noise of a step with it on the batch's device needs no host-to-device copy,
    and a run resumed at step ``k`` draws exactly what the uninterrupted run drew.

    Args:
        seed: the run's seed.
        purpose: what is drawn.
        indices: e.g. the step and the process's rank.
        device: where the generator draws.

    Examples:
        >>> a = torch.randn(3, generator=seeded_generator(0, "noise", 7))
        >>> torch.equal(a, torch.randn(3, generator=seeded_generator(0, "noise", 7)))
        True
    """
    return torch.Generator(device=device).manual_seed(derived_seed(seed, purpose, *indices))


def learning_rate(
    step: int, peak: float, warmup: int, total: int, schedule: Literal["constant", "cosine"]
) -> float:
    r"""The rate of (0-based) ``step``: linear warm-up to ``peak``, then constant or cosine.

    During the warm-up the rate is $\eta (k + 1) / w$; ``cosine`` then multiplies $\eta$ by
    $(1 + \cos \pi p)/2$, with $p$ the fraction of the post-warm-up steps done (0 at the end).

    Args:
        step: the step about to be taken, from 0.
        peak: the rate after the warm-up, $\eta$.
        warmup: warm-up steps $w \ge 0$.
        total: steps of the whole run.
        schedule: after the warm-up.

    Examples:
        >>> [learning_rate(k, peak=1.0, warmup=2, total=4, schedule="cosine") for k in range(4)]
        [0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    done = (step - warmup + 1) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run.

    Attributes:
        rank: this process's index.
        world_size: number of processes.
        device: where this process computes.

    Examples:
        >>> alone = Processes(rank=0, world_size=1, device=torch.device("cpu"))
        >>> alone.is_main, alone.mean(torch.tensor(2.0)).item()
        (True, 2.0)
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, reports and JSON."""
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the processes (an all-reduce; no host round trip)."""
        if self.world_size == 1:
            return value
        total = value.clone()
        torch.distributed.all_reduce(total)
        return total / self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` with gradients averaged over the processes (DDP), when there are several."""
        if self.world_size == 1:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def share(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The main process's ``payload``, on every process."""
        if self.world_size == 1:
            return payload
        box: list[Any] = [payload]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every process gets here (e.g. after the main one wrote a file)."""
        if self.world_size > 1:
            torch.distributed.barrier()


@contextmanager
def processes() -> Generator[Processes]:
    """The processes of a ``torchrun`` launch (gloo on CPU, NCCL on GPU), or this one alone.

    Examples:
        >>> with processes() as here:
        ...     here.world_size
        1
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        yield Processes(rank=0, world_size=1, device=torch.device("cuda" if cuda else "cpu"))
        return
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Processes(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            device=device,
        )
    finally:
        # Free unreachable DDP wrappers (reference cycles) while their process group is alive:
        # collected during interpreter shutdown, gloo aborts the process.
        gc.collect()
        torch.distributed.destroy_process_group()


def require_memory(needed: int, device: torch.device, what: str) -> None:
    """Raise ``ValueError`` if ``needed`` bytes exceed the memory of ``device``.

    The CPU's is its physical memory, a GPU's its free memory: a configuration that cannot fit
    is refused before anything is allocated, with the figures.

    Args:
        needed: an estimate of the bytes ``what`` takes.
        device: where it runs.
        what: the configuration, for the message (e.g. ``"--length 100000 --batch-size 32"``).

    Examples:
        >>> require_memory(2**20, torch.device("cpu"), "a small run")
        >>> require_memory(2**60, torch.device("cpu"), "--length 10**9")
        Traceback (most recent call last):
        ...
        ValueError: --length 10**9 needs about 1073741824.0 GiB, more than the ... GiB of cpu: lower it
    """
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ValueError(
            f"{what} needs about {needed / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB of {device}: lower it"
        )


def transformer_step_bytes(
    batch: int, length: int, vocab_size: int, dim: int, depth: int, heads: int
) -> int:
    r"""A rough upper estimate of the fp32 bytes of one transformer training step.

    For `require_memory`, on dense ``(batch, length, vocab_size)`` states.

    Counts 16 state-sized tensors (noise, one-hot, $x_t$, logits, their gradients and the
    losses' temporaries), per block 24 activations of width ``dim`` and two
    ``(batch, heads, length, length)`` attention tensors saved for the backward pass, and 16
    copies of the $12\,d^2$ weights per block plus the $V \times d$ tables (weights, gradients,
    AdamW's moments, the EMA).

    Args:
        batch: sequences on this process.
        length: positions per sequence.
        vocab_size: $V$.
        dim: model width $d$.
        depth: blocks.
        heads: attention heads.

    Examples:
        >>> transformer_step_bytes(32, 64, 70, dim=128, depth=4, heads=4) < 2**30
        True
    """
    states = 16 * batch * length * vocab_size
    activations = depth * batch * length * (24 * dim + 2 * heads * length)
    weights = 16 * (12 * dim * dim * depth + 2 * vocab_size * dim)
    return 4 * (states + activations + weights)


def fail(message: str) -> NoReturn:
    """Stop a command-line program on a configuration error: one ``error: ...`` line, exit 2.

    No traceback and no usage block: the line names the flag and the problem.

    Args:
        message: what is wrong and, where possible, what to do.

    Examples:
        >>> fail("--lr must lie in (0, 1], got 1e+30")
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (unknown flag, bad value) go through `fail`.

    Examples:
        >>> parser = ArgumentParser()
        >>> _ = parser.add_argument("--steps", type=int)
        >>> parser.parse_args(["--steps", "ten"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """

    def error(self, message: str) -> NoReturn:
        """Report ``message`` as one line and exit with code 2."""
        fail(message)


class _StoreTuple(argparse.Action):
    """Store one or more values as a tuple (settings dataclasses are frozen and hashable)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, tuple(values))


def add_settings(
    parser: argparse.ArgumentParser,
    settings: type[Any],
    choices: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Add a flag ``--field-name`` for every field of the dataclass ``settings``.

    The type comes from the field's annotation (``int``, ``float``, ``str``, their ``| None``
    forms, ``bool`` as ``--x/--no-x``, ``tuple[int, ...]`` as one or more values, given back
    as a tuple). A flag that is not given is absent from the parsed namespace, so that the
    given flags override the defaults, a preset or a checkpoint's settings, and nothing else.

    Args:
        parser: where to add the flags.
        settings: a dataclass.
        choices: the allowed values of some fields.

    Examples:
        >>> @dataclasses.dataclass
        ... class Settings:
        ...     steps: int = 10
        ...     sizes: tuple[int, ...] = (1, 2)
        ...     bf16: bool = False
        >>> parser = ArgumentParser()
        >>> add_settings(parser, Settings)
        >>> vars(parser.parse_args(["--sizes", "4", "8", "--bf16"]))
        {'sizes': (4, 8), 'bf16': True}
    """
    choices = choices or {}
    for field in dataclasses.fields(settings):
        flag = "--" + field.name.replace("_", "-")
        kinds = [kind for kind in get_args(field.type) if kind is not type(None)]
        kind = kinds[0] if get_origin(field.type) is not tuple and kinds else field.type
        if kind is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS)
        elif get_origin(field.type) is tuple:
            parser.add_argument(
                flag, type=int, nargs="+", action=_StoreTuple, default=argparse.SUPPRESS
            )
        else:
            parser.add_argument(
                flag, type=kind, choices=choices.get(field.name), default=argparse.SUPPRESS
            )


def check_settings(settings: Any, world_size: int = 1, positive: Sequence[str] = ()) -> None:
    r"""Raise ``ValueError`` naming the flag of the first training setting that cannot work.

    Checks those of these attributes that ``settings`` has: ``lr`` in $(0, 1]$ (``1e30``
    overflows, a negative rate ascends), ``grad_clip`` a positive finite norm (a negative one
    flips the gradient), ``warmup`` $\ge 0$, ``dropout`` in $[0, 1)$, ``ema_decay`` in
    $(0, 1)$, ``p_uncond`` and ``boundary_prob`` (unless None) in $[0, 1]$, ``beta2`` in $[0, 1)$, every ``sample_steps`` $\ge 1$, ``batch_size`` a multiple of ``world_size``, and
    every attribute named in ``positive`` $\ge 1$. NaN fails every range.

    The ablation settings too: ``soft_cap`` (unless None) positive and finite,
    ``self_condition_guidance`` (unless None) finite and $\ge 0$, and only with a true
    ``self_condition`` (it guides the self-conditioning input), ``churn`` in $[0, 1)$.

    Args:
        settings: e.g. a settings dataclass.
        world_size: the processes the global ``batch_size`` is split over.
        positive: attributes that must be at least 1.

    Examples:
        >>> @dataclasses.dataclass
        ... class Settings:
        ...     lr: float = 3e-4
        ...     grad_clip: float = -1.0
        >>> check_settings(Settings())
        Traceback (most recent call last):
        ...
        ValueError: --grad-clip must be a positive finite gradient norm, got -1.0
    """
    ranges: dict[str, tuple[Callable[[Any], bool], str]] = {
        "lr": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
        "grad_clip": (lambda v: 0 < v < math.inf, "must be a positive finite gradient norm"),
        "warmup": (lambda v: v >= 0, "must be at least 0"),
        "dropout": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        "soft_cap": (lambda v: v is None or 0 < v < math.inf, "must be a positive finite cap"),
        "self_condition_guidance": (lambda v: v is None or 0 <= v < math.inf, "must be >= 0"),
        "churn": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        "ema_decay": (lambda v: 0 < v < 1, "must lie in (0, 1)"),
        "sample_steps": (lambda v: len(v) > 0 and min(v) >= 1, "must be step counts >= 1"),
        "p_uncond": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        "boundary_prob": (lambda v: v is None or 0 <= v <= 1, "must lie in [0, 1]"),
        "beta2": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    }
    ranges |= {name: (lambda v: v >= 1, "must be at least 1") for name in positive}
    for name, (allowed, requirement) in ranges.items():
        if hasattr(settings, name) and not allowed(value := getattr(settings, name)):
            raise ValueError(f"--{name.replace('_', '-')} {requirement}, got {value}")
    guided = getattr(settings, "self_condition_guidance", None) is not None
    if guided and not getattr(settings, "self_condition", False):
        raise ValueError("--self-condition-guidance guides a --self-condition model")
    batch_size = getattr(settings, "batch_size", world_size)
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} does not split over {world_size} processes")


RUN_FLAGS = ("out", "resume", "sample_only", "json", "threads", "smoke")
"""The invocation's flags that are not run settings (not saved in a checkpoint)."""
CONDITIONING_FLAGS = ("prompt", "infill", "guidance", "block")
"""Sampling flags: known tokens at time 1 (a prompt or a template with ____ holes), guidance."""


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags `RUN_FLAGS` and `CONDITIONING_FLAGS` of the example scripts.

    Args:
        parser: where to add them; `run_flags` takes them back out of the parsed flags.

    Examples:
        >>> parser = ArgumentParser()
        >>> add_run_flags(parser)
        >>> vars(parser.parse_args(["--out", "run.pt", "--block", "8"]))["block"]
        8
    """
    parser.add_argument("--out", type=Path, help="checkpoint file")
    parser.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    parser.add_argument("--sample-only", action="store_true", help="sample from --out, no training")
    parser.add_argument("--json", type=Path, help="write the final metrics here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest here)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run of a few steps (CI)")
    parser.add_argument("--prompt", help="sample continuations of this text")
    parser.add_argument("--infill", help="sample the ____ holes (and the rest) of this text")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance weight W >= 0")
    parser.add_argument("--block", type=int, help="sample in blocks of B positions, in order")


def run_flags(given: dict[str, Any]) -> argparse.Namespace:
    """Take the flags of `add_run_flags` out of the parsed ``given`` and check them.

    What is left in ``given`` are the run settings given on the command line. A flag that
    cannot work stops the program with `fail` (one ``error:`` line, exit code 2).

    Args:
        given: ``vars(parser.parse_args(...))``; modified in place.

    Returns:
        The invocation's flags, as attributes.

    Examples:
        >>> parser = ArgumentParser()
        >>> add_run_flags(parser)
        >>> given = vars(parser.parse_args(["--threads", "2"]))
        >>> run_flags(given).threads, given
        (2, {})
        >>> run_flags(vars(parser.parse_args(["--resume"])))
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    flags = argparse.Namespace(**{name: given.pop(name) for name in RUN_FLAGS + CONDITIONING_FLAGS})
    if flags.threads < 1:
        fail(f"--threads must be at least 1, got {flags.threads}")
    if flags.prompt is not None and flags.infill is not None:
        fail("--prompt and --infill both give the known tokens: give one of them")
    if flags.guidance is not None and not flags.guidance >= 0:
        fail(f"--guidance must be at least 0, got {flags.guidance}")
    if flags.block is not None and flags.block < 1:
        fail(f"--block must be at least 1, got {flags.block}")
    if (flags.resume or flags.sample_only) and flags.out is None:
        fail("--resume and --sample-only read the checkpoint at --out: give --out")
    return flags


def template_context(
    flags: argparse.Namespace,
    encode: Callable[[str], Sequence[int] | Tensor],
    length: int,
    count: int,
    device: torch.device,
) -> Context | None:
    """The ``--prompt`` or ``--infill`` text of `run_flags` as a `Context` of ``count`` rows.

    A text that does not fit ``length`` tokens stops the program with `fail`.

    Args:
        flags: from `run_flags`.
        encode: the tokenizer's text-to-ids function.
        length: tokens per sequence.
        count: rows.
        device: where the context lives.

    Returns:
        The known tokens, or None when neither flag was given.

    Examples:
        >>> from flowlm.data import CharTokenizer
        >>> flags = argparse.Namespace(prompt="ab", infill=None)
        >>> context = template_context(flags, CharTokenizer("ab").encode, 4, 2, torch.device("cpu"))
        >>> context.known.tolist() if context is not None else None
        [[True, True, False, False], [True, True, False, False]]
    """
    template = flags.prompt if flags.prompt is not None else flags.infill
    if template is None:
        return None
    try:
        return Context.from_template(template, encode, length, count, device=device)
    except ValueError as error:
        fail(f"--{'prompt' if flags.prompt is not None else 'infill'}: {error}")


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    parameters: Sequence[Tensor],
    lr: float,
    grad_clip: float,
) -> None:
    """One update: set the learning rate, backpropagate ``loss``, clip the gradient norm, step.

    Args:
        optimizer: updates ``parameters``.
        loss: a scalar.
        parameters: whose gradient norm is clipped to ``grad_clip``.
        lr: this step's learning rate (e.g. from `learning_rate`).
        grad_clip: the largest gradient norm.

    Examples:
        >>> weight = nn.Parameter(torch.tensor([1.0]))
        >>> optimizer = torch.optim.SGD([weight], lr=0.0)
        >>> optimizer_step(optimizer, 3 * weight.sum(), [weight], lr=0.5, grad_clip=1.0)
        >>> weight.data  # the gradient 3 is clipped to norm 1: 1 - 0.5 * 1
        tensor([0.5000])
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


def finite_loss(
    procs: Processes, loss: Tensor, model: nn.Module, check_weights: bool, where: str
) -> float:
    """The loss averaged over the processes, read on the host; an error if it is not finite.

    Call it at log and checkpoint steps only (it synchronizes with the device). With
    ``check_weights`` (before a checkpoint), non-finite weights are refused too, so that a
    diverged state is never saved.

    Args:
        procs: the processes (`processes`).
        loss: this process's scalar loss.
        model: the trained network.
        check_weights: also check every parameter of ``model``.
        where: the step, for the message (e.g. ``"step 100"``).

    Returns:
        The mean loss.

    Raises:
        FloatingPointError: the loss or (with ``check_weights``) a weight is not finite.

    Examples:
        >>> procs = Processes(rank=0, world_size=1, device=torch.device("cpu"))
        >>> finite_loss(procs, torch.tensor(2.5), nn.Linear(1, 1), True, "step 1")
        2.5
        >>> finite_loss(procs, torch.tensor(float("nan")), nn.Linear(1, 1), False, "step 2")
        Traceback (most recent call last):
        ...
        FloatingPointError: step 2: the training loss is nan; stopped without saving (the last checkpoint is kept). Try a lower --lr or float32.
    """
    value = procs.mean(loss.detach()).item()
    weights = torch.stack([p.isfinite().all() for p in model.parameters()])
    if not math.isfinite(value) or (check_weights and not weights.all().item()):
        raise FloatingPointError(
            f"{where}: the training loss is {value}; stopped without saving (the last checkpoint is "
            "kept). Try a lower --lr or float32."
        )
    return value


def saved_run(
    flags: argparse.Namespace, kind: str, described: str = "checkpoint"
) -> dict[str, Any] | None:
    """The checkpoint at ``--out`` that ``--resume`` or ``--sample-only`` continues, if any.

    Damaged files are refused (`load_checkpoint`), and so is resuming a ``--smoke`` run as a
    real one or the reverse (their models differ).

    Args:
        flags: from `run_flags`.
        kind: the checkpoint's expected kind (e.g. ``"flm"``).
        described: what the file is, for the message when it is missing.

    Returns:
        The saved state, or None for a new run (no ``--resume``/``--sample-only``, or
        ``--resume`` with no file yet).

    Raises:
        FileNotFoundError: ``--sample-only`` and no file at ``--out``.
        ValueError: the smoke flags differ on ``--resume``; or a damaged file.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.pt"
        >>> flags = argparse.Namespace(out=path, resume=True, sample_only=False, smoke=False)
        >>> saved_run(flags, "flm") is None  # nothing to resume yet
        True
        >>> _ = save_checkpoint(path, {"kind": "flm", "smoke": True})
        >>> saved_run(flags, "flm")
        Traceback (most recent call last):
        ...
        ValueError: ... holds a --smoke run: it is not resumed by this one (another --out)
    """
    if flags.out is None or not (flags.resume or flags.sample_only):
        return None
    if not flags.out.exists():
        if flags.sample_only:
            raise FileNotFoundError(f"--sample-only: no {described} at {flags.out}")
        return None
    saved = load_checkpoint(flags.out, kind=kind)
    if flags.resume and saved["smoke"] != flags.smoke:
        run = "a --smoke run" if saved["smoke"] else "a run without --smoke"
        raise ValueError(f"{flags.out} holds {run}: it is not resumed by this one (another --out)")
    return saved


def check_unchanged(
    given: Mapping[str, Any],
    fixed: Mapping[str, Any],
    names: Sequence[str],
    whose: str,
    advice: str,
) -> None:
    """Refuse a flag in ``given`` that contradicts a setting that is ``fixed`` (e.g. saved).

    Args:
        given: the settings given on the command line.
        fixed: the settings that cannot change (a checkpoint's, a teacher's).
        names: the settings to compare.
        whose: for the message, e.g. ``"the checkpoint's"``.
        advice: what to do instead.

    Raises:
        ValueError: naming the first flag that differs.

    Examples:
        >>> check_unchanged({"dim": 64}, {"dim": 32}, ["dim"], "the checkpoint's", "drop it")
        Traceback (most recent call last):
        ...
        ValueError: --dim 64 contradicts the checkpoint's 32: drop it
    """
    for name in names:
        if name in given and given[name] != fixed[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {given[name]} contradicts {whose} {fixed[name]}: {advice}")


def sample_measures(
    task: Task, tokens: Tensor, nfe: int, label: str, seconds: float, shown: int = 3
) -> dict[str, Any]:
    """The report of one set of samples, also printed: a summary line and ``shown`` samples.

    Args:
        task: what the samples are judged by (its quality measures and decoding).
        tokens: the decoded samples, ``(batch, length)`` token ids.
        nfe: the network calls that made them.
        label: names the sampler in the printed line.
        seconds: the sampling time, printed.
        shown: samples printed.

    Returns:
        ``{"nfe", "entropy" (the mean per-sample token entropy), <the task's measures>,
        "samples" (every decoded text)}``.

    Examples:
        >>> from flowlm.data.tasks import build_task
        >>> task = build_task("alpha-repeat", length=4)
        >>> report = sample_measures(task, torch.zeros(2, 4, dtype=torch.long), 1, "x", 0.0, 0)
        x: nfe 1, entropy 0, valid_rate 1, mode_coverage 0.03846 (0.00 s)
        <BLANKLINE>
        >>> report["samples"]
        ['aaaa', 'aaaa']
    """
    tokens = tokens.cpu()
    measures: dict[str, Any] = {"nfe": nfe, "entropy": token_entropy(tokens).mean().item()}
    measures |= task.quality(tokens)
    summary = ", ".join(f"{key} {value:.4g}" for key, value in measures.items())
    print(f"{label}: {summary} ({seconds:.2f} s)")
    texts = task.decode(tokens)
    print("\n".join(f"    {text!r}" for text in texts[:shown]))
    return measures | {"samples": texts}


def conditioning_flags(flags: argparse.Namespace) -> dict[str, Any]:
    """The `CONDITIONING_FLAGS` given in ``flags`` (from `run_flags`), for a run's report.

    Examples:
        >>> conditioning_flags(argparse.Namespace(prompt="And", infill=None, guidance=None, block=4))
        {'prompt': 'And', 'block': 4}
    """
    return {name: value for name in CONDITIONING_FLAGS if (value := vars(flags)[name]) is not None}


def sample_rollout(
    flow_map: FlowMap,
    noise: State,
    n_steps: int,
    context: Context | None = None,
    block: int | None = None,
) -> Trajectory:
    """`flowlm.rollout` of ``flow_map`` from ``noise`` on ``time_grid(n_steps)``, as the examples sample.

    A `flowlm.SelfConditionedMap` runs on the lifted state, from ``[noise, 0]``, with the
    context lifted (`flowlm.Context.lift`: its tokens held one-hot in both halves), and the result
    holds its state half; ``block`` generates blocks of that many positions in order, after
    the known prefix of ``context`` (`flowlm.block_rollout`).

    Args:
        flow_map: the sampler.
        noise: the starting states.
        n_steps: steps of the uniform grid.
        context: known tokens held at time 1.
        block: positions per block, or None for all at once.

    Examples:
        >>> from flowlm import LinearInterpolant, XPredictor, XPredMap
        >>> sampler = XPredMap(XPredictor(lambda x, t: x), LinearInterpolant())
        >>> sample_rollout(sampler, torch.randn(2, 4, 3), 3, block=2).x.shape
        torch.Size([2, 4, 3])
    """
    grid = time_grid(n_steps)
    lifted = isinstance(flow_map, SelfConditionedMap)
    x_init = lift_state(noise) if lifted else noise
    if lifted and (context is not None or block is not None):
        tokens = torch.zeros(noise.shape[:2], dtype=torch.long, device=noise.device)
        context = (Context.none(tokens) if context is None else context).lift()
    if block is None:
        trajectory = rollout(flow_map, x_init, grid, context=context)
    else:
        prefix = 0 if context is None else int(context.known[0].cumprod(0).sum())
        first = min(prefix, noise.shape[1] - 1)
        trajectory = block_rollout(flow_map, x_init, grid, block, context=context, first=first)
    return dataclasses.replace(trajectory, x=split_state(trajectory.x).x) if lifted else trajectory


def soft_capped(
    network: Backbone | SelfConditionedBackbone, cap: float | None
) -> Backbone | SelfConditionedBackbone:
    r"""``network`` with its logits soft-capped, $c\tanh(z/c)$ (`flowlm.SoftCapped`); ``None``: as is.

    Examples:
        >>> soft_capped(nn.Identity(), None)
        Identity()
        >>> capped = soft_capped(lambda x, t: 100 * x, 2.0)
        >>> capped(torch.ones(1, 1, 2), torch.zeros(1))
        tensor([[[2., 2.]]])
    """
    return network if cap is None else SoftCapped(network, cap)
