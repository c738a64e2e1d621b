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
from flowlm.recipes import SoftCapped, diagonal_split, soft_cap, split_semigroup_kl_loss

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
