"""Input validation that names the problem and never leaves the device.

Range checks use ``torch._assert_async``: synchronous on the CPU, asynchronous on CUDA, so no
check forces a host round trip inside a training or sampling step.
"""

import torch
from torch import Tensor


def device_assert(condition: Tensor, message: str) -> None:
    """Raise ``RuntimeError(message)`` if the one-element ``condition`` is false."""
    torch._assert_async(condition, message)  # pyright: ignore[reportPrivateUsage]


def check_time(t: object, name: str = "t") -> None:
    """Raise if ``t`` is not a batched tensor of times in [0, 1]."""
    if not isinstance(t, Tensor) or t.ndim != 1:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"{name} must be a 1-d tensor of model times (one per example), got {shape}; "
            f"write torch.full((batch,), value) instead of a scalar"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    device_assert(((t >= 0) & (t <= 1)).all(), f"{name} has values outside [0, 1] (or NaN)")


def check_state(x: Tensor, vocab_size: int | None = None, name: str = "x") -> None:
    """Raise if ``x`` is not a (batch, seq, vocab) float state of the given vocabulary."""
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, seq, vocab), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point state, got {x.dtype}")
    if vocab_size is not None and x.shape[-1] != vocab_size:
        raise ValueError(
            f"vocabulary mismatch: {name} has {x.shape[-1]} entries per position, "
            f"expected {vocab_size}"
        )


def check_same_batch(x: Tensor, t: Tensor, name: str = "t") -> None:
    """Raise if the time tensor does not hold one value per example of ``x``."""
    if t.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} has {t.shape[0]} entries but the state has batch size {x.shape[0]}; "
            f"times are never broadcast"
        )


def check_finite(x: Tensor, what: str) -> None:
    """Raise if ``x`` holds NaN or infinity."""
    device_assert(torch.isfinite(x).all(), f"{what} holds NaN or infinite values")


def check_tokens(tokens: Tensor, vocab_size: int) -> None:
    """Raise if ``tokens`` are not integer ids in [0, vocab_size)."""
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"token ids must be integers, got {tokens.dtype}")
    device_assert(
        ((tokens >= 0) & (tokens < vocab_size)).all(),
        f"token ids out of range: every id must lie in [0, {vocab_size})",
    )
