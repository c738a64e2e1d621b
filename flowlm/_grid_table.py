r"""A piecewise-linear lookup table on a uniform grid, evaluated in torch without a search."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from flowlm._types import Times

LOOKUP_DTYPES = (torch.float32, torch.float64)
"""The dtypes a table is held in and looked up in."""


def for_lookup(x: Tensor) -> Tensor:
    """``x`` in a lookup dtype: float32 and float64 stay, other dtypes become float32.

    Examples:
        >>> for_lookup(torch.tensor([0.5], dtype=torch.bfloat16)).dtype
        torch.float32
    """
    return x if x.dtype in LOOKUP_DTYPES else x.float()


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, skipping the call when ``x`` has that dtype (it is per-call overhead)."""
    return x if x.dtype == dtype else x.to(dtype)


class GridTable(nn.Module):
    r"""A piecewise-linear function with knots uniformly on $[x_0, x_1]$, constant beyond them.

    It interpolates knot values $v_0, \dots, v_{n-1}$: with the grid position
    $p = (x - x_0)\,(n - 1)/(x_1 - x_0)$ clamped to $[0, n - 1]$ and $i = \lfloor p \rfloor$,

    $$f(x) = v_i + (v_{i+1} - v_i)\,(p - i),\qquad v_n := v_{n-1},$$

    so $f$ hits every knot value exactly, and its gradient in $x$ is the slope of the piece
    holding $x$ (zero where $p$ is clamped). The knot index is arithmetic, so a lookup is a few
    elementwise ops and one gather on the input's device, with no search and no host round trip.

    The table is held twice, as non-persistent buffers: in float64 for float64 input and in
    float32 for float32 input (`for_lookup` converts other dtypes); a lookup returns the
    input's dtype. Casting the module (``.float()``, ``.half()``) keeps both copies as they
    are; moving it to a device moves both.

    Args:
        values: the knot values $v_i$ (float64, at least two).
        start: $x_0$, where the first knot sits.
        stop: $x_1 > x_0$, where the last knot sits.

    Examples:
        >>> table = GridTable(torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64), 0.0, 1.0)
        >>> table.lookup(torch.tensor([-1.0, 0.25, 0.75, 1.0]))
        tensor([0.0000, 0.2500, 1.2500, 2.0000])
        >>> table.slope(torch.tensor([0.25, 0.75, 1.0]))
        tensor([1., 3., 3.])
    """

    pieces_float64: Tensor
    r"""Knot values $v_i$ (row 0) and piece rises $v_{i+1} - v_i$ (row 1), in float64."""
    offset_float64: Tensor
    r"""$-x_0\,(n - 1)/(x_1 - x_0)$: the position of $x = 0$, a 0-d float64 tensor."""
    pieces_float32: Tensor
    """``pieces_float64`` in float32, its rises taken between the rounded values."""
    offset_float32: Tensor
    """``offset_float64`` in float32."""

    def __init__(self, values: Tensor, start: float, stop: float) -> None:
        super().__init__()
        if values.ndim != 1 or len(values) < 2:
            raise ValueError(
                f"GridTable needs a 1-d tensor of >= 2 values, got {tuple(values.shape)}"
            )
        if not stop > start:
            raise ValueError(f"GridTable needs stop > start, got [{start}, {stop}]")
        self.last_knot = len(values) - 1
        self.knots_per_unit = self.last_knot / (stop - start)
        r"""$(n - 1)/(x_1 - x_0)$, the scale from $x$ to grid positions."""
        for dtype in LOOKUP_DTYPES:
            knots = values.to(dtype)
            pieces = torch.stack([knots, torch.cat([knots.diff(), knots.new_zeros(1)])])
            offset = torch.tensor(-start * self.knots_per_unit, dtype=dtype)
            # Derived from the constructor's arguments, so not saved in state_dict.
            self.register_buffer(f"pieces_{_suffix(dtype)}", pieces, persistent=False)
            self.register_buffer(f"offset_{_suffix(dtype)}", offset, persistent=False)
        self._index_tables()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "GridTable":
        # Follow device moves but keep each table's dtype: `.half()` on a model holding this
        # table would round the float32 copy and collapse pieces into steps.
        tables = dict(self.named_buffers(recurse=False))
        super()._apply(fn, recurse)
        for name, table in tables.items():
            setattr(self, name, table.to(getattr(self, name).device))
        self._index_tables()
        return self

    def _index_tables(self) -> None:
        # The buffers by lookup dtype, in a plain dict: reading two buffers through
        # nn.Module.__getattr__ at every call costs more than the lookup's gather.
        self._tables = {
            dtype: (
                getattr(self, f"pieces_{_suffix(dtype)}"),
                getattr(self, f"offset_{_suffix(dtype)}"),
            )
            for dtype in LOOKUP_DTYPES
        }

    def lookup(self, x: Times) -> Times:
        """$f(x)$, in ``x``'s dtype (float32 or float64)."""
        pieces, position = self._locate(x, self.last_knot)
        value, rise = pieces.index_select(1, _knot_index(position)).unbind()
        return torch.addcmul(value, rise, position.frac()).view_as(x)

    def slope(self, x: Times) -> Times:
        r"""$df/dx$ of the piece holding $x$; beyond the grid (and at NaN), an end piece's."""
        pieces, position = self._locate(x, self.last_knot - 1)
        rise = pieces[1].index_select(0, _knot_index(position))
        return (rise * self.knots_per_unit).view_as(x)

    def _locate(self, x: Tensor, last_position: int) -> tuple[Tensor, Tensor]:
        """The table in ``x``'s dtype and the grid positions of ``x`` (flat, in [0, last_position])."""
        tables = self._tables.get(x.dtype)
        if tables is None:
            raise TypeError(f"GridTable looks up float32 or float64 input, got {x.dtype}")
        pieces, offset = tables
        position = torch.add(offset, x.flatten(), alpha=self.knots_per_unit)
        return pieces, position.clamp_(0, last_position)


def _suffix(dtype: torch.dtype) -> str:
    """The buffer-name suffix of a lookup dtype: ``float32`` or ``float64``."""
    return str(dtype).removeprefix("torch.")


def _knot_index(position: Tensor) -> Tensor:
    """The knot at or left of each (clamped) position; knot 0 for NaN, which ``frac()`` keeps.

    ``int()`` is the floor here, as positions are never negative; it carries no gradient. A
    NaN would convert to an arbitrary integer, so it gathers knot 0 and the lookup returns
    NaN through ``position.frac()``, as an elementwise op does.
    """
    return position.nan_to_num(0.0).int()
