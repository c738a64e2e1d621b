"""Conditional sampling against exact oracles.

The oracle: a first-order Markov chain over V = 3 symbols and L = 4 positions, and its exact
posterior denoiser. On the linear path x_i = (1 - γ_i)ε_i + γ_i e_{y_i}, the likelihood of a
sequence y given the state is ∝ exp(Σ_i γ_i x_i[y_i]/(1 - γ_i)²) (positions at γ_i = 1 are
clean: y_i must be their token), so enumerating the 81 sequences gives E[e_{y_i} | x_t]
exactly, for any per-token times. With it:

- one conditional step from noise returns the exact conditional marginals p(y_i | known),
  which the Markov chain gives in closed form (P^n for continuations, a ratio of matrix
  powers for infills);
- a many-step conditional rollout samples the exact conditional law (Monte Carlo);
- blocks of one position and one step are greedy autoregressive decoding of the chain.

Every sampler (x-prediction map, Euler, Midpoint, Heun, the two-time map, replacement,
guidance, blocks) returns the known positions bit for bit, and the network sees them one-hot
at time 1.
"""

import itertools

import pytest
import torch
from torch import Tensor, nn

import flowlm as fl
from flowlm import Context, Guidance, Replacement, block_rollout, distill
from flowlm.backbones import DiT
from flowlm.data import MarkovChain

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
V, L = 3, 4
CHAIN = MarkovChain(V, order=1, seed=3, concentration=1.0)


def per_token(t: Tensor, like: Tensor) -> Tensor:
    return t if t.ndim == 2 else t[:, None].expand(like.shape[:2])


class ExactMarkovDenoiser(nn.Module):
    """Logits log E[e_{y_i} | x_t] of the chain's exact posterior (one time input)."""

    def __init__(self, chain: MarkovChain, length: int, reparam: fl.TimeReparam) -> None:
        super().__init__()
        grids = torch.meshgrid(*[torch.arange(chain.vocab_size)] * length, indexing="ij")
        self.sequences = torch.stack([g.reshape(-1) for g in grids], dim=1)  # (N, L)
        self.log_prior = chain.log_likelihood(self.sequences)
        self.reparam = reparam
        self.vocab_size = chain.vocab_size

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        gamma = self.reparam(per_token(t, x)).to(F64)
        positions = torch.arange(x.shape[1])
        entries = x.to(F64)[:, positions[None, :], self.sequences]  # (B, N, L)
        clean = gamma >= 1
        weight = torch.where(clean, 0.0, gamma / (1 - gamma).clamp_min(1e-300) ** 2)
        score = (entries * weight[:, None, :]).sum(-1) + self.log_prior
        matches = self.sequences[None] == x.argmax(-1)[:, None, :]
        score = torch.where((matches | ~clean[:, None, :]).all(-1), score, -torch.inf)
        posterior = torch.softmax(score, dim=-1)
        marginals = torch.einsum("bn,nlv->blv", posterior, fl.one_hot(self.sequences, V, F64))
        return marginals.clamp_min(1e-300).log().to(x.dtype)


def exact_predictor() -> fl.XPredictor:
    return fl.XPredictor(ExactMarkovDenoiser(CHAIN, L, fl.TokenAccuracy(V)))


def interpolant() -> fl.LinearInterpolant:
    return fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))


def power(n: int) -> Tensor:
    return torch.linalg.matrix_power(CHAIN.transition, n)


# ---------------------------------------------------------------- exact conditionals


def test_one_conditional_step_gives_the_exact_continuation_marginals() -> None:
    prompt = torch.tensor([[0, 2, 0, 0], [1, 1, 0, 0], [2, 0, 0, 0]])
    context = Context.prefix(prompt, 2)
    step = fl.XPredMap(exact_predictor(), interpolant())
    noise = torch.randn(3, L, V, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = fl.rollout(step, noise, fl.time_grid(1, dtype=F64), context=context).x
    last = prompt[:, 1]
    assert torch.allclose(x[:, 2], power(1)[last], atol=1e-12)
    assert torch.allclose(x[:, 3], power(2)[last], atol=1e-12)
    assert torch.equal(x[:, :2], fl.one_hot(prompt[:, :2], V, F64))


def test_one_conditional_step_gives_the_exact_infill_marginals() -> None:
    tokens = torch.tensor([[2, 0, 0, 1], [0, 0, 0, 0]])
    context = Context(tokens, torch.tensor([[True, False, False, True]]).expand(2, L))
    step = fl.XPredMap(exact_predictor(), interpolant())
    x = fl.rollout(
        step, torch.randn(2, L, V, dtype=F64), fl.time_grid(1, dtype=F64), context=context
    ).x
    a, b = tokens[:, 0], tokens[:, 3]
    for position, (before, after) in {1: (1, 2), 2: (2, 1)}.items():
        expected = power(before)[a] * power(after)[:, b].T / power(3)[a, b][:, None]
        assert torch.allclose(x[:, position], expected, atol=1e-12)


def test_a_many_step_conditional_rollout_samples_the_exact_conditional_law() -> None:
    batch = 4000
    generator = torch.Generator().manual_seed(1)
    prompt = torch.tensor([1, 2, 0, 0]).expand(batch, L)
    context = Context.prefix(prompt, 2)
    step = fl.XPredMap(exact_predictor(), interpolant())
    noise = torch.randn(batch, L, V, dtype=F64, generator=generator)
    tokens = fl.decode(fl.rollout(step, noise, fl.time_grid(32, dtype=F64), context=context).x)
    pairs = torch.bincount(tokens[:, 2] * V + tokens[:, 3], minlength=V * V).double() / batch
    exact = (CHAIN.transition[2][:, None] * CHAIN.transition).reshape(-1)
    assert 0.5 * (pairs - exact).abs().sum() < 0.05
    assert torch.equal(tokens[:, :2], prompt[:, :2])


def test_blocks_of_one_position_and_one_step_are_greedy_chain_decoding() -> None:
    prompt = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]])
    step = fl.XPredMap(exact_predictor(), interpolant())
    trajectory = block_rollout(
        step,
        torch.randn(3, L, V, dtype=F64),
        fl.time_grid(1, dtype=F64),
        1,
        context=Context.prefix(prompt, 1),
        first=1,
    )
    expected = prompt[:, 0]
    for position in range(1, L):
        expected = CHAIN.transition[expected].argmax(-1)
        assert torch.equal(fl.decode(trajectory.x)[:, position], expected)
    assert trajectory.nfe == L - 1


# ---------------------------------------------------------------- every sampler holds the context


class Recorder(nn.Module):
    """A backbone wrapper that keeps every (state, t, s) it is called with."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
        self.calls.append((x, t, s))
        return self.backbone(x, t) if s is None else self.backbone(x, t, s)


def dit(two_time: bool = False, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(V, dim=16, depth=1, heads=2, two_time=two_time, dropout=0.0).double()
    with torch.no_grad():  # away from the uniform prediction of a fresh model
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def context_batch() -> Context:
    tokens = torch.tensor([[2, 1, 0, 1], [0, 2, 2, 1], [1, 1, 1, 0]])
    known = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 1, 0, 1]]).bool()
    return Context(tokens, known)


def samplers(backbone: nn.Module, two_time: bool) -> dict[str, fl.FlowMap]:
    predictor, path = fl.XPredictor(backbone), interpolant()
    if two_time:
        return {"two-time map": fl.XPredMap(predictor, path, two_time=True)}
    field = fl.XPredVelocity(predictor, path)
    return {
        "x-prediction map": fl.XPredMap(predictor, path),
        "euler": fl.Euler(field),
        "midpoint": fl.Midpoint(field),
        "heun": fl.Heun(field),
    }


def assert_holds(x: Tensor, context: Context) -> None:
    clean = fl.one_hot(context.tokens, V, x.dtype)
    assert torch.equal(x[context.known], clean[context.known])
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_every_sampler_holds_the_context_and_shows_it_clean_at_time_one(
    two_time: bool, n_steps: int
) -> None:
    context = context_batch()
    for name, flow_map in samplers(recorder := Recorder(dit(two_time)), two_time).items():
        recorder.calls.clear()
        noise = torch.randn(3, L, V, dtype=F64)
        trajectory = fl.rollout(
            flow_map, noise, fl.time_grid(n_steps, dtype=F64), context=context, save_states=True
        )
        assert trajectory.states is not None
        for state in trajectory.states:
            assert_holds(state, context)
        assert trajectory.nfe == len(recorder.calls) > 0, name
        for x, t, s in recorder.calls:
            assert t.shape == (3, L), name
            assert torch.equal(t[context.known], torch.ones_like(t[context.known])), name
            assert_holds(x, context)
            if s is not None:
                assert torch.equal(s[context.known], torch.ones_like(s[context.known]))


@pytest.mark.parametrize("two_time", [False, True])
def test_the_held_map_takes_per_token_and_per_example_times(two_time: bool) -> None:
    context = context_batch()
    for flow_map in samplers(dit(two_time), two_time).values():
        held = context.hold(flow_map)
        x = torch.randn(3, L, V, dtype=F64)
        t_token = 0.5 * torch.rand(3, L, dtype=F64)
        s_token = t_token + 0.4
        assert_holds(held(x, t_token, s_token), context)
        t, s = torch.full((3,), 0.2, dtype=F64), torch.full((3,), 0.7, dtype=F64)
        by_example = held(x, t, s)
        assert_holds(by_example, context)
        assert torch.equal(by_example, held(x, t[:, None].expand(3, L), s[:, None].expand(3, L)))


def test_an_empty_context_changes_nothing() -> None:
    flow_map = fl.XPredMap(fl.XPredictor(dit()), interpolant())
    noise = torch.randn(3, L, V, dtype=F64)
    empty = Context.none(torch.zeros(3, L, dtype=torch.long))
    grid = fl.time_grid(3, dtype=F64)
    conditional = fl.rollout(flow_map, noise, grid, context=empty).x
    assert torch.allclose(conditional, fl.rollout(flow_map, noise, grid).x, atol=1e-12)


def test_rollout_rejects_a_context_of_another_shape() -> None:
    flow_map = fl.XPredMap(fl.XPredictor(dit()), interpolant())
    with pytest.raises(ValueError, match="does not fit a context"):
        fl.rollout(flow_map, torch.randn(2, L, V), fl.time_grid(2), context=context_batch())


# ---------------------------------------------------------------- replacement


def test_replacement_reimposes_the_noised_context_before_each_step() -> None:
    context, path = context_batch(), interpolant()
    recorder = Recorder(dit())
    step = fl.XPredMap(fl.XPredictor(recorder), path)
    grid = fl.time_grid(4, dtype=F64)
    replacement = Replacement(step, context, path, torch.Generator().manual_seed(5))
    trajectory = fl.rollout(replacement, torch.randn(3, L, V, dtype=F64), grid)
    assert_holds(trajectory.x, context)
    assert trajectory.nfe == 4
    replay = torch.Generator().manual_seed(5)
    clean = fl.one_hot(context.tokens, V, F64)
    for (x, t, _), time in zip(recorder.calls, grid[:-1], strict=True):
        assert t.shape == (3,) and torch.equal(t, time.expand(3))  # the unconditional times
        noise = torch.randn(x.shape, generator=replay, dtype=F64)
        expected = path.sample(noise, clean, t)
        assert torch.equal(x[context.known], expected[context.known])


# ---------------------------------------------------------------- guidance


@pytest.mark.parametrize("two_time", [False, True])
def test_guidance_at_zero_weight_is_the_conditional_model(two_time: bool) -> None:
    context, model = context_batch(), dit(two_time)
    for guided, plain in zip(
        samplers(Guidance(model, 0.0), two_time).values(),
        samplers(model, two_time).values(),
        strict=True,
    ):
        noise, grid = torch.randn(3, L, V, dtype=F64), fl.time_grid(3, dtype=F64)
        x_guided = fl.rollout(guided, noise, grid, context=context)
        x_plain = fl.rollout(plain, noise, grid, context=context)
        assert torch.allclose(x_guided.x, x_plain.x, atol=1e-12)
        assert x_guided.nfe == x_plain.nfe
        assert_holds(x_guided.x, context)


@pytest.mark.parametrize("two_time", [False, True])
def test_guidance_combines_the_branches_of_one_batched_call(two_time: bool) -> None:
    recorder, weight = Recorder(dit(two_time)), 1.5
    guidance = Guidance(recorder, weight, torch.Generator().manual_seed(2))
    context = context_batch()
    x = context.impose(torch.randn(3, L, V, dtype=F64))
    t = context.times(torch.tensor([0.1, 0.4, 0.8], dtype=F64))
    s = context.times(torch.tensor([0.5, 0.9, 1.0], dtype=F64)) if two_time else None
    guided = guidance(x, t) if s is None else guidance(x, t, s)
    assert len(recorder.calls) == 1 and recorder.calls[0][0].shape[0] == 6
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    x_u = torch.where(context.known[..., None], noise, x)
    t_u = torch.where(context.known, 0.0, t)
    model = recorder.backbone
    if s is None:
        z_c, z_u = model(x, t), model(x_u, t_u)
    else:
        z_c, z_u = model(x, t, s), model(x_u, t_u, torch.where(context.known, 0.0, s))
    assert torch.allclose(guided, z_c + weight * (z_c - z_u), atol=1e-10)


def test_guidance_without_a_context_is_the_plain_model() -> None:
    model = dit()
    x, t = torch.randn(2, L, V, dtype=F64), torch.tensor([0.3, 0.6], dtype=F64)
    assert torch.allclose(Guidance(model, 3.0)(x, t), model(x, t), atol=1e-12)


@pytest.mark.parametrize("weight", [-1.0, float("nan")])
def test_guidance_rejects_a_bad_weight(weight: float) -> None:
    with pytest.raises(ValueError, match="guidance weight"):
        Guidance(dit(), weight)


def test_guidance_reads_the_context_from_times_in_their_own_dtype() -> None:
    recorder = Recorder(lambda x, t: torch.zeros_like(x))
    x = torch.randn(1, 2, V, dtype=torch.bfloat16)
    Guidance(recorder, 1.0)(x, torch.tensor([[0.999, 1.0]]))
    _, t_both, _ = recorder.calls[0]
    assert t_both.dtype == torch.float32
    assert t_both[1].tolist() == [pytest.approx(0.999), 0.0]  # only the clean one forgotten


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    ("block_size", "first", "sampler", "expected"),
    [
        (1, 0, "euler", 4 * 3),
        (3, 0, "euler", 2 * 3),
        (4, 0, "heun", 1 * 6),
        (2, 1, "midpoint", 2 * 6),
        (8, 2, "heun", 6),
    ],
)
def test_blocks_count_network_calls(
    block_size: int, first: int, sampler: str, expected: int
) -> None:
    recorder = Recorder(dit())
    flow_map = samplers(recorder, two_time=False)[sampler]
    tokens = torch.tensor([[1, 2, 0, 0], [0, 0, 0, 0]])
    context = Context.prefix(tokens, first)
    trajectory = block_rollout(
        flow_map,
        torch.randn(2, L, V, dtype=F64),
        fl.time_grid(3, dtype=F64),
        block_size,
        context=context,
        first=first,
    )
    assert trajectory.nfe == expected == len(recorder.calls)
    assert_holds(trajectory.x, context)


def test_blocks_write_each_block_into_the_context_of_the_next() -> None:
    recorder = Recorder(dit())
    flow_map = fl.XPredMap(fl.XPredictor(recorder), interpolant())
    context, noise, grid = (
        context_batch(),
        torch.randn(3, L, V, dtype=F64),
        fl.time_grid(2, dtype=F64),
    )
    first_round = fl.decode(fl.rollout(flow_map, noise, grid, context=context).x)
    recorder.calls.clear()
    trajectory = block_rollout(flow_map, noise, grid, 2, context=context)
    assert_holds(trajectory.x, context)
    tokens = fl.decode(trajectory.x)
    assert torch.equal(tokens[:, :2], first_round[:, :2])  # block 1 as the first round wrote it
    for x, t, _ in recorder.calls[2:]:  # round 2: block 1 is clean data at time 1
        assert (t[:, :2] == 1).all()
        assert torch.equal(x[:, :2], fl.one_hot(tokens[:, :2], V, F64))


def test_blocks_reject_bad_arguments() -> None:
    flow_map = fl.XPredMap(fl.XPredictor(dit()), interpolant())
    noise, grid = torch.randn(2, L, V, dtype=F64), fl.time_grid(2, dtype=F64)
    with pytest.raises(ValueError, match="block_size"):
        block_rollout(flow_map, noise, grid, 0)
    with pytest.raises(ValueError, match="must be known"):
        block_rollout(flow_map, noise, grid, 2, first=1)


# ---------------------------------------------------------------- conditional distillation


class PositionWise(nn.Module):
    """A per-position network of (x_i, t_i[, s_i]): positions never see each other."""

    def __init__(self, two_time: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(V + 2, 16, dtype=F64)
        self.out = nn.Linear(16, V, dtype=F64)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
        t_i = per_token(t, x)[..., None]
        s_i = t_i if s is None else per_token(s, x)[..., None]
        return self.out(torch.tanh(self.hidden(torch.cat([x, t_i, s_i], -1))))


def objectives(student_net: nn.Module, teacher_net: nn.Module):
    path = interpolant()
    student = fl.XPredMap(fl.XPredictor(student_net), path, two_time=True)
    teacher = fl.XPredictor(teacher_net)
    teacher_map = fl.Substeps(fl.XPredMap(teacher, path), 2)
    taylor = fl.TaylorMap(fl.XPredVelocity(teacher, path), student_net)
    return {
        "taylor semigroup": lambda x, t, s, tokens: distill.taylor_semigroup_loss(taylor, x, t, s),
        "map regression": lambda x, t, s, tokens: distill.map_regression_loss(
            student, teacher_map, x, t, s
        ),
        "map regression kl": lambda x, t, s, tokens: distill.map_regression_kl_loss(
            student, teacher_map, x, t, s
        ),
        "semigroup kl": lambda x, t, s, tokens: distill.semigroup_kl_loss(
            student, teacher, x, t, s
        ),
        "self semigroup": lambda x, t, s, tokens: distill.self_semigroup_loss(
            student, tokens, x, t, s
        ),
        "lagrangian kl": lambda x, t, s, tokens: distill.lagrangian_kl_loss(
            student, teacher, x, t, s
        ),
        "eulerian kl": lambda x, t, s, tokens: distill.eulerian_kl_loss(student, teacher, x, t, s),
    }


def conditional_batch():
    generator = torch.Generator().manual_seed(4)
    tokens = CHAIN.sample(6, L, generator)
    context = fl.bernoulli_context(tokens, generator=generator)
    t = 0.8 * torch.rand(6, dtype=F64, generator=generator)
    s = t + 0.05 + 0.15 * torch.rand(6, dtype=F64, generator=generator)
    noise = torch.randn(6, L, V, dtype=F64, generator=generator)
    return tokens, context, t, s, noise


def test_conditional_distillation_equals_the_unconditional_loss_on_unknown_positions() -> None:
    """For position-wise networks, a context only moves the known positions to time 1."""
    tokens, context, t, s, noise = conditional_batch()
    path, x1 = interpolant(), fl.one_hot(tokens, V, F64)
    x_plain = path.sample(noise, x1, t)
    x_context = path.sample(noise, x1, context.times(t))
    assert torch.equal(x_context[context.known], x1[context.known])
    assert torch.equal(x_context[context.unknown], x_plain[context.unknown])
    for name, loss in objectives(PositionWise(True, 0), PositionWise(False, 1)).items():
        conditional = loss(x_context, context.times(t), context.times(s), tokens)
        plain = loss(x_plain, t, s, tokens)
        assert torch.isfinite(conditional).all(), name
        unknown = context.unknown
        assert torch.allclose(conditional[unknown], plain[unknown], rtol=1e-9, atol=1e-12), name


def test_conditional_distillation_trains_the_student_on_the_shared_context() -> None:
    tokens, context, t, s, noise = conditional_batch()
    student_net, teacher_net = Recorder(dit(two_time=True, seed=1)), Recorder(dit(seed=2))
    x1 = fl.one_hot(tokens, V, F64)
    x_t = interpolant().sample(noise, x1, context.times(t))
    for name, loss in objectives(student_net, teacher_net).items():
        student_net.calls.clear()
        teacher_net.calls.clear()
        student_net.zero_grad()
        teacher_net.zero_grad()
        per_token_loss = loss(x_t, context.times(t), context.times(s), tokens)
        assert torch.isfinite(per_token_loss).all(), name
        fl.masked_mean(per_token_loss, context.unknown).backward()
        grads = [p.grad for p in student_net.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
        assert all(p.grad is None or not p.grad.any() for p in teacher_net.parameters()), name
        for x, t_call, s_call in itertools.chain(student_net.calls, teacher_net.calls):
            assert t_call.shape == (6, L), name
            assert torch.equal(x[context.known], x1[context.known]), name
            assert (t_call[context.known] == 1).all(), name
            if s_call is not None:
                assert (s_call[context.known] == 1).all(), name


def test_one_step_conditional_fmlm_fills_every_unknown_position_in_one_call() -> None:
    context = context_batch()
    student = fl.XPredMap(fl.XPredictor(dit(two_time=True)), interpolant(), two_time=True)
    trajectory = fl.rollout(
        student, torch.randn(3, L, V, dtype=F64), fl.time_grid(1, dtype=F64), context=context
    )
    assert trajectory.nfe == 1
    assert_holds(trajectory.x, context)
    assert torch.allclose(trajectory.x.sum(-1), torch.ones(3, L, dtype=F64))  # on the simplex


def test_replacement_rejects_a_state_of_another_shape() -> None:
    path = interpolant()
    step = fl.XPredMap(fl.XPredictor(dit()), path)
    with pytest.raises(ValueError, match="does not fit a context"):
        Replacement(step, context_batch(), path)(
            torch.randn(2, L, V, dtype=F64), torch.zeros(2), torch.ones(2)
        )


# ---------------------------------------------------------------- self-conditioned samplers


class ScRecorder(nn.Module):
    """A self-conditioned backbone wrapper that keeps every (state, t, s, previous) call."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.calls: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]] = []

    def forward(
        self, x: Tensor, t: Tensor, s: Tensor | None = None, /, previous: Tensor | None = None
    ) -> Tensor:
        self.calls.append((x, t, s, previous))
        times = (t,) if s is None else (t, s)
        return self.backbone(x, *times, previous=previous)


class IgnoresEstimate(nn.Module):
    """A plain backbone taking (and ignoring) ``previous=``: a self-conditioned network."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(
        self, x: Tensor, t: Tensor, s: Tensor | None = None, /, previous: Tensor | None = None
    ) -> Tensor:
        return self.backbone(x, t) if s is None else self.backbone(x, t, s)


def sc_dit(two_time: bool = False, seed: int = 0) -> DiT:
    """A self-conditioned DiT whose estimate input is trained-looking (it reads the estimate)."""
    torch.manual_seed(seed)
    model = DiT(
        V, dim=16, depth=1, heads=2, two_time=two_time, dropout=0.0, self_conditioning=True
    ).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


RULES: dict[str, type[fl.Euler] | type[fl.Midpoint] | type[fl.Heun] | None] = {
    "x-prediction map": None,
    "euler": fl.Euler,
    "midpoint": fl.Midpoint,
    "heun": fl.Heun,
}
"""The step rules of a one-time self-conditioned sampler (None: its x-prediction step)."""


def sc_samplers(backbone: nn.Module, two_time: bool) -> dict[str, fl.SelfConditionedMap]:
    path = interpolant()
    if two_time:
        return {
            "two-time map": fl.SelfConditionedMap(backbone, path, two_time=True),
            "estimate first": fl.SelfConditionedMap(
                backbone, path, two_time=True, estimate_first=True
            ),
        }
    maps = {
        name: fl.SelfConditionedMap(backbone, path, solver=rule) for name, rule in RULES.items()
    }
    maps["guided estimate"] = fl.SelfConditionedMap(backbone, path, guidance=2.0)
    return maps


def lifted_noise(batch: int = 3, seed: int = 0) -> Tensor:
    noise = torch.randn(batch, L, V, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return fl.lift_state(noise)


@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_every_self_conditioned_sampler_holds_the_context_in_the_state_half(
    two_time: bool, n_steps: int
) -> None:
    context = context_batch()
    recorder = ScRecorder(sc_dit(two_time))
    for name, sampler in sc_samplers(recorder, two_time).items():
        recorder.calls.clear()
        grid = fl.time_grid(n_steps, dtype=F64)
        trajectory = fl.rollout(
            sampler, lifted_noise(), grid, context=context.lift(), save_states=True
        )
        assert trajectory.states is not None
        for state in trajectory.states:
            assert_holds(fl.split_state(state).x, context)
        assert trajectory.nfe == len(recorder.calls) > 0, name
        for x, t, s, previous in recorder.calls:  # the guided estimate: two batches of 3
            assert previous is not None and previous.shape == x.shape
            for rows in torch.arange(len(x)).split(3):
                assert t[rows].shape == (3, L) and bool((t[rows][context.known] == 1).all()), name
                assert_holds(x[rows], context)
                if s is not None:
                    assert bool((s[rows][context.known] == 1).all())
        final = fl.split_state(trajectory.x).x  # on the simplex (the clock's rounding)
        torch.testing.assert_close(final.sum(-1), torch.ones(3, L, dtype=F64), rtol=0, atol=1e-5)


def test_known_positions_are_one_hot_in_both_halves_the_rest_is_the_samplers_estimate() -> None:
    context, model = context_batch(), sc_dit()
    sampler = fl.SelfConditionedMap(model, interpolant())
    lifted = context.lift().impose(lifted_noise())
    x_in, previous_in = fl.split_state(lifted)
    assert_holds(x_in, context)
    assert_holds(previous_in, context)  # the exact estimate of known data
    assert torch.equal(previous_in[context.unknown], torch.zeros_like(previous_in[context.unknown]))
    t, s = torch.full((3,), 0.25, dtype=F64), torch.full((3,), 0.5, dtype=F64)
    x, previous = fl.split_state(context.lift().hold(sampler)(lifted, t, s))
    with torch.no_grad():
        logits = model(x_in, context.times(t), previous=previous_in)
    estimate = torch.softmax(logits, -1)[context.unknown]
    torch.testing.assert_close(previous[context.unknown], estimate, rtol=0, atol=1e-12)
    assert_holds(x, context)
    assert_holds(previous, context)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("guidance", [None, 1.5])
def test_a_network_ignoring_its_estimate_samples_as_the_plain_conditional_sampler(
    rule: str, guidance: float | None
) -> None:
    model, path, context = dit(), interpolant(), context_batch()
    plain_net: nn.Module = model if guidance is None else Guidance(model, guidance)
    sc_net: nn.Module = IgnoresEstimate(model)
    if guidance is not None:
        torch.manual_seed(0)
        plain_net = Guidance(model, guidance, torch.Generator().manual_seed(4))
        sc_net = Guidance(sc_net, guidance, torch.Generator().manual_seed(4))
    predictor = fl.XPredictor(plain_net)
    step_rule = RULES[rule]
    plain = (
        fl.XPredMap(predictor, path)
        if step_rule is None
        else step_rule(fl.XPredVelocity(predictor, path))
    )
    sampler = fl.SelfConditionedMap(sc_net, path, solver=step_rule)
    noise, grid = fl.split_state(lifted_noise()).x, fl.time_grid(3, dtype=F64)
    expected = fl.rollout(plain, noise, grid, context=context)
    got = fl.rollout(sampler, fl.lift_state(noise), grid, context=context.lift())
    assert got.nfe == expected.nfe
    torch.testing.assert_close(fl.split_state(got.x).x, expected.x, rtol=0, atol=1e-12)
    blocks = block_rollout(sampler, fl.lift_state(noise), grid, 2, context=context.lift())
    plain_blocks = block_rollout(plain, noise, grid, 2, context=context)
    assert blocks.nfe == plain_blocks.nfe == 2 * expected.nfe
    torch.testing.assert_close(fl.split_state(blocks.x).x, plain_blocks.x, rtol=0, atol=1e-12)


def test_an_ignored_estimate_under_replacement_is_plain_replacement() -> None:
    model, path, context = dit(), interpolant(), context_batch()
    plain = Replacement(
        fl.XPredMap(fl.XPredictor(model), path), context, path, torch.Generator().manual_seed(2)
    )
    sc_map = fl.SelfConditionedMap(IgnoresEstimate(model), path)
    lifted = Replacement(sc_map, context.lift(), path, torch.Generator().manual_seed(2))
    noise, grid = fl.split_state(lifted_noise()).x, fl.time_grid(4, dtype=F64)
    expected = fl.rollout(plain, noise, grid).x
    got = fl.split_state(fl.rollout(lifted, fl.lift_state(noise), grid).x).x
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert_holds(got, context)


@pytest.mark.parametrize("rule", list(RULES))
def test_an_empty_context_is_the_unconditional_self_conditioned_sampler(rule: str) -> None:
    sampler = fl.SelfConditionedMap(sc_dit(), interpolant(), solver=RULES[rule])
    empty = Context.none(torch.zeros(3, L, dtype=torch.long)).lift()
    grid = fl.time_grid(3, dtype=F64)
    conditional = fl.rollout(sampler, lifted_noise(), grid, context=empty)
    unconditional = fl.rollout(sampler, lifted_noise(), grid)
    torch.testing.assert_close(conditional.x, unconditional.x, rtol=0, atol=1e-12)
    assert conditional.nfe == unconditional.nfe


@pytest.mark.parametrize("first", [0, 2])
def test_self_conditioned_blocks_of_one_block_are_all_at_once(first: int) -> None:
    sampler = fl.SelfConditionedMap(sc_dit(), interpolant(), solver=fl.Heun)
    context = Context.prefix(torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0]]), first)
    grid = fl.time_grid(3, dtype=F64)
    at_once = fl.rollout(sampler, lifted_noise(), grid, context=context.lift())
    one_block = block_rollout(
        sampler, lifted_noise(), grid, L - first, context=context.lift(), first=first
    )
    assert torch.equal(one_block.x, at_once.x)
    assert one_block.nfe == at_once.nfe == 6


def test_self_conditioned_blocks_write_the_state_half_into_the_next_context() -> None:
    recorder = ScRecorder(sc_dit())
    sampler = fl.SelfConditionedMap(recorder, interpolant(), solver=fl.Heun)
    context, grid = context_batch().lift(), fl.time_grid(2, dtype=F64)
    first_round = fl.rollout(sampler, lifted_noise(), grid, context=context).x
    # Heun passes on its corrector's estimate: the halves differ at t = 1, the state is decoded.
    x, previous = fl.split_state(first_round)
    unknown = context.unknown
    assert not torch.allclose(x[unknown], previous[unknown], atol=1e-3)
    recorder.calls.clear()
    trajectory = block_rollout(sampler, lifted_noise(), grid, 2, context=context)
    tokens = fl.decode(fl.split_state(trajectory.x).x)
    assert torch.equal(tokens[:, :2], fl.decode(x)[:, :2])
    assert_holds(fl.split_state(trajectory.x).x, context_batch())
    for x_in, t, _, previous_in in recorder.calls[4:]:  # round 2: block 1 clean at time 1
        assert bool((t[:, :2] == 1).all())
        assert torch.equal(x_in[:, :2], fl.one_hot(tokens[:, :2], V, F64))
        assert previous_in is not None
    # round 2 starts from no estimate but the one-hot of every known token, block 1 included
    known = context.known | (torch.arange(L) < 2)
    zeros = torch.zeros(3, L, V, dtype=F64)
    assert torch.equal(recorder.calls[4][3], Context(tokens, known).impose(zeros))


def test_guidance_at_zero_weight_on_a_self_conditioned_sampler_is_the_conditional_one() -> None:
    model, path, context = sc_dit(), interpolant(), context_batch().lift()
    grid = fl.time_grid(3, dtype=F64)
    for rule in RULES.values():
        guided = fl.SelfConditionedMap(Guidance(model, 0.0), path, solver=rule, guidance=0.0)
        plain = fl.SelfConditionedMap(model, path, solver=rule)
        x_guided = fl.rollout(guided, lifted_noise(), grid, context=context)
        x_plain = fl.rollout(plain, lifted_noise(), grid, context=context)
        torch.testing.assert_close(x_guided.x, x_plain.x, rtol=0, atol=1e-12)
        assert x_guided.nfe == x_plain.nfe


def test_both_guidances_compose_in_one_call_of_four_branches() -> None:
    recorder, w, u = ScRecorder(sc_dit()), 1.5, 0.75
    sampler = fl.SelfConditionedMap(
        Guidance(recorder, w, torch.Generator().manual_seed(2)), interpolant(), guidance=u
    )
    context = context_batch()
    x = context.impose(torch.randn(3, L, V, dtype=F64))
    previous = torch.softmax(torch.randn(3, L, V, dtype=F64), -1)
    t = context.times(torch.tensor([0.1, 0.4, 0.8], dtype=F64))
    with fl.count_network_calls() as calls:
        logits = sampler.logits(x, t, t, previous)
    assert calls.count == 1 and len(recorder.calls) == 1
    assert recorder.calls[0][0].shape[0] == 12
    # the estimate's guidance doubles the rows first: each half forgets with its own noise
    noise = torch.randn(6, L, V, generator=torch.Generator().manual_seed(2), dtype=F64)
    model, known = recorder.backbone, context.known[..., None]
    x_u_p, x_u_0 = (torch.where(known, half, x) for half in noise.chunk(2))
    t_u = torch.where(context.known, 0.0, t)
    forgotten = torch.where(known, 0.0, previous)  # the unconditional branch: no estimate there
    zeros = torch.zeros_like(previous)
    with torch.no_grad():
        z_c_p, z_u_p = model(x, t, previous=previous), model(x_u_p, t_u, previous=forgotten)
        z_c_0, z_u_0 = model(x, t, previous=zeros), model(x_u_0, t_u, previous=zeros)
    expected = (1 + u) * (1 + w) * z_c_p - (1 + u) * w * z_u_p - u * (1 + w) * z_c_0 + u * w * z_u_0
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def test_guidance_passes_the_estimate_to_both_branches_forgetting_it_where_clean() -> None:
    recorder = ScRecorder(sc_dit())
    context = context_batch()
    x = context.impose(torch.randn(3, L, V, dtype=F64))
    previous = torch.softmax(torch.randn(3, L, V, dtype=F64), -1)
    t = context.times(torch.full((3,), 0.5, dtype=F64))
    Guidance(recorder, 1.0)(x, t, previous=previous)
    seen = recorder.calls[0][3]
    assert seen is not None
    assert torch.equal(seen[:3], previous)
    assert torch.equal(seen[3:], torch.where(context.known[..., None], 0.0, previous))
    Guidance(recorder, 1.0)(x, t)
    assert recorder.calls[1][3] is None  # a plain call stays plain


def test_a_self_conditioned_heun_step_threads_the_estimate_through_its_stages() -> None:
    recorder, path = ScRecorder(sc_dit()), interpolant()
    sampler = fl.SelfConditionedMap(recorder, path, solver=fl.Heun)
    x, previous = fl.split_state(lifted_noise())
    previous = torch.softmax(torch.randn_like(previous), -1)
    t, s = torch.full((3,), 0.2, dtype=F64), torch.full((3,), 0.6, dtype=F64)
    with fl.count_network_calls() as calls:
        moved, passed_on = fl.split_state(sampler(fl.lift_state(x, previous), t, s))
    assert calls.count == 2
    model = recorder.backbone
    with torch.no_grad():
        first = torch.softmax(model(x, t, previous=previous), -1)
        delta = (path.reparam(s) - path.reparam(t))[:, None, None]
        v_start = path.velocity(x, first, t)
        x_tilde = x + delta * v_start
        second = torch.softmax(model(x_tilde, s, previous=first), -1)
        expected = x + 0.5 * delta * (v_start + path.velocity(x_tilde, second, s))
    assert torch.equal(recorder.calls[1][3], first)  # the corrector reads the predictor's
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(passed_on, second, rtol=0, atol=1e-12)


def test_a_step_rule_with_a_two_time_map_is_refused() -> None:
    with pytest.raises(ValueError, match="a two-time map jumps"):
        fl.SelfConditionedMap(sc_dit(two_time=True), interpolant(), two_time=True, solver=fl.Heun)
