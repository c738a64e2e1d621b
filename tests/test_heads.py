"""x-prediction head, per-token cross-entropy, masked mean, learned time weighting."""

import math

import pytest
import torch
from jaxtyping import TypeCheckError
from live_tensors import LiveTensorBytes
from torch import Tensor, nn

from flowlm import (
    LearnedTimeWeighting,
    XPredictor,
    count_network_calls,
    cross_entropy,
    masked_mean,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
B, L, V = 3, 4, 6


class OneTimeNet(nn.Module):
    """A user backbone (x, t) -> logits with its own parameters and output dtype."""

    def __init__(self, vocab: int = V, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.mix = nn.Linear(vocab, vocab)
        self.time = nn.Linear(1, vocab)
        self.out_dtype = out_dtype
        self.calls: list[tuple[Tensor, ...]] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append((x, t))
        logits = 3.0 * self.mix(x) + self.time(t[:, None])[:, None, :]
        return logits if self.out_dtype is None else logits.to(self.out_dtype)


class TwoTimeNet(nn.Module):
    """A user backbone (x, t, s) -> logits."""

    def __init__(self, vocab: int = V) -> None:
        super().__init__()
        self.mix = nn.Linear(vocab, vocab)
        self.times = nn.Linear(2, vocab)
        self.calls: list[tuple[Tensor, ...]] = []

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        self.calls.append((x, t, s))
        return 3.0 * self.mix(x) + self.times(torch.stack([t, s], -1))[:, None, :]


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16, F64])
def test_one_time_predictor_returns_probabilities(out_dtype: torch.dtype | None):
    torch.manual_seed(0)
    net = OneTimeNet(out_dtype=out_dtype)
    predictor = XPredictor(net)
    x, t = torch.randn(B, L, V), torch.rand(B)
    probs = predictor(x, t)
    expected_dtype = F64 if out_dtype == F64 else torch.float32
    assert probs.dtype == expected_dtype
    assert probs.shape == (B, L, V)
    assert (probs > 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(B, L, dtype=expected_dtype), atol=1e-6)
    logits = predictor.logits(x, t)
    assert torch.equal(probs, torch.softmax(logits.to(expected_dtype), -1))
    assert len(net.calls) == 2
    assert net.calls[0][0] is x
    assert net.calls[0][1] is t
    # The backbone is a registered submodule: its parameters are the predictor's.
    assert {id(p) for p in predictor.parameters()} == {id(p) for p in net.parameters()}


def test_two_time_predictor_passes_both_times():
    torch.manual_seed(0)
    net = TwoTimeNet()
    predictor = XPredictor(net)
    x, t, s = torch.randn(B, L, V), torch.rand(B), torch.rand(B)
    probs = predictor(x, t, s)
    assert len(net.calls) == 1
    assert net.calls[0][1] is t
    assert net.calls[0][2] is s
    assert torch.allclose(probs.sum(-1), torch.ones(B, L), atol=1e-6)
    # The second time matters: it is not silently dropped.
    assert not torch.allclose(probs, predictor(x, t, 1 - s))


def test_predictor_accepts_a_plain_function():
    predictor = XPredictor(lambda x, t: torch.zeros_like(x))
    probs = predictor(torch.randn(B, L, V), torch.rand(B))
    assert torch.equal(probs, torch.full((B, L, V), 1 / V))


def test_vocabulary_mismatch():
    predictor = XPredictor(lambda x, t: torch.zeros(x.shape[0], x.shape[1], V + 1))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        predictor(torch.randn(B, L, V), torch.rand(B))


def test_predictor_validates_times(checks: str):
    predictor = XPredictor(OneTimeNet())
    x = torch.randn(B, L, V)
    with pytest.raises(RuntimeError, match=r"outside \[0, 1\]"):
        predictor(x, torch.full((B,), 1.5))
    match = "parameter 't'" if checks == "jaxtyping" else r"t has shape \(4,\) but the state"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        predictor(x, torch.rand(B + 1))
    with pytest.raises(RuntimeError, match=r"s has values outside \[0, 1\]"):
        XPredictor(TwoTimeNet())(x, torch.rand(B), torch.full((B, L), -0.5))


class TokenTimeNet(nn.Module):
    """A backbone that takes per-token times: time features added at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(V, V, dtype=F64)
        self.time = nn.Linear(1, V, dtype=F64)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        per_token = t[:, None].expand(x.shape[:2]) if t.ndim == 1 else t
        return 3.0 * self.mix(x) + self.time(per_token[..., None])


def test_predictor_takes_per_token_times():
    torch.manual_seed(0)
    predictor = XPredictor(TokenTimeNet())
    x, t = torch.randn(B, L, V, dtype=F64), torch.rand(B, dtype=F64)
    per_token = predictor(x, t[:, None].expand(B, L).contiguous())
    # the network's own matmuls round differently for (batch,) and (batch, seq) inputs
    assert torch.allclose(per_token, predictor(x, t), rtol=0, atol=1e-12)
    mixed = t[:, None].expand(B, L).contiguous()
    mixed[:, 0] = 1.0  # a known first token
    assert not torch.allclose(predictor(x, mixed)[:, 0], per_token[:, 0])
    assert torch.allclose(predictor(x, mixed)[:, 1:], per_token[:, 1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("output", ["tuple", "dict", "list"])
def test_a_backbone_returning_a_tuple_is_a_clear_type_error(output: str):
    def hugging_face_style(x: Tensor, t: Tensor) -> object:
        logits = torch.zeros_like(x)
        return {"tuple": (logits,), "dict": {"logits": logits}, "list": [logits]}[output]

    predictor = XPredictor(hugging_face_style)  # type: ignore[arg-type]
    kind = {"tuple": "tuple", "dict": "dict", "list": "list"}[output]
    with pytest.raises(TypeError, match=rf"the backbone returned a {kind}, not a tensor of logits"):
        predictor(torch.randn(B, L, V), torch.rand(B))


def test_the_predictor_records_each_backbone_call():
    predictor = XPredictor(OneTimeNet())
    with count_network_calls() as calls:
        for _ in range(3):
            predictor(torch.randn(B, L, V), torch.rand(B))
    assert calls.count == 3


# ---------------------------------------------------------------- cross_entropy


def test_cross_entropy_matches_manual_gather():
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(B, L, V, generator=generator, dtype=F64)
    tokens = torch.randint(V, (B, L), generator=generator)
    manual = -torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss = cross_entropy(logits, tokens)
    assert loss.shape == (B, L)
    assert loss.dtype == F64
    assert torch.allclose(loss, manual, rtol=1e-12, atol=1e-12)
    # Per token: changing one position's logits changes exactly that entry.
    bumped = logits.clone()
    bumped[1, 2] += torch.arange(V, dtype=F64)
    changed = cross_entropy(bumped, tokens) != loss
    assert changed.sum() == 1
    assert changed[1, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_is_at_least_float32(dtype: torch.dtype):
    logits = torch.randn(B, L, V).to(dtype)
    tokens = torch.randint(V, (B, L))
    loss = cross_entropy(logits, tokens)
    assert loss.dtype == torch.float32
    manual = -torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(loss, manual, atol=1e-6)


@pytest.mark.parametrize("bad", [V, -1])
def test_cross_entropy_rejects_out_of_range_tokens(bad: int):
    tokens = torch.zeros(B, L, dtype=torch.long)
    tokens[0, 0] = bad
    with pytest.raises(RuntimeError, match="out of range"):
        cross_entropy(torch.randn(B, L, V), tokens)


def test_cross_entropy_rejects_shape_mismatch(checks: str):
    match = "parameter 'tokens'" if checks == "jaxtyping" else "disagree on"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        cross_entropy(torch.randn(B, L, V), torch.zeros(B, L + 1, dtype=torch.long))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_cross_entropy_gradient_is_softmax_minus_one_hot(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(B, L, V, generator=generator, dtype=F64)).to(dtype)
    logits.requires_grad_(True)
    tokens = torch.randint(V, (B, L), generator=generator)
    weights = torch.rand(B, L, generator=generator, dtype=F64)  # a non-uniform upstream gradient
    (cross_entropy(logits, tokens) * weights).sum().backward()
    assert logits.grad is not None and logits.grad.dtype == dtype
    wide = logits.detach().double()
    reference = weights[..., None] * (wide.softmax(-1) - nn.functional.one_hot(tokens, V))
    tolerance = {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(logits.grad.double(), reference, atol=tolerance)


def test_cross_entropy_gradient_passes_gradcheck():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=generator, dtype=F64, requires_grad=True)
    tokens = torch.randint(5, (2, 3), generator=generator)
    assert torch.autograd.gradcheck(lambda z: cross_entropy(z, tokens), (logits,))


def test_cross_entropy_has_second_derivatives():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 5, generator=generator, dtype=F64, requires_grad=True)
    tokens = torch.randint(5, (2, 3), generator=generator)
    assert torch.autograd.gradgradcheck(lambda z: cross_entropy(z, tokens), (logits,))


def test_cross_entropy_backward_keeps_the_logits_and_one_gradient():
    tokens = torch.randint(64, (4, 8), generator=torch.Generator().manual_seed(0))
    features = torch.randn(4, 8, 16, requires_grad=True)
    head = nn.Linear(16, 64)
    unit = 4 * 8 * 64 * 4
    with LiveTensorBytes() as tracker:
        cross_entropy(head(features), tokens).sum().backward()
    # the logits and their gradient: no log-probabilities, no gradient of them
    assert [size for size, _ in tracker.big(unit)] == [unit, unit]
    assert tracker.peak < 2 * unit + unit // 2


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_hand_computation():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_mean(loss, mask).item() == pytest.approx((1 + 3 + 6) / 3, rel=1e-15)
    assert masked_mean(loss).item() == pytest.approx(21 / 6, rel=1e-15)
    assert masked_mean(loss, torch.ones_like(mask)).item() == pytest.approx(21 / 6, rel=1e-15)
    assert masked_mean(loss, torch.zeros_like(mask)).item() == 0.0


def test_masked_mean_gradient_only_reaches_counted_tokens():
    loss = torch.rand(2, 3, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    masked_mean(loss, mask).backward()
    assert loss.grad is not None
    assert torch.equal(loss.grad, mask.to(F64) / 4)


def test_masked_mean_rejects_mask_shape_mismatch(checks: str):
    match = "parameter 'mask'" if checks == "jaxtyping" else r"mask \(3, 2\) does not match"
    with pytest.raises((TypeCheckError, ValueError), match=match):
        masked_mean(torch.rand(2, 3), torch.ones(3, 2, dtype=torch.bool))


# ---------------------------------------------------------------- LearnedTimeWeighting


def test_time_weighting_is_identity_at_init():
    weighting = LearnedTimeWeighting(dim=16)
    loss, t = torch.rand(5, 7), torch.rand(5)
    assert torch.equal(weighting(loss, t), loss)
    assert torch.equal(weighting.log_weight(t), torch.zeros(5))


def test_time_weighting_formula():
    torch.manual_seed(0)
    weighting = LearnedTimeWeighting(dim=16)
    with torch.no_grad():
        for parameter in weighting.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    loss, t = torch.rand(5, 7), torch.rand(5)
    w = weighting.log_weight(t)
    assert w.shape == (5,)
    assert w.abs().max() > 1e-3
    expected = torch.exp(-w)[:, None] * loss + w[:, None]
    assert torch.allclose(weighting(loss, t), expected, rtol=1e-6, atol=1e-6)


def test_time_weighting_takes_per_token_times():
    torch.manual_seed(0)
    weighting = LearnedTimeWeighting(dim=16)
    with torch.no_grad():
        for parameter in weighting.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    loss, t = torch.rand(5, 7), torch.rand(5)
    per_token = weighting(loss, t[:, None].expand(5, 7))
    assert torch.allclose(per_token, weighting(loss, t), rtol=0, atol=1e-6)
    assert weighting.log_weight(t[:, None].expand(5, 7)).shape == (5, 7)


def log_c(t: Tensor) -> Tensor:
    return 1.5 * t - 0.5 + 0.4 * torch.sin(2 * math.pi * t)


def test_time_weighting_learns_log_expected_loss():
    # E[exp(-w) l + w | t] = exp(-w) c(t) + w is minimal at w = log c(t), c(t) = E[l | t].
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    weighting = LearnedTimeWeighting(dim=16)
    steps, batch = 500, 256
    optimizer = torch.optim.Adam(weighting.parameters(), lr=2e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        t = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
        noise = 2 * torch.rand(batch, 8, generator=generator)  # mean 1
        loss = torch.exp(log_c(t))[:, None] * noise
        objective = weighting(loss, t).mean()
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        schedule.step()
    grid = torch.linspace(0.02, 0.98, 49)
    with torch.no_grad():
        error = (weighting.log_weight(grid) - log_c(grid)).abs().max()
    assert error <= 0.1
