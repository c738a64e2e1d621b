"""The tensor helpers modules share: time broadcasting, the float32 upcast, per-example coins."""

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


def kept_per_example(
    values: Tensor, probability: float, generator: torch.Generator | None
) -> Tensor:
    """``values`` for each example with chance ``probability``, zeros for the others.

    One coin per example (the first axis), drawn on ``values``' device.

    Examples:
        >>> kept_per_example(torch.ones(3, 2), 1.0, None)
        tensor([[1., 1.],
                [1., 1.],
                [1., 1.]])
    """
    coins = torch.rand(values.shape[0], generator=generator, device=values.device)
    keep = broadcast_time(coins < probability, values)
    return torch.where(keep, values, torch.zeros_like(values))
