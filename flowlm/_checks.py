"""Input validation that names the problem and never leaves the device.

Entry points (``rollout``, ``Interpolant.sample``, ``XPredictor``, the losses) check their
inputs once; the per-step internals do not repeat it. Range checks use
``torch._assert_async``: synchronous on the CPU, asynchronous on CUDA, so no check forces a
host round trip inside a training or sampling step.
"""

import torch
from torch import Tensor


def device_assert(condition: Tensor, message: str) -> None:
    """Raise ``RuntimeError(message)`` if the one-element ``condition`` is false."""
    torch._assert_async(condition, message)  # pyright: ignore[reportPrivateUsage]


def check_time(t: object, like: Tensor, name: str = "t") -> None:
    """Raise if ``t`` is not a tensor of times in [0, 1] per example or per token of ``like``."""
    if not isinstance(t, Tensor) or t.ndim not in (1, 2):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"{name} must be a tensor of model times, one per example (batch,) or per token "
            f"(batch, seq), got {shape}; write torch.full((batch,), value) instead of a scalar"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape != like.shape[: t.ndim]:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the state has shape {tuple(like.shape)}: "
            f"give one time per example {tuple(like.shape[:1])} or per token "
            f"{tuple(like.shape[:2])}; times are never broadcast"
        )
    device_assert(((t >= 0) & (t <= 1)).all(), f"{name} has values outside [0, 1] (or NaN)")


def check_jump(t: Tensor, s: Tensor) -> None:
    """Raise (on the device) unless every jump goes forward, ``s > t``, or stays clean at 1.

    A position with ``t = s = 1`` is known data (a prompt) and is allowed.
    """
    forward = (s > t) | ((t == 1) & (s == 1))
    device_assert(
        forward.all(),
        "jump losses need s > t at every example and token (t = s = 1 only on known, clean "
        "positions); draw pairs with flowlm.time_pairs",
    )


def check_state(x: object, vocab_size: int | None = None, name: str = "x") -> None:
    """Raise if ``x`` is not a (batch, seq, vocab) float state of the given vocabulary."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape (batch, seq, vocab), got {type(x)}")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, seq, vocab), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point state, got {x.dtype}")
    if vocab_size is not None and x.shape[-1] != vocab_size:
        raise ValueError(
            f"vocabulary mismatch: {name} has {x.shape[-1]} entries per position, "
            f"expected {vocab_size}"
        )


def check_finite(x: Tensor, message: str) -> None:
    """Raise ``RuntimeError(message)`` if ``x`` holds NaN or infinity.

    One min/max reduction (both propagate NaN), so no temporary of ``x``'s size is made.
    """
    low, high = torch.aminmax(x)
    device_assert(torch.isfinite(low) & torch.isfinite(high), message)


def check_tokens(tokens: Tensor, vocab_size: int) -> None:
    """Raise if ``tokens`` are not integer ids in [0, vocab_size)."""
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"token ids must be integers, got {tokens.dtype}")
    device_assert(
        ((tokens >= 0) & (tokens < vocab_size)).all(),
        f"token ids out of range: every id must lie in [0, {vocab_size})",
    )


def check_token_ids_fit(vocab_size: int, dtype: torch.dtype) -> None:
    """Refuse a float state ``dtype`` that cannot hold every token id below ``vocab_size`` exactly.

    A float dtype represents the integers from 0 to ``2 / eps`` exactly (e.g. 256 for bfloat16).
    """
    if vocab_size > round(2 / torch.finfo(dtype).eps):
        raise ValueError(
            f"a {dtype} state cannot hold token ids up to {vocab_size - 1} exactly; sample "
            "the embedded path in float32 or wider"
        )
