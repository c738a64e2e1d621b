"""The v2 recipe options: the diagonal split, its loss and the logit soft-cap."""

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowlm as fl
from flowlm import distill
from flowlm.backbones import DiT
from flowlm.recipes import (
    DiagonalSplit,
    SoftCapped,
    diagonal_split,
    soft_cap,
    split_semigroup_kl_loss,
)

N = 40_000


@given(batch=st.integers(1, 40), fraction=st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_the_diagonal_split_covers_the_batch_once(batch: int, fraction: float) -> None:
    split = diagonal_split(batch, fraction, generator=torch.Generator().manual_seed(0))
    assert len(split.diagonal) == math.floor(fraction * batch + 0.5)
    assert sorted(torch.cat(split).tolist()) == list(range(batch))


def test_every_row_is_diagonal_equally_often() -> None:
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    repeats = 4000
    for _ in range(repeats):
        counts[diagonal_split(10, 0.3, generator=generator).diagonal] += 1
    rates = counts / repeats
    assert ((rates - 0.3).abs() < 5 * math.sqrt(0.3 * 0.7 / repeats)).all()


def test_bad_diagonal_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="diagonal fraction"):
        diagonal_split(8, 1.5)
    with pytest.raises(ValueError, match="batch_size"):
        diagonal_split(0, 0.5)


def distillation_pair(seed: int, vocab: int = 6) -> tuple[Any, fl.XPredictor]:
    """A random two-time student (with a non-zero second time embedding) and a teacher."""
    torch.manual_seed(seed)
    network = DiT(vocab, dim=16, depth=1, heads=2, two_time=True, dropout=0.0).eval()
    teacher = fl.XPredictor(DiT(vocab, dim=16, depth=1, heads=2, dropout=0.0).eval())
    with torch.no_grad():  # away from the zero-output initialisation: every term non-zero
        for parameter in [*network.parameters(), *teacher.backbone.parameters()]:
            parameter.add_(0.3 * torch.randn_like(parameter))
    student = fl.XPredMap(fl.XPredictor(network), fl.LinearInterpolant(), two_time=True)
    return student, teacher


@pytest.mark.parametrize("per_token", [False, True])
def test_the_split_loss_puts_one_term_of_the_v2_loss_on_each_row(per_token: bool) -> None:
    student, teacher = distillation_pair(0)
    batch, length = 10, 5
    x = torch.randn(batch, length, 6)
    shape = (batch, length) if per_token else (batch,)
    t = 0.8 * torch.rand(shape)
    s = t + (1 - t) * torch.rand(shape)
    split = diagonal_split(batch, 0.4, generator=torch.Generator().manual_seed(1))
    got = split_semigroup_kl_loss(student, teacher, x, t, s, split)
    # Oracle: the full v2 loss is jump + diagonal on every row.
    both = distill.semigroup_kl_loss(student, teacher, x, t, s)
    with torch.no_grad():
        diagonal = distill.diagonal_kl(student, teacher(x, t), x, t)
    torch.testing.assert_close(got[split.diagonal], diagonal[split.diagonal])
    torch.testing.assert_close(got[split.off_diagonal], (both - diagonal)[split.off_diagonal])
    for rows in split:  # both terms are non-trivial here, so the comparisons mean something
        assert got[rows].mean().item() > 1e-4


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_the_split_loss_trains_only_the_chosen_term(fraction: float) -> None:
    student, teacher = distillation_pair(2)
    x, t, s = torch.randn(4, 3, 6), torch.full((4,), 0.2), torch.full((4,), 0.9)
    parameters = [*student.predictor.backbone.parameters()]
    split = split_semigroup_kl_loss(student, teacher, x, t, s, diagonal_split(4, fraction))
    got = torch.autograd.grad(split.mean(), parameters, allow_unused=True)
    with torch.no_grad():
        teacher_probs = teacher(x, t)
    diagonal = distill.diagonal_kl(student, teacher_probs, x, t)
    term = (
        diagonal
        if fraction == 1.0
        else distill.semigroup_kl_loss(student, teacher, x, t, s) - diagonal
    )
    expected = torch.autograd.grad(term.mean(), parameters, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in got)
    for mine, oracle in zip(got, expected, strict=True):
        if oracle is None:
            assert mine is None or bool((mine == 0).all())
        else:
            assert mine is not None
            torch.testing.assert_close(mine, oracle)


def test_a_split_of_another_batch_is_refused() -> None:
    student, teacher = distillation_pair(3)
    x, t, s = torch.randn(4, 3, 6), torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="the split covers 5 rows, the batch has 4"):
        split_semigroup_kl_loss(student, teacher, x, t, s, diagonal_split(5, 0.5))


class RowCounting(torch.nn.Module):
    """A network that records the rows of every call (a self-conditioned one's estimate too)."""

    def __init__(self, network: DiT) -> None:
        super().__init__()
        self.network = network
        self.call_rows: list[int] = []

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None, **previous: Any
    ) -> torch.Tensor:
        self.call_rows.append(len(x))
        return self.network(x, t, **previous) if s is None else self.network(x, t, s, **previous)


def self_conditioned_pair(seed: int, vocab: int = 6) -> tuple[RowCounting, fl.XPredictor]:
    """A random self-conditioned two-time student network, its own-estimate teacher (float64)."""
    torch.manual_seed(seed)
    network = DiT(vocab, 16, 1, 2, two_time=True, dropout=0.0, self_conditioning=True)
    teacher = DiT(vocab, 16, 1, 2, dropout=0.0, self_conditioning=True)
    network, teacher = network.double().eval(), teacher.double().eval()
    with torch.no_grad():  # the estimate's input non-zero: it changes every prediction
        for parameter in [*network.parameters(), *teacher.parameters()]:
            parameter.add_(0.3 * torch.randn_like(parameter))
    return RowCounting(network), fl.XPredictor(fl.WithOwnEstimate(teacher))


def bound_student(network: RowCounting, previous: torch.Tensor) -> fl.XPredMap:
    bound = fl.XPredictor(fl.WithPrevious(network, previous))
    return fl.XPredMap(bound, fl.LinearInterpolant(), two_time=True)


def jump_times(batch: int, length: int, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, length) if per_token else (batch,)
    t = 0.8 * torch.rand(shape)
    return t, t + (1 - t) * torch.rand(shape)


@pytest.mark.parametrize("per_token", [False, True])
def test_a_self_conditioned_students_split_loss_is_each_rows_loss_alone(per_token: bool) -> None:
    """Oracle: every row computed alone, with its own row of the estimate bound."""
    network, teacher = self_conditioned_pair(4)
    batch, length = 8, 5
    x = torch.randn(batch, length, 6, dtype=torch.float64)
    t, s = (times.double() for times in jump_times(batch, length, per_token))
    coins = torch.Generator().manual_seed(5)
    previous = fl.draw_previous(network, x, t, s, generator=coins)
    estimated = previous.flatten(1).abs().sum(1) > 0
    assert 0 < int(estimated.sum()) < batch  # rows with an estimate and rows with zeros
    split = diagonal_split(batch, 0.5, generator=torch.Generator().manual_seed(6))
    parameters = [*network.parameters()]
    got = split_semigroup_kl_loss(bound_student(network, previous), teacher, x, t, s, split)
    got_gradients = torch.autograd.grad(got.sum(), parameters)
    empty = torch.zeros(0, dtype=torch.long)
    alone = []
    gradients = [torch.zeros_like(parameter) for parameter in parameters]
    for row in range(batch):
        one = torch.tensor([row])
        diagonal = bool((split.diagonal == row).any())
        part = (
            DiagonalSplit(torch.tensor([0]), empty)
            if diagonal
            else DiagonalSplit(empty, torch.tensor([0]))
        )
        student = bound_student(network, previous[one])
        loss = split_semigroup_kl_loss(student, teacher, x[one], t[one], s[one], part)
        alone.append(loss[0])
        for total, gradient in zip(
            gradients, torch.autograd.grad(loss.sum(), parameters), strict=True
        ):
            total += gradient
    torch.testing.assert_close(got, torch.stack(alone), rtol=0, atol=1e-6)
    for mine, oracle in zip(got_gradients, gradients, strict=True):
        torch.testing.assert_close(mine, oracle, rtol=1e-5, atol=1e-6)
    # The estimate matters: with none bound, the same rows give other losses.
    unbound = split_semigroup_kl_loss(bound_student(network, None), teacher, x, t, s, split)
    assert (unbound - got)[estimated].abs().max() > 1e-4
    for rows in split:
        assert got[rows].mean().item() > 1e-4


@pytest.mark.parametrize("self_conditioned", [False, True])
def test_the_split_loss_makes_no_more_network_calls_than_one_per_term_and_row(
    self_conditioned: bool,
) -> None:
    """Student: one call on the batch, the target's two on the jump rows; teacher: diagonal."""
    network, _ = self_conditioned_pair(7)
    plain_student, plain_teacher = distillation_pair(7)
    teacher_network = RowCounting(plain_teacher.backbone)
    teacher = fl.XPredictor(teacher_network)
    batch, length = 10, 4
    x = torch.randn(batch, length, 6)
    t, s = jump_times(batch, length, per_token=False)
    if self_conditioned:
        student = bound_student(network, fl.draw_previous(network, x, t, s))
    else:
        network = RowCounting(plain_student.predictor.backbone)
        student = fl.XPredMap(fl.XPredictor(network), fl.LinearInterpolant(), two_time=True)
    split = diagonal_split(batch, 0.3, generator=torch.Generator().manual_seed(8))
    on, off = len(split.diagonal), len(split.off_diagonal)
    network.call_rows.clear()
    with fl.count_network_calls() as calls:
        split_semigroup_kl_loss(student, teacher, x, t, s, split)
    # Before: the diagonal (on rows), the target's two calls and the jump (off rows each).
    assert calls.count == 4  # before: 5 (the jump and the diagonal each had their own)
    assert sorted(network.call_rows) == sorted([batch, off, off])
    assert sum(network.call_rows) == on + 3 * off  # the same rows as one call per term and row
    assert teacher_network.call_rows == [on]


def test_soft_cap_is_a_bounded_odd_near_identity() -> None:
    z = torch.linspace(-200, 200, 2001, dtype=torch.float64, requires_grad=True)
    capped = soft_cap(z, 30.0)
    torch.testing.assert_close(capped, 30.0 * torch.tanh(z / 30.0))
    assert bool((capped.abs() < 30.0).all())
    torch.testing.assert_close(soft_cap(-z, 30.0), -capped)
    small = z.detach().abs() < 3
    # tanh(u) = u - u^3/3 + ...: |c tanh(z/c) - z| <= |z|^3 / (3 c^2)
    error = (capped.detach() - z.detach())[small].abs()
    assert bool((error <= z.detach()[small].abs() ** 3 / (3 * 30.0**2) + 1e-12).all())
    (slope,) = torch.autograd.grad(capped[1000], z)
    assert slope[1000].item() == pytest.approx(1.0)
    assert bool((torch.diff(capped.detach()) > 0).all())
    with pytest.raises(ValueError, match="positive"):
        soft_cap(z, 0.0)


@pytest.mark.parametrize("two_time", [False, True])
def test_a_soft_capped_backbone_feeds_capped_logits_to_the_predictor(two_time: bool) -> None:
    from flowlm.backbones import DiT

    network = DiT(6, dim=16, depth=1, heads=2, two_time=two_time, dropout=0.0)
    with torch.no_grad():
        network.output.weight.normal_(std=20.0)
    x, t = torch.randn(2, 3, 6), torch.rand(2)
    times = (t, torch.ones(2)) if two_time else (t,)
    predictor = fl.XPredictor(SoftCapped(network, cap=5.0))
    with fl.count_network_calls() as calls:
        logits = predictor.logits(x, *times)
    assert calls.count == 1
    raw = network(x, *times)
    assert raw.abs().max() > 5.0
    torch.testing.assert_close(logits, 5.0 * torch.tanh(raw / 5.0))
    with pytest.raises(ValueError, match="positive"):
        SoftCapped(network, cap=-1.0)
