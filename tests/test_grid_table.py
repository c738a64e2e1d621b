"""GridTable: the uniform-grid piecewise-linear lookup behind TokenAccuracy, against np.interp."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowlm._grid_table import GridTable, cast, for_lookup

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def random_table(knots: int, start: float, stop: float, seed: int) -> tuple[GridTable, np.ndarray]:
    values = np.random.default_rng(seed).normal(size=knots)
    return GridTable(torch.from_numpy(values), start, stop), values


@settings(max_examples=30, deadline=None)
@given(
    knots=st.integers(2, 50),
    width=st.floats(0.01, 100.0),
    left_of_zero=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_numpy_interp_including_beyond_the_grid(
    knots: int, width: float, left_of_zero: float, seed: int
):
    # Grids around zero, as TokenAccuracy's are: far from zero a float32 position would cancel.
    start = -left_of_zero * width
    table, values = random_table(knots, start, start + width, seed)
    grid = np.linspace(start, start + width, knots)
    x = np.random.default_rng(seed + 1).uniform(start - width, start + 2 * width, size=200)
    x = np.concatenate([x, grid])  # every knot, too
    scale = 1 + np.abs(values).max()
    got64 = table.lookup(torch.from_numpy(x)).numpy()
    assert np.abs(got64 - np.interp(x, grid, values)).max() <= 1e-9 * scale
    x32 = torch.from_numpy(x).float()
    got32 = table.lookup(x32).double().numpy()
    assert np.abs(got32 - np.interp(x32.double().numpy(), grid, values)).max() <= 1e-5 * scale


def test_knot_values_are_hit_exactly():
    values = torch.tensor([0.0, 1e-300, 0.25, 1.0 - 2**-53, 1.0], dtype=F64)
    table = GridTable(values, 0.0, 4.0)
    assert torch.equal(table.lookup(torch.arange(5, dtype=F64)), values)
    assert torch.equal(table.lookup(torch.tensor([0.0, 4.0])), torch.tensor([0.0, 1.0]))


def test_slope_and_gradient_are_the_piece_slopes():
    table, values = random_table(9, -2.0, 2.0, 0)
    x = torch.linspace(-1.99, 1.99, 41, dtype=F64).requires_grad_()
    (grad,) = torch.autograd.grad(table.lookup(x).sum(), x)
    piece = np.minimum(((x.detach().numpy() + 2.0) * 2.0).astype(int), 7)
    expected = (values[piece + 1] - values[piece]) * 2.0
    assert np.allclose(grad.numpy(), expected, rtol=1e-12)
    assert torch.allclose(table.slope(x.detach()), grad, rtol=1e-12)
    # Beyond the grid the value is constant (no gradient); `slope` reports the end piece.
    outside = torch.tensor([-5.0, 5.0], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(table.lookup(outside).sum(), outside)
    assert torch.equal(grad, torch.zeros(2, dtype=F64))
    ends = table.slope(outside.detach()).numpy()
    assert np.allclose(ends, [(values[1] - values[0]) * 2, (values[8] - values[7]) * 2])


@pytest.mark.parametrize("cast", ["half", "float", "bfloat16", "double"])
def test_module_casts_keep_both_tables(cast: str):
    table, _ = random_table(17, 0.0, 1.0, 3)
    before = {name: buffer.clone() for name, buffer in table.named_buffers()}
    getattr(table, cast)()
    for name, buffer in table.named_buffers():
        assert buffer.dtype == before[name].dtype, name
        assert torch.equal(buffer, before[name]), name
    assert table.state_dict() == {}


def test_lookup_dtypes_and_unsupported_input():
    half = torch.tensor([0.5], dtype=torch.float16)
    assert for_lookup(half).dtype == torch.float32
    for dtype in (torch.float32, F64):
        x = torch.zeros(1, dtype=dtype)
        assert for_lookup(x) is x
        assert cast(x, dtype) is x
    assert cast(half, F64).dtype == F64
    table, _ = random_table(3, 0.0, 1.0, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        table.lookup(half)


@pytest.mark.parametrize(
    ("values", "start", "stop", "message"),
    [
        (torch.zeros(1, dtype=F64), 0.0, 1.0, ">= 2 values"),
        (torch.zeros(2, 2, dtype=F64), 0.0, 1.0, ">= 2 values"),
        (torch.zeros(3, dtype=F64), 1.0, 1.0, "stop > start"),
    ],
)
def test_bad_tables_are_rejected(values: torch.Tensor, start: float, stop: float, message: str):
    with pytest.raises(ValueError, match=message):
        GridTable(values, start, stop)


def test_nan_propagates_like_an_elementwise_op():
    # A NaN position must not reach the gather as an arbitrary integer (an index error on CPU,
    # a device assert on GPU): the lookup returns NaN there and the other entries unchanged.
    table, _ = random_table(5, 0.0, 1.0, 0)
    x = torch.tensor([0.25, float("nan"), 1.0], dtype=F64)
    for dtype in (F64, torch.float32):
        got = table.lookup(x.to(dtype))
        assert torch.isnan(got[1])
        assert torch.equal(got[[0, 2]], table.lookup(x[[0, 2]].to(dtype)))
        assert torch.isfinite(table.slope(x.to(dtype))).all()
