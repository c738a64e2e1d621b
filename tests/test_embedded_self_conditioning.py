"""Self-conditioning on the embedded path: the dense self-conditioned path is the oracle."""

import pytest
import torch
from jaxtyping import TypeCheckError
from live_tensors import LiveTensorBytes

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.distill import semigroup_kl_loss
from flowlm.embedded import EmbeddedXPredictor, EmbeddedXPredMap, sampled_tokens
from flowlm.embedded_distill import embedded_semigroup_kl_loss
from flowlm.embedded_self_conditioning import (
    EmbeddedSelfConditionedMap,
    EmbeddedWithPrevious,
    draw_embedded_previous,
    embedded_self_conditioned_loss,
)

V, D, B, L = 40, 8, 3, 6


def conditioned_dit(two_time: bool = False, seed: int = 0, vocab: int = V) -> DiT:
    """A self-conditioned DiT with every weight moved, the estimate's table included."""
    model = DiT(
        vocab,
        dim=D,
        depth=1,
        heads=2,
        two_time=two_time,
        dropout=0.0,
        frequency_dim=8,
        self_conditioning=True,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.double().eval()


def table(model: DiT) -> torch.Tensor:
    assert model.previous_table is not None
    return model.previous_table


def noisy_state(batch: int = B, seq: int = L, vocab: int = V) -> tuple[torch.Tensor, torch.Tensor]:
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(vocab))
    tokens = torch.randint(vocab, (batch, seq))
    t = torch.rand(batch, dtype=torch.float64)
    x1 = fl.one_hot(tokens, vocab, torch.float64)
    return path.sample(torch.randn(batch, seq, vocab, dtype=torch.float64), x1, t), tokens


# ---------------------------------------------------------------- the backbone


@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_estimate_as_its_product_gives_the_dense_logits(
    two_time: bool, per_token: bool, dtype: torch.dtype
):
    model = conditioned_dit(two_time, seed=1).to(dtype)
    x = torch.randn(B, L, V, dtype=dtype)
    previous = torch.softmax(3 * torch.randn(B, L, V, dtype=dtype), -1)
    t = torch.rand(B, L, dtype=dtype) if per_token else torch.rand(B, dtype=dtype)
    times = (t, torch.rand_like(t)) if two_time else (t,)
    dense = model(x, *times, previous=previous)
    ours = model.forward_embedded(x @ model.input_table, *times, previous=previous @ table(model))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, dense, rtol=tolerance, atol=tolerance)
    # the estimate matters: without it the logits move by far more than the tolerance
    assert (model(x, *times) - dense).abs().max() > 1e-2


def test_previous_table_is_the_estimate_input_and_absent_without_it():
    model = conditioned_dit()
    assert model.previous_embedding is not None
    assert torch.equal(table(model), model.previous_embedding.weight.T)
    assert DiT(V, dim=D, depth=1, heads=2).previous_table is None


def test_an_embedded_estimate_is_refused_where_it_does_not_fit(checks: str):
    plain = DiT(V, dim=D, depth=1, heads=2)
    h, t = torch.randn(B, L, D), torch.rand(B)
    with pytest.raises((TypeCheckError, ValueError), match=r"self_conditioning=True|previous"):
        plain.embedded_features(h, t, previous=torch.randn(B, L, D))
    model = conditioned_dit().float()
    with pytest.raises((TypeCheckError, ValueError), match=r"must match|previous"):
        model.embedded_features(h, t, previous=torch.randn(B, L - 1, D))


# ---------------------------------------------------------------- training


def test_the_drawn_estimate_is_the_dense_draw_times_its_table():
    model = conditioned_dit(seed=2)
    x_t, _ = noisy_state(batch=16)
    t = torch.rand(16, dtype=torch.float64)
    dense = fl.draw_previous(model, x_t, t, generator=torch.Generator().manual_seed(4))
    ours = draw_embedded_previous(
        model, x_t @ model.input_table, t, generator=torch.Generator().manual_seed(4), chunk_size=4
    )
    torch.testing.assert_close(ours, dense @ table(model), rtol=1e-12, atol=1e-12)
    kept = dense.sum((1, 2)) > 0  # the same coins: estimates and zeros on the same examples
    assert 0 < int(kept.sum()) < 16
    assert bool((ours[~kept] == 0).all()) and bool((ours[kept].abs().sum((1, 2)) > 0).all())
    # the stop-gradient is on the estimate: q is differentiable in the table P only, as the
    # dense input layer's product with the drawn estimate
    weight = model.previous_embedding.weight
    (ours @ torch.arange(D, dtype=torch.float64)).sum().backward()
    (expected,) = torch.autograd.grad(
        (dense @ table(model) @ torch.arange(D).double()).sum(), weight
    )
    assert weight.grad is not None and weight.grad.abs().max() > 1e-3
    torch.testing.assert_close(weight.grad, expected)
    assert all(p.grad is None for p in model.parameters() if p is not weight)


@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_loss_and_its_gradient_equal_the_dense_self_conditioned_loss(
    two_time: bool, dtype: torch.dtype
):
    model = conditioned_dit(two_time, seed=3).to(dtype)
    x_t, tokens = noisy_state(batch=8)
    x_t = x_t.to(dtype)
    t = torch.rand(8, dtype=dtype)
    s = torch.rand(8, dtype=dtype) if two_time else None
    logits = fl.self_conditioned_logits(
        model, x_t, t, s, generator=torch.Generator().manual_seed(5)
    )
    dense = fl.cross_entropy(logits, tokens)
    h_t = x_t @ model.input_table.detach()
    generator = torch.Generator().manual_seed(5)
    ours = embedded_self_conditioned_loss(
        model, h_t, t, tokens, s, generator=generator, chunk_size=4
    )
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, dense, rtol=tolerance, atol=tolerance)
    parameters = [p for p in model.parameters() if p is not model.embedding.weight]
    want = torch.autograd.grad(dense.sum(), parameters)
    got = torch.autograd.grad(ours.sum(), parameters)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=100 * tolerance, atol=100 * tolerance)
    # the estimate's table is trained (through the second call) and the estimate mattered
    assert got[-1].abs().max() > 1e-6
    unconditioned = fl.cross_entropy(
        fl.XPredictor(fl.WithPrevious(model, None)).logits(x_t, t, s), tokens
    )
    assert (unconditioned - dense).abs().max() > 1e-3


def test_the_training_step_makes_two_calls_and_the_coin_is_drawn_on_the_device():
    model = conditioned_dit()
    h, t, tokens = (
        torch.randn(B, L, D, dtype=torch.float64),
        torch.rand(B, dtype=torch.float64),
        torch.randint(V, (B, L)),
    )
    with fl.count_network_calls() as calls:
        embedded_self_conditioned_loss(model, h, t, tokens)
    assert calls.count == 2
    with pytest.raises(ValueError, match=r"probability must lie in \[0, 1\]"):
        draw_embedded_previous(model, h, t, probability=1.5)
    # all or none: probability 1 is the estimate for every example, 0 zeros
    assert bool((draw_embedded_previous(model, h, t, probability=0.0) == 0).all())
    assert bool((draw_embedded_previous(model, h, t, probability=1.0).abs().sum((1, 2)) > 0).all())


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("estimate_first", [False, True])
@pytest.mark.parametrize("n_steps", [1, 8])
def test_the_rollout_on_h_and_q_equals_the_dense_self_conditioned_rollout(
    two_time: bool, estimate_first: bool, n_steps: int
):
    model = conditioned_dit(two_time, seed=6)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    x0 = torch.randn(B, L, V, dtype=torch.float64)
    grid = fl.time_grid(n_steps, dtype=torch.float64)
    options = {"two_time": two_time, "estimate_first": estimate_first}
    dense = fl.rollout(fl.SelfConditionedMap(model, path, **options), fl.lift_state(x0), grid)
    sampler = EmbeddedSelfConditionedMap(model, path, chunk_size=4, **options)
    ours = fl.rollout(sampler, x0 @ model.input_table, grid)
    x, previous = fl.split_state(dense.x)
    # the state ends on [x1_hat E, x1_hat P, argmax x1_hat] of the dense result
    torch.testing.assert_close(ours.x[..., :D], x @ model.input_table, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        ours.x[..., D : 2 * D], previous @ table(model), rtol=1e-10, atol=1e-12
    )
    assert torch.equal(sampled_tokens(ours.x), fl.decode(x))
    assert ours.nfe == dense.nfe == n_steps * (2 if estimate_first else 1)
    assert x.std() > 1e-3  # predictions are far from uniform


@pytest.mark.parametrize("two_time", [False, True])
def test_guidance_on_the_estimate_is_the_dense_guidance_in_one_call(two_time: bool):
    model = conditioned_dit(two_time, seed=11)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    x0 = torch.randn(B, L, V, dtype=torch.float64)
    grid = fl.time_grid(4, dtype=torch.float64)
    options = {"two_time": two_time, "guidance": 3.0}
    dense = fl.rollout(fl.SelfConditionedMap(model, path, **options), fl.lift_state(x0), grid)
    sampler = EmbeddedSelfConditionedMap(model, path, chunk_size=4, **options)
    ours = fl.rollout(sampler, x0 @ model.input_table, grid)
    x, previous = fl.split_state(dense.x)
    torch.testing.assert_close(ours.x[..., :D], x @ model.input_table, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        ours.x[..., D : 2 * D], previous @ table(model), rtol=1e-10, atol=1e-12
    )
    assert torch.equal(sampled_tokens(ours.x), fl.decode(x))
    assert ours.nfe == dense.nfe == 4
    # guidance changes the samples' path: the unguided rollout ends elsewhere
    unguided = fl.rollout(
        EmbeddedSelfConditionedMap(model, path, two_time=two_time), x0 @ model.input_table, grid
    )
    assert (unguided.x[..., :D] - ours.x[..., :D]).abs().max() > 1e-3


def test_each_step_reads_the_estimate_of_the_step_before():
    model = conditioned_dit(seed=7)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    x0 = torch.randn(B, L, V, dtype=torch.float64)
    grid = fl.time_grid(4, dtype=torch.float64)[:-1]  # stop before the data
    dense = fl.rollout(
        fl.SelfConditionedMap(model, path), fl.lift_state(x0), grid, save_states=True
    )
    sampler = EmbeddedSelfConditionedMap(model, path)
    start = sampler.initial_state(x0 @ model.input_table)
    ours = fl.rollout(sampler, start, grid, save_states=True)
    assert dense.states is not None and ours.states is not None
    for h, lifted in zip(ours.states, dense.states, strict=True):
        x, previous = fl.split_state(lifted)
        torch.testing.assert_close(h[..., :D], x @ model.input_table)
        torch.testing.assert_close(h[..., D : 2 * D], previous @ table(model))
    # a sampler that forgets the estimate goes elsewhere: the carried q changes the path
    plain = fl.rollout(
        EmbeddedXPredMap(EmbeddedXPredictor(EmbeddedWithPrevious(model, None)), path),
        x0 @ model.input_table,
        grid,
    )
    assert (plain.x[..., :D] - ours.x[..., :D]).abs().max() > 1e-4


def test_a_self_conditioned_step_makes_no_vocabulary_sized_tensor_and_no_host_read(monkeypatch):
    vocab, chunk, seq = 4000, 2, 24  # 12 chunks
    model = conditioned_dit(seed=8, vocab=vocab).float().train()
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(vocab))
    sampler = EmbeddedSelfConditionedMap(model.eval(), path, chunk_size=chunk)
    h, t = torch.randn(B, seq, D), torch.rand(B)
    tokens = torch.randint(vocab, (B, seq))
    for name in ("item", "__bool__", "cpu", "tolist", "numpy", "__int__", "__float__"):

        def refuse(*_: object, _name: str = name) -> None:
            raise AssertionError(f"host read: Tensor.{_name}")

        monkeypatch.setattr(torch.Tensor, name, refuse)
    with LiveTensorBytes() as training:
        loss = embedded_self_conditioned_loss(model.train(), h, t, tokens, chunk_size=chunk)
        loss.mean().backward()
    with torch.no_grad(), LiveTensorBytes() as sampling:
        half = torch.full((B,), 0.5)
        state = sampler(sampler(h, torch.zeros(B), half), half, torch.ones(B))
    monkeypatch.undo()
    unit = B * seq * vocab * 4  # one float32 (batch, seq, vocab) tensor
    chunk_unit = B * chunk * vocab * 4
    table_bytes = vocab * D * 4  # a weight's gradient, e.g. the output layer's
    assert chunk_unit < table_bytes < unit // 8
    # no allocation of a (batch, seq, vocab) tensor, nor anything near it
    assert max(size for size, _ in training.allocations) <= table_bytes
    assert max(size for size, _ in sampling.allocations) <= chunk_unit
    # at most a chunk's logits and two chunks' probabilities at once when sampling; the
    # training step holds a few chunks and the weights' gradients, far below one unit
    assert sampling.peak < 4 * chunk_unit
    assert training.peak < unit / 2
    # the tracker sees them: without checkpointing, autograd keeps every chunk's probabilities
    with LiveTensorBytes() as stored:
        embedded_self_conditioned_loss(model, h, t, tokens, chunk_size=chunk, checkpoint=False)
    assert stored.peak > 2 * unit
    assert state.shape == (B, seq, 2 * D + 1)


# ---------------------------------------------------------------- distillation


def test_a_bound_self_conditioned_student_distils_as_the_dense_one():
    teacher_net, student_net = conditioned_dit(seed=9), conditioned_dit(two_time=True, seed=10)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    x_t, _ = noisy_state()
    t = torch.tensor([0.0, 0.3, 0.5], dtype=torch.float64)
    s = torch.tensor([1.0, 0.9, 0.6], dtype=torch.float64)
    # dense: the student bound to its drawn estimate, the teacher on its own estimate
    previous = fl.draw_previous(student_net, x_t, t, s, probability=1.0)
    dense_student = fl.XPredMap(
        fl.XPredictor(fl.WithPrevious(student_net, previous)), path, two_time=True
    )
    teacher = fl.XPredictor(fl.WithOwnEstimate(teacher_net))
    dense = semigroup_kl_loss(dense_student, teacher, x_t, t, s)
    # embedded: the same estimates as products with the tables, drawn on h alone
    h_student, h_teacher = x_t @ student_net.input_table, x_t @ teacher_net.input_table
    q_student = draw_embedded_previous(student_net, h_student, t, s, probability=1.0)
    q_teacher = draw_embedded_previous(teacher_net, h_teacher, t, probability=1.0)
    bound = EmbeddedWithPrevious(student_net, q_student)
    student = EmbeddedXPredMap(EmbeddedXPredictor(bound, chunk_size=4), path, two_time=True)
    embedded_teacher = EmbeddedXPredictor(EmbeddedWithPrevious(teacher_net, q_teacher))
    ours = embedded_semigroup_kl_loss(student, embedded_teacher, h_student, h_teacher, t, s)
    torch.testing.assert_close(ours, dense)
    assert dense.min() > 1e-4


# ---------------------------------------------------------------- validation


def test_a_backbone_without_the_estimate_input_is_refused():
    with pytest.raises(ValueError, match="reads no previous estimate"):
        EmbeddedSelfConditionedMap(DiT(V, dim=D, depth=1, heads=2), fl.LinearInterpolant())
    with pytest.raises(ValueError, match="reads no previous estimate"):
        draw_embedded_previous(DiT(V, dim=D, depth=1, heads=2), torch.randn(B, L, D), torch.rand(B))


def test_wrong_states_are_named(checks: str):
    model = conditioned_dit()
    sampler = EmbeddedSelfConditionedMap(model, fl.LinearInterpolant())
    t = torch.zeros(B, dtype=torch.float64)
    with pytest.raises((TypeCheckError, ValueError), match=r"expected an embedded state|batch seq"):
        sampler(torch.randn(B, L, D + 1, dtype=torch.float64), t, t + 1)
    with pytest.raises((TypeCheckError, ValueError), match=r"estimate has shape|previous"):
        sampler.initial_state(
            torch.randn(B, L, D, dtype=torch.float64), torch.randn(B, L, D - 1, dtype=torch.float64)
        )
    bfloat = EmbeddedSelfConditionedMap(
        conditioned_dit(vocab=300).to(torch.bfloat16), fl.LinearInterpolant()
    )
    with pytest.raises(ValueError, match="cannot hold token ids up to 299"):
        bfloat(torch.randn(B, L, D, dtype=torch.bfloat16), torch.zeros(B), torch.ones(B))
    with pytest.raises(ValueError, match="chunk_size"):
        EmbeddedSelfConditionedMap(model, fl.LinearInterpolant(), chunk_size=0)
