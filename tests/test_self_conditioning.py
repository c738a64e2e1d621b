"""Self-conditioning: off means bit-for-bit the plain model, the sampler passes estimates on for free."""

import math

import pytest
import torch
from jaxtyping import TypeCheckError
from torch import Tensor

import flowlm as fl
from flowlm import distill
from flowlm.backbones import DiT
from flowlm.network_calls import count_network_calls
from flowlm.self_conditioning import (
    SelfConditionedMap,
    WithOwnEstimate,
    WithPrevious,
    draw_previous,
    lift_state,
    self_conditioned_logits,
    split_state,
)

V, L = 5, 3


def _pair(two_time: bool = False) -> tuple[DiT, DiT]:
    """A plain DiT and the same DiT (same seed) with the self-conditioning input."""
    torch.manual_seed(0)
    plain = DiT(V, dim=16, depth=2, heads=2, two_time=two_time, dropout=0.0)
    torch.manual_seed(0)
    conditioned = DiT(
        V, dim=16, depth=2, heads=2, two_time=two_time, dropout=0.0, self_conditioning=True
    )
    with torch.no_grad():  # a trained-looking output layer, so logits are not all zero
        for model in (plain, conditioned):
            torch.manual_seed(1)
            model.output.weight.normal_()
            for block in model.blocks:
                for parameter in block.modulation.parameters():  # pyright: ignore[reportAttributeAccessIssue]
                    parameter.normal_(std=0.1)
    return plain, conditioned


def _probs(*shape: int) -> Tensor:
    return torch.softmax(torch.randn(*shape), -1)


@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_a_fresh_input_changes_nothing_bit_for_bit(two_time: bool, per_token: bool) -> None:
    plain, conditioned = _pair(two_time)
    shared = plain.state_dict()
    own = conditioned.state_dict()
    assert set(own) - set(shared) == {"previous_embedding.weight"}
    assert all(torch.equal(shared[k], own[k]) for k in shared)
    x = torch.randn(2, L, V)
    t = torch.rand(2, L) if per_token else torch.rand(2)
    s = (torch.rand(2, L) if per_token else torch.rand(2)) if two_time else None
    times = (t,) if s is None else (t, s)
    expected = plain(x, *times)
    assert expected.abs().max() > 0
    assert torch.equal(conditioned(x, *times, previous=_probs(2, L, V)), expected)
    assert torch.equal(conditioned(x, *times), expected)


def test_a_trained_input_reads_the_estimate() -> None:
    _, conditioned = _pair()
    assert conditioned.previous_embedding is not None
    with torch.no_grad():
        conditioned.previous_embedding.weight.normal_()
    x, t, previous = torch.randn(2, L, V), torch.rand(2), _probs(2, L, V)
    with_estimate = conditioned(x, t, previous=previous)
    assert not torch.allclose(with_estimate, conditioned(x, t))
    # no estimate is the zero estimate
    assert torch.equal(conditioned(x, t, previous=torch.zeros(2, L, V)), conditioned(x, t))


def test_the_input_is_refused_where_it_does_not_fit(checks: str) -> None:
    plain, conditioned = _pair()
    x, t = torch.randn(2, L, V), torch.rand(2)
    with pytest.raises(ValueError, match="self_conditioning=True"):
        plain(x, t, previous=_probs(2, L, V))
    match = "parameter 'previous'" if checks == "jaxtyping" else r"previous has shape \(2, 4, 5\)"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        conditioned(x, t, previous=_probs(2, L + 1, V))


def test_lift_and_split_are_inverse(checks: str) -> None:
    x, previous = torch.randn(2, L, V), _probs(2, L, V)
    state = split_state(lift_state(x, previous))
    assert torch.equal(state.x, x) and torch.equal(state.previous, previous)
    assert torch.equal(split_state(lift_state(x)).previous, torch.zeros_like(x))
    with pytest.raises(ValueError, match="2 \\* vocab"):
        split_state(torch.zeros(1, 1, 3))
    match = "parameter 'previous'" if checks == "jaxtyping" else "must match"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        lift_state(x, previous[:, :1])


@pytest.mark.parametrize("two_time", [False, True])
def test_the_sampler_equals_the_plain_sampler_when_the_input_is_fresh(two_time: bool) -> None:
    plain, conditioned = _pair(two_time)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    noise, grid = torch.randn(2, L, V), fl.time_grid(4)
    expected = fl.rollout(fl.XPredMap(fl.XPredictor(plain), path, two_time=two_time), noise, grid)
    got = fl.rollout(
        SelfConditionedMap(conditioned, path, two_time=two_time), lift_state(noise), grid
    )
    assert got.nfe == expected.nfe == 4
    assert torch.equal(split_state(got.x).x, expected.x)


class _Recorder:
    """A self-conditioned toy network that keeps every estimate it was given (test-only)."""

    def __init__(self) -> None:
        self.seen: list[Tensor] = []
        self.weight = torch.randn(V, V, generator=torch.Generator().manual_seed(3))

    def __call__(
        self, x: Tensor, t: Tensor, s: Tensor | None = None, /, previous: Tensor | None = None
    ) -> Tensor:
        previous = torch.zeros_like(x) if previous is None else previous
        self.seen.append(previous)
        return x @ self.weight + 4 * previous + t[:, None, None]


def test_each_step_reads_the_estimate_of_the_step_before_at_no_extra_call() -> None:
    network = _Recorder()
    path = fl.LinearInterpolant()
    grid = fl.time_grid(5)
    trajectory = fl.rollout(
        SelfConditionedMap(network, path), lift_state(torch.randn(3, L, V)), grid, save_states=True
    )
    assert trajectory.nfe == 5 == len(network.seen)
    assert trajectory.states is not None
    assert torch.equal(network.seen[0], torch.zeros(3, L, V))
    for step in range(1, 5):  # the state after step k carries x1_hat of step k ...
        x, previous = split_state(trajectory.states[step])
        before = split_state(trajectory.states[step - 1])  # recompute x1_hat from its inputs
        logits = before.x @ network.weight + 4 * before.previous + grid[step - 1]
        expected = torch.softmax(logits, -1)
        torch.testing.assert_close(previous, expected)
        assert torch.equal(network.seen[step], previous)  # ... and step k+1 is fed exactly it
        assert x.shape == (3, L, V)
    final = split_state(trajectory.x)
    assert torch.equal(final.x, final.previous)  # the last step lands on its estimate


def test_estimate_first_makes_two_calls_the_second_self_conditioned_on_the_first() -> None:
    network = _Recorder()
    path = fl.LinearInterpolant()
    noise = torch.randn(2, L, V)
    trajectory = fl.rollout(
        SelfConditionedMap(network, path, estimate_first=True), lift_state(noise), fl.time_grid(1)
    )
    assert trajectory.nfe == 2
    t = torch.zeros(2)[:, None, None]
    first = torch.softmax(noise @ network.weight + t, -1)
    second = torch.softmax(noise @ network.weight + 4 * first + t, -1)
    torch.testing.assert_close(network.seen[1], first)
    torch.testing.assert_close(split_state(trajectory.x).x, second)


@pytest.mark.parametrize("two_time", [False, True])
def test_guidance_is_one_batched_call_with_the_guided_logits(two_time: bool) -> None:
    _, conditioned = _pair(two_time)
    assert conditioned.previous_embedding is not None
    with torch.no_grad():
        conditioned.previous_embedding.weight.normal_()
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    x, previous = torch.randn(2, L, V), _probs(2, L, V)
    t, s = torch.full((2,), 0.3), torch.full((2,), 0.6)
    lifted = lift_state(x, previous)
    plain_map = SelfConditionedMap(conditioned, path, two_time=two_time)
    with fl.count_network_calls() as calls:
        unguided = plain_map(lifted, t, s)
        zero = SelfConditionedMap(conditioned, path, two_time=two_time, guidance=0.0)(lifted, t, s)
        guided = SelfConditionedMap(conditioned, path, two_time=two_time, guidance=2.5)(
            lifted, t, s
        )
    assert calls.count == 3
    torch.testing.assert_close(zero, unguided, rtol=0, atol=1e-6)
    times = (t, s) if two_time else (t,)
    with torch.no_grad():
        z_cond = conditioned(x, *times, previous=previous)
        z_zero = conditioned(x, *times)
    x1_hat = torch.softmax(z_cond + 2.5 * (z_cond - z_zero), -1)
    expected = lift_state(path.step(x, x1_hat, t, s), x1_hat)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(guided, unguided, atol=1e-3)


def test_draw_previous_flips_one_coin_per_example_on_the_device() -> None:
    network = _Recorder()
    x, t = torch.randn(4000, 1, V), torch.rand(4000)
    estimate = torch.softmax(x @ network.weight + t[:, None, None], -1)
    all_in = draw_previous(network, x, t, probability=1.0)
    torch.testing.assert_close(all_in, estimate)
    assert not all_in.requires_grad
    assert torch.equal(draw_previous(network, x, t, probability=0.0), torch.zeros_like(x))
    half = draw_previous(network, x, t, generator=torch.Generator().manual_seed(0))
    kept = half.sum(-1).squeeze(-1) > 0.5
    assert torch.equal(half[kept], estimate[kept])
    assert torch.equal(half[~kept], torch.zeros_like(half[~kept]))
    rate = kept.double().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / 4000)
    again = draw_previous(network, x, t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, half)
    with pytest.raises(ValueError, match="probability"):
        draw_previous(network, x, t, probability=1.5)


def test_training_logits_take_the_gradient_through_the_second_call_only() -> None:
    _, conditioned = _pair()
    assert conditioned.previous_embedding is not None
    with torch.no_grad():
        conditioned.previous_embedding.weight.normal_()
    x, t, tokens = torch.randn(6, L, V), torch.rand(6), torch.randint(0, V, (6, L))
    generator = torch.Generator().manual_seed(5)
    with fl.count_network_calls() as calls:
        logits = self_conditioned_logits(conditioned, x, t, generator=generator)
    assert calls.count == 2
    fl.cross_entropy(logits, tokens).mean().backward()
    got = [p.grad.clone() for p in conditioned.parameters() if p.grad is not None]
    conditioned.zero_grad()
    previous = draw_previous(conditioned, x, t, generator=torch.Generator().manual_seed(5))
    fl.cross_entropy(conditioned(x, t, previous=previous), tokens).mean().backward()
    expected = [p.grad for p in conditioned.parameters() if p.grad is not None]
    assert len(got) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_self_conditioned_two_time_student_trains_with_the_distillation_losses() -> None:
    plain, conditioned = _pair(two_time=True)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    torch.manual_seed(2)
    teacher_net = DiT(V, dim=16, depth=1, heads=2, dropout=0.0)
    teacher = fl.XPredictor(teacher_net)
    x, tokens = torch.randn(4, L, V), torch.randint(0, V, (4, L))
    pair = fl.time_pairs(4, generator=torch.Generator().manual_seed(0))
    previous = draw_previous(conditioned, x, pair.t, pair.s, probability=1.0)

    def student(network: DiT, estimate: Tensor | None) -> fl.XPredMap:
        predictor = fl.XPredictor(
            WithPrevious(network, estimate) if estimate is not None else network
        )
        return fl.XPredMap(predictor, path, two_time=True)

    fresh = distill.semigroup_kl_loss(student(conditioned, previous), teacher, x, pair.t, pair.s)
    reference = distill.semigroup_kl_loss(student(plain, None), teacher, x, pair.t, pair.s)
    assert torch.equal(fresh, reference)  # a fresh input: exactly the plain student's loss
    assert conditioned.previous_embedding is not None
    with torch.no_grad():
        conditioned.previous_embedding.weight.normal_(std=0.3)
    for loss in (distill.semigroup_kl_loss, distill.lagrangian_kl_loss, distill.eulerian_kl_loss):
        conditioned.zero_grad()
        token_loss = loss(student(conditioned, previous), teacher, x, pair.t, pair.s)
        assert token_loss.shape == (4, L) and bool(torch.isfinite(token_loss).all())
        token_loss.mean().backward()
        grad = conditioned.previous_embedding.weight.grad
        assert grad is not None and grad.abs().max() > 0
    assert all(p.grad is None for p in teacher_net.parameters())
    _, sc_teacher_net = _pair()  # a self-conditioned teacher, its estimate bound the same way
    assert sc_teacher_net.previous_embedding is not None
    with torch.no_grad():
        sc_teacher_net.previous_embedding.weight.normal_()
    teacher_previous = draw_previous(sc_teacher_net, x, pair.t, probability=1.0)
    sc_teacher = fl.XPredictor(WithPrevious(sc_teacher_net, teacher_previous))
    with torch.no_grad():
        expected_diagonal = torch.softmax(sc_teacher_net(x, pair.t, previous=teacher_previous), -1)
    conditioned.zero_grad()
    token_loss = distill.semigroup_kl_loss(
        student(conditioned, previous), sc_teacher, x, pair.t, pair.s
    )
    token_loss.mean().backward()
    assert all(p.grad is None for p in sc_teacher_net.parameters())
    diagonal = distill.diagonal_kl(student(conditioned, previous), expected_diagonal, x, pair.t)
    assert bool((token_loss >= diagonal - 1e-6).all())  # the jump term is a KL: nonnegative
    self_loss = distill.self_semigroup_loss(
        student(conditioned, previous), tokens, x, pair.t, pair.s
    )
    assert bool(torch.isfinite(self_loss).all())


@pytest.mark.parametrize("two_time", [False, True])
def test_the_own_estimate_is_the_network_on_its_first_estimate_in_two_calls(
    two_time: bool,
) -> None:
    _, conditioned = _pair(two_time)
    assert conditioned.previous_embedding is not None
    with torch.no_grad():  # a trained input: the estimate changes the logits
        conditioned.previous_embedding.weight.normal_()
    x = torch.randn(3, L, V)
    times = (torch.rand(3), torch.rand(3)) if two_time else (torch.rand(3),)
    first = torch.softmax(conditioned(x, *times), -1)
    expected = conditioned(x, *times, previous=first)
    assert not torch.allclose(expected, conditioned(x, *times))
    predictor = fl.XPredictor(WithOwnEstimate(conditioned))
    with count_network_calls() as calls:
        got = predictor.logits(x, *times)
    assert calls.count == 2
    assert torch.equal(got, expected)
    always = draw_previous(conditioned, x, *times, probability=1.0)
    assert torch.equal(got, conditioned(x, *times, previous=always))
    got.sum().backward()  # the gradient flows through the second call only
    assert conditioned.previous_embedding.weight.grad is not None


def test_one_own_estimate_jump_is_the_two_call_sampler_from_no_estimate() -> None:
    """XPredMap of WithOwnEstimate = SelfConditionedMap(estimate_first=True) from [noise, 0]."""
    _, conditioned = _pair(two_time=True)
    assert conditioned.previous_embedding is not None
    with torch.no_grad():
        conditioned.previous_embedding.weight.normal_()
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    noise, grid = torch.randn(4, L, V), fl.time_grid(1)
    own = fl.XPredMap(fl.XPredictor(WithOwnEstimate(conditioned)), path, two_time=True)
    two_call = SelfConditionedMap(conditioned, path, two_time=True, estimate_first=True)
    expected = fl.rollout(two_call, lift_state(noise), grid)
    got = fl.rollout(own, noise, grid)
    assert got.nfe == expected.nfe == 2
    assert torch.equal(got.x, split_state(expected.x).x)


def test_a_soft_capped_self_conditioned_network_still_reads_its_estimate() -> None:
    _, conditioned = _pair()
    assert conditioned.previous_embedding is not None
    with torch.no_grad():
        conditioned.previous_embedding.weight.normal_()
        conditioned.output.weight.mul_(20.0)  # logits well beyond the cap
    capped = fl.SoftCapped(conditioned, cap=2.0)
    x, t, previous = torch.randn(2, L, V), torch.rand(2), _probs(2, L, V)
    expected = fl.soft_cap(conditioned(x, t, previous=previous), 2.0)
    assert torch.equal(capped(x, t, previous=previous), expected)
    assert torch.equal(capped(x, t), fl.soft_cap(conditioned(x, t), 2.0))
    assert not torch.equal(expected, fl.soft_cap(conditioned(x, t), 2.0))
    assert bool(expected.abs().max() <= 2.0) and bool(conditioned(x, t).abs().max() > 2.0)
