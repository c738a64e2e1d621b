"""The two tensor helpers every module shares: time broadcasting and the float32 upcast."""

import torch
from torch import Tensor


def broadcast_time(values: Tensor, like: Tensor) -> Tensor:
    """View per-example ``(batch,)`` or per-token ``(batch, seq)`` values against ``like``.

    ``like`` is a state ``(batch, seq, vocab)`` or a per-token loss ``(batch, seq)``; the
    result has trailing axes of size 1 (e.g. ``(batch, 1, 1)`` or ``(batch, seq, 1)``), in
    the dtype of ``like`` when both are floating, so elementwise updates keep the state's
    dtype (masks stay boolean).
    Nothing else is broadcast: any other shape is an error.

    Examples:
        >>> x = torch.zeros(2, 3, 4)
        >>> broadcast_time(torch.rand(2), x).shape, broadcast_time(torch.rand(2, 3), x).shape
        (torch.Size([2, 1, 1]), torch.Size([2, 3, 1]))
    """
    if values.shape not in (like.shape[:1], like.shape[:2]) or values.ndim not in (1, 2):
        raise ValueError(
            f"times of shape {tuple(values.shape)} do not fit a tensor of shape "
            f"{tuple(like.shape)}: give one time per example (batch,) or per token "
            f"(batch, seq); times are never broadcast otherwise"
        )
    expanded = values.reshape(*values.shape, *([1] * (like.ndim - values.ndim)))
    floating = like.is_floating_point() and values.is_floating_point()
    return expanded.to(like.dtype) if floating else expanded


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or unchanged if it is already float32 or wider.

    Examples:
        >>> at_least_float32(torch.ones(1, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    return x.to(float32_or_wider(x.dtype))


def float32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """The dtype `at_least_float32` casts to: float32, or ``dtype`` if it is wider.

    Examples:
        >>> float32_or_wider(torch.float16), float32_or_wider(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)
