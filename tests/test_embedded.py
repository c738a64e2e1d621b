import math

import pytest
import torch
from jaxtyping import TypeCheckError
from live_tensors import LiveTensorBytes
from torch import nn

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.distill import semigroup_kl_loss
from flowlm.embedded import (
    EmbeddedXPredictor,
    EmbeddedXPredMap,
    embedded_noise,
    embedded_sample,
    noise_factor,
    sampled_tokens,
    sampler_state,
)
from flowlm.embedded_distill import embedded_semigroup_kl_loss
from flowlm.embedded_solvers import EmbeddedODEMap

V, D, B, L = 40, 8, 3, 6


def anisotropic_table(vocab: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows with very different scales and correlated columns: a Gram far from a multiple of I."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(vocab, dim, generator=generator, dtype=torch.float64)
    mixing = torch.eye(dim, dtype=torch.float64) + 0.8 * torch.ones(dim, dim, dtype=torch.float64)
    scales = torch.logspace(-1, 1, dim, dtype=torch.float64)
    return base @ mixing * scales


def perturbed_dit(two_time: bool = False, seed: int = 0, vocab: int = V) -> DiT:
    model = DiT(vocab, dim=D, depth=1, heads=2, two_time=two_time, dropout=0.0, frequency_dim=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.double().eval()


# ---------------------------------------------------------------- the noise


@pytest.mark.parametrize("vocab", [300, 5])  # Cholesky factor, and the direct draw for V <= d
def test_noise_has_the_law_of_eps_times_the_table(vocab: int):
    table = anisotropic_table(vocab, D)
    n = 40_000
    (noise,) = embedded_noise([table], n, 1, generator=torch.Generator().manual_seed(1))
    samples = noise[:, 0]
    gram = table.mT @ table
    scale = gram.diagonal().sqrt()
    # mean: every coordinate within 5 standard errors of zero
    assert bool((samples.mean(0).abs() < 5 * scale / math.sqrt(n)).all())
    # covariance: the correlation-scaled error of each entry is O(1/sqrt(n))
    covariance = samples.mT @ samples / n
    error = (covariance - gram) / torch.outer(scale, scale)
    assert error.abs().max() < 6 * math.sqrt(2 / n)
    # whitened by the true covariance, the sample spectrum lies inside the Marchenko-Pastur edges
    whitening = torch.linalg.inv(torch.linalg.cholesky(gram[None] + 0)[0]).mT if vocab > D else None
    if whitening is not None:
        white = samples @ whitening
        spectrum = torch.linalg.eigvalsh(white.mT @ white / n)
        ratio = D / n
        lower, upper = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
        slack = 3 * n ** (-2 / 3)
        assert spectrum.min() > lower - slack and spectrum.max() < upper + slack
        # isotropic noise of the same total power is far outside them
        iso = torch.randn(n, D, dtype=torch.float64) * scale.mean()
        wrong = torch.linalg.eigvalsh((iso @ whitening).mT @ (iso @ whitening) / n)
        assert wrong.max() > 2 * upper


def test_factor_reproduces_the_gram_and_its_noise_is_exact_in_distribution():
    table = anisotropic_table(200, D)
    factor = noise_factor([table])
    torch.testing.assert_close(factor.mT @ factor, table.mT @ table)
    assert torch.equal(factor, factor.triu())


def test_joint_noise_of_two_tables_is_one_eps():
    teacher = anisotropic_table(300, D, seed=2)
    student = teacher[:, :4] + 0.5 * anisotropic_table(300, 4, seed=3)  # a related table
    n = 40_000
    h_teacher, h_student = embedded_noise([teacher, student], n, 1)
    assert h_teacher.shape == (n, 1, D) and h_student.shape == (n, 1, 4)
    cross = h_teacher[:, 0].mT @ h_student[:, 0] / n
    expected = teacher.mT @ student
    scale = torch.outer((teacher**2).sum(0).sqrt(), (student**2).sum(0).sqrt())
    assert ((cross - expected) / scale).abs().max() < 6 * math.sqrt(2 / n)
    # independent draws would have no cross-covariance at all
    assert (expected / scale).abs().max() > 0.3


def test_noise_is_drawn_on_the_tables_device_with_the_generator():
    table = anisotropic_table(100, D).float()
    first = embedded_noise([table], 2, 3, generator=torch.Generator().manual_seed(5))[0]
    again = embedded_noise([table], 2, 3, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(first, again) and first.dtype == torch.float32


def test_pathwise_gradient_through_the_factor_is_unbiased():
    # E exp(eps W a) = exp(a^T W^T W a / 2), so d/dW = exp(a^T G a / 2) W a a^T exactly
    a = torch.tensor([0.5, -0.2, 0.3], dtype=torch.float64)
    table = anisotropic_table(12, 3)
    table = (table / (table @ a).norm()).requires_grad_(True)  # a^T G a = 1
    generator = torch.Generator().manual_seed(7)
    estimates = []
    for _ in range(20):  # independent batches: their spread gives the standard error
        (noise,) = embedded_noise([table], 20_000, 1, generator=generator)
        (gradient,) = torch.autograd.grad(torch.exp(noise[:, 0] @ a).mean(), table)
        estimates.append(gradient)
    stacked = torch.stack(estimates)
    mean, standard_error = stacked.mean(0), stacked.std(0) / math.sqrt(len(estimates))
    with torch.no_grad():
        exact = torch.exp(0.5 * a @ table.mT @ table @ a) * torch.outer(table @ a, a)
    assert bool(((mean - exact).abs() < 5 * standard_error + 1e-12).all())
    # the test has power: the exact gradient is far from zero in units of the standard error
    assert (exact.abs() / standard_error).max() > 30


def test_singular_gram_is_a_clear_error():
    table = anisotropic_table(100, D)
    with pytest.raises(RuntimeError, match="singular"):
        noise_factor([table, table.clone()])
    with pytest.raises(ValueError, match="one vocabulary"):
        embedded_noise([table, table[:-1]], 2, 2)


# ---------------------------------------------------------------- training


def test_loss_on_h_equals_the_dense_loss_for_the_same_noise():
    model = perturbed_dit()
    dense, embedded = fl.XPredictor(model), EmbeddedXPredictor(model, chunk_size=4)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    tokens, t = torch.randint(V, (B, L)), torch.rand(B, dtype=torch.float64)
    x0 = torch.randn(B, L, V, dtype=torch.float64)
    x_t = path.sample(x0, fl.one_hot(tokens, V, torch.float64), t)
    h_t = embedded_sample(path, embedded.embed(x0), embedded.embed_tokens(tokens), t)
    expected = fl.cross_entropy(dense.logits(x_t, t), tokens)
    torch.testing.assert_close(embedded.cross_entropy(h_t, t, tokens), expected)
    grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    embedded_grads = torch.autograd.grad(
        embedded.cross_entropy(h_t, t, tokens).sum(), list(model.parameters())
    )
    for got, want in zip(embedded_grads, grads, strict=True):
        torch.testing.assert_close(got, want)


def test_training_loss_agrees_in_expectation_with_the_dense_path():
    model = perturbed_dit(seed=4)
    embedded = EmbeddedXPredictor(model)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    n, length = 3000, 2
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(V, (1, length), generator=generator).expand(n, length)
    t = torch.full((n,), 0.6, dtype=torch.float64)
    with torch.no_grad():
        x0 = torch.randn(n, length, V, generator=generator, dtype=torch.float64)
        dense = fl.cross_entropy(
            model(path.sample(x0, fl.one_hot(tokens, V, torch.float64), t), t), tokens
        ).mean(1)
        noise = embedded.noise(n, length, generator=generator)
        h_t = embedded_sample(path, noise, embedded.embed_tokens(tokens), t)
        ours = embedded.cross_entropy(h_t, t, tokens).mean(1)
    error = math.sqrt((dense.var() + ours.var()) / n)
    assert abs(float(dense.mean() - ours.mean())) < 4 * error
    assert dense.std() > 0.05  # the noise matters: the comparison is not trivial


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("n_steps", [1, 8])
def test_rollout_on_h_equals_the_dense_rollout(two_time: bool, n_steps: int):
    model = perturbed_dit(two_time, seed=5)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    predictor = EmbeddedXPredictor(model, chunk_size=4)
    x0 = torch.randn(B, L, V, dtype=torch.float64)
    grid = fl.time_grid(n_steps, dtype=torch.float64)
    dense = fl.rollout(fl.XPredMap(fl.XPredictor(model), path, two_time), x0, grid)
    ours = fl.rollout(EmbeddedXPredMap(predictor, path, two_time), predictor.embed(x0), grid)
    # the state ends on x1_hat E with x1_hat the dense result, and on its tokens
    torch.testing.assert_close(ours.x[..., :D], dense.x @ model.input_table, rtol=1e-10, atol=1e-12)
    assert torch.equal(sampled_tokens(ours.x), fl.decode(dense.x))
    assert ours.nfe == dense.nfe == n_steps
    assert dense.x.std() > 1e-3  # predictions are far from uniform


@pytest.mark.parametrize("rule", [fl.Euler, fl.Midpoint, fl.Heun])
@pytest.mark.parametrize("n_steps", [1, 8])
def test_ode_rules_on_h_equal_the_dense_rules(rule, n_steps: int):
    model = perturbed_dit(seed=9)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    predictor = EmbeddedXPredictor(model, chunk_size=4)
    x0 = torch.randn(B, L, V, dtype=torch.float64)
    grid = fl.time_grid(n_steps, dtype=torch.float64)
    dense = fl.rollout(rule(fl.XPredVelocity(fl.XPredictor(model), path)), x0, grid)
    ours = fl.rollout(EmbeddedODEMap(rule, predictor, path), predictor.embed(x0), grid)
    # Midpoint's dense last step keeps a ~1e-8 share of its noise (the clock's round trip
    # kappa(kappa^-1(gamma_m)) != gamma_m); h cannot carry that share back
    torch.testing.assert_close(ours.x[..., D:], dense.x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.x[..., :D], dense.x @ model.input_table, rtol=0, atol=1e-5)
    assert torch.equal(fl.decode(ours.x[..., D:]), fl.decode(dense.x))
    assert ours.nfe == dense.nfe
    assert dense.x.std() > 1e-3  # predictions are far from uniform


def test_ode_rules_refuse_a_path_that_keeps_its_state_at_the_data():
    predictor = EmbeddedXPredictor(perturbed_dit())
    with pytest.raises((TypeCheckError, ValueError), match=r"linear path|interpolant"):
        EmbeddedODEMap(fl.Euler, predictor, fl.SqrtNoiseInterpolant())  # type: ignore[arg-type]


def test_intermediate_states_are_the_embedding_of_the_dense_ones():
    model = perturbed_dit(seed=6)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    predictor = EmbeddedXPredictor(model)
    x0 = torch.randn(B, L, V, dtype=torch.float64)
    grid = fl.time_grid(4, dtype=torch.float64)[:-1]  # stop before the data: states stay h
    dense = fl.rollout(fl.XPredMap(fl.XPredictor(model), path), x0, grid, save_states=True)
    h0 = sampler_state(x0 @ model.input_table)  # one width for every saved state
    ours = fl.rollout(EmbeddedXPredMap(predictor, path), h0, grid, save_states=True)
    assert dense.states is not None and ours.states is not None
    for h, x in zip(ours.states, dense.states, strict=True):
        torch.testing.assert_close(h[..., :D], x @ model.input_table)
    # each step's token entry is the argmax of the prediction it made from the dense state
    for index, (h, x) in enumerate(zip(ours.states[1:], dense.states[:-1], strict=True)):
        with torch.no_grad():
            x1_hat = fl.XPredictor(model)(x, grid[index].expand(B))
        assert torch.equal(sampled_tokens(h), x1_hat.argmax(-1))


@pytest.mark.parametrize("two_time", [False, True])
def test_a_step_with_per_token_times_partly_at_the_data_is_the_dense_step(two_time: bool):
    model = perturbed_dit(two_time, seed=12)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    predictor = EmbeddedXPredictor(model, chunk_size=4)
    x = torch.randn(B, L, V, dtype=torch.float64)
    t = torch.rand(B, L, dtype=torch.float64) * 0.5
    s = torch.where(torch.rand(B, L) < 0.5, 1.0, 0.5 + 0.4 * torch.rand(B, L)).double()
    s[0, 0], s[0, 1] = 1.0, 0.7  # positions onto the data and below it, in one example
    dense_predictor = fl.XPredictor(model)
    with torch.no_grad():
        x1_hat = dense_predictor(x, t, s) if two_time else dense_predictor(x, t)
        dense = fl.XPredMap(dense_predictor, path, two_time)(x, t, s)
        ours = EmbeddedXPredMap(predictor, path, two_time)(x @ model.input_table, t, s)
    torch.testing.assert_close(ours[..., :D], dense @ model.input_table, rtol=1e-10, atol=1e-12)
    assert torch.equal(sampled_tokens(ours), x1_hat.argmax(-1))
    at_data = s == 1  # there the dense step is the prediction itself
    assert torch.equal(sampled_tokens(ours)[at_data], fl.decode(dense)[at_data])


def test_an_embedded_step_makes_no_vocabulary_sized_tensor_and_no_host_read(monkeypatch):
    vocab, chunk = 4000, 2
    model = perturbed_dit(seed=13, vocab=vocab).float()
    predictor = EmbeddedXPredictor(model, chunk_size=chunk)
    step = EmbeddedXPredMap(predictor, fl.LinearInterpolant(reparam=fl.TokenAccuracy(vocab)))
    seq = 24  # 12 chunks
    h, t, s = torch.randn(B, seq, D), torch.zeros(B), torch.ones(B)
    for name in ("item", "__bool__", "cpu", "tolist", "numpy", "__int__", "__float__"):

        def refuse(*_: object, _name: str = name) -> None:
            raise AssertionError(f"host read: Tensor.{_name}")

        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad(), LiveTensorBytes() as tracker:
        state = step(step(h, t, torch.full((B,), 0.5)), torch.full((B,), 0.5), s)
    monkeypatch.undo()
    chunk_unit = B * chunk * vocab * 4  # one float32 chunk of logits
    assert max(size for size, _ in tracker.allocations) <= chunk_unit
    # at most a chunk's logits and two chunks' probabilities at once: a quarter of one
    # (batch, seq, vocab) tensor (12 chunk units), whatever the length
    assert tracker.peak < 4 * chunk_unit
    assert state.shape == (B, seq, D + 1)


def test_every_network_call_of_the_embedded_predictor_is_counted():
    predictor = EmbeddedXPredictor(perturbed_dit(two_time=True))
    h, t = torch.randn(B, L, D, dtype=torch.float64), torch.rand(B, dtype=torch.float64)
    tokens = torch.randint(V, (B, L))
    with fl.count_network_calls() as calls:
        predictor(h, t, t)
        predictor.logits(h, t, t)
        predictor.cross_entropy(h, t, tokens, t)
        predictor.kl_divergence(torch.full((B, L, V), 1 / V, dtype=torch.float64), h, t, t)
        predictor.embedded_prediction(h, t, t)
    assert calls.count == 5


def test_a_state_that_cannot_hold_the_token_ids_is_refused():
    predictor = EmbeddedXPredictor(perturbed_dit(vocab=300).to(torch.bfloat16))
    step = EmbeddedXPredMap(predictor, fl.LinearInterpolant())
    h = torch.randn(B, L, D, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot hold token ids up to 299"):
        step(h, torch.zeros(B), torch.ones(B))


# ---------------------------------------------------------------- distillation


def test_semigroup_loss_on_h_equals_the_dense_one_with_different_tables():
    teacher_net, student_net = perturbed_dit(seed=7), perturbed_dit(two_time=True, seed=8)
    assert not torch.allclose(teacher_net.input_table, student_net.input_table)
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    tokens = torch.randint(V, (B, L))
    t = torch.tensor([0.0, 0.3, 0.5], dtype=torch.float64)
    s = torch.tensor([1.0, 0.9, 0.6], dtype=torch.float64)
    x_t = path.sample(
        torch.randn(B, L, V, dtype=torch.float64), fl.one_hot(tokens, V, torch.float64), t
    )
    dense = semigroup_kl_loss(
        fl.XPredMap(fl.XPredictor(student_net), path, two_time=True),
        fl.XPredictor(teacher_net),
        x_t,
        t,
        s,
    )
    student = EmbeddedXPredMap(EmbeddedXPredictor(student_net, chunk_size=4), path, two_time=True)
    teacher = EmbeddedXPredictor(teacher_net)
    h_student, h_teacher = x_t @ student_net.input_table, x_t @ teacher_net.input_table
    ours = embedded_semigroup_kl_loss(student, teacher, h_student, h_teacher, t, s)
    torch.testing.assert_close(ours, dense)
    assert dense.min() > 1e-4
    # the gradient reaches the student only, and equals the dense one
    ours.sum().backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert student_net.input_table.grad is not None


# ---------------------------------------------------------------- validation


class DenseOnly(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x


def test_a_backbone_without_a_table_is_refused(checks: str):
    match = "parameter 'backbone'" if checks == "jaxtyping" else "not an EmbeddedBackbone"
    with pytest.raises(TypeError, match=match):
        EmbeddedXPredictor(DenseOnly())  # type: ignore[arg-type]


def test_wrong_widths_are_named(checks: str):
    predictor = EmbeddedXPredictor(perturbed_dit())
    t = torch.rand(B, dtype=torch.float64)
    with pytest.raises(ValueError, match="width 5"):
        predictor(torch.randn(B, L, 5, dtype=torch.float64), t)
    with pytest.raises((TypeCheckError, ValueError), match=r"vocab|expected a"):
        predictor.embed(torch.rand(B, L, V + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        EmbeddedXPredictor(perturbed_dit(), chunk_size=0)
