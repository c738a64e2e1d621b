import pytest
import torch
from torch import nn

from flowlm.backbones import DiT

V, B, L = 7, 3, 5


def tiny(two_time: bool = False) -> DiT:
    return DiT(V, dim=32, depth=2, heads=4, two_time=two_time, frequency_dim=16).eval()


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every weight (zero-initialised ones included) so outputs are not trivially uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("two_time", [False, True])
def test_shapes(two_time: bool):
    model = tiny(two_time)
    s = torch.rand(B) if two_time else None
    assert model(torch.randn(B, L, V), torch.rand(B), s).shape == (B, L, V)
    assert model(torch.randint(V, (B, L)), torch.rand(B), s).shape == (B, L, V)
    assert model.two_time is two_time
    assert model.vocab_size == V


@pytest.mark.parametrize("two_time", [False, True])
def test_uniform_at_init(two_time: bool):
    model = tiny(two_time).train()
    s = torch.rand(B) if two_time else None
    probs = model(torch.randn(B, L, V), torch.rand(B), s).softmax(-1)
    assert torch.equal(probs, torch.full_like(probs, 1 / V))


def test_two_time_with_zero_second_embedding_equals_one_time():
    one, two = tiny(), tiny(two_time=True)
    perturb(one)
    missing, unexpected = two.load_state_dict(one.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(key.startswith("target_time_embedding.") for key in missing)
    x, t, s = torch.randn(B, L, V), torch.rand(B), torch.rand(B)
    expected = one(x, t)
    assert not torch.allclose(expected, torch.zeros_like(expected))
    assert torch.equal(two(x, t, s), expected)


@pytest.mark.parametrize("two_time", [False, True])
def test_tokens_and_one_hot_agree(two_time: bool):
    model = tiny(two_time)
    perturb(model)
    tokens, t = torch.randint(V, (B, L)), torch.rand(B)
    s = torch.rand(B) if two_time else None
    from_tokens = model(tokens, t, s)
    from_one_hot = model(nn.functional.one_hot(tokens, V).float(), t, s)
    assert from_tokens.std() > 0.1
    torch.testing.assert_close(from_tokens, from_one_hot, atol=1e-6, rtol=0)


def test_wrong_vocabulary():
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        tiny()(torch.randn(B, L, V + 1), torch.rand(B))


def test_s_passed_to_one_time_model():
    with pytest.raises(ValueError, match="two_time=True"):
        tiny()(torch.randn(B, L, V), torch.rand(B), torch.rand(B))


def test_s_missing_from_two_time_model():
    with pytest.raises(ValueError, match="pass the target time s"):
        tiny(two_time=True)(torch.randn(B, L, V), torch.rand(B))


# With the jaxtyping plugin on, shape errors are caught by the annotations (a TypeError)
# before the model's own ValueError; either names the problem.
@pytest.mark.parametrize(
    ("x", "t"),
    [
        (torch.randn(B, L, V), torch.rand(B + 1)),
        (torch.randn(L, V), torch.rand(B)),
        (torch.randint(V, (B, L, 1)), torch.rand(B)),
        (torch.randn(B, L, V), torch.rand(B, 1)),
    ],
)
def test_wrong_shapes(x: torch.Tensor, t: torch.Tensor):
    with pytest.raises((ValueError, TypeError)):
        tiny()(x, t)


# ---------------------------------------------------------------- per-token times (adaLN per position)


def time_arguments(
    two_time: bool, per_token: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    times = [torch.rand(B, generator=generator) for _ in range(2 if two_time else 1)]
    return [v[:, None].expand(B, L).contiguous() for v in times] if per_token else times


@pytest.mark.parametrize("two_time", [False, True])
def test_per_token_times_equal_to_per_example_agree_to_round_off(two_time: bool):
    # Not bit-for-bit: the time MLP's matmul sees (batch, features) or (batch * seq, features)
    # rows, and CPU GEMM kernels round differently for different row counts.
    model = tiny(two_time)
    perturb(model)
    x = torch.randn(B, L, V, generator=torch.Generator().manual_seed(1))
    per_example = model(x, *time_arguments(two_time, False, torch.Generator().manual_seed(2)))
    per_token = model(x, *time_arguments(two_time, True, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(per_token, per_example, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("two_time", [False, True])
def test_per_token_times_condition_each_position(two_time: bool):
    # A clean first token (time 1) changes every position through attention; without
    # attention (depth 0) only its own position, whose adaLN reads its own time.
    model = tiny(two_time)
    perturb(model)
    x = torch.randn(B, L, V, generator=torch.Generator().manual_seed(3))
    times = time_arguments(two_time, True, torch.Generator().manual_seed(4))
    base = model(x, *times)
    known = [v.clone() for v in times]
    for v in known:
        v[:, 0] = 1.0  # a clean first token
    changed = model(x, *known)
    assert (changed - base).abs().amax(dim=(0, 2)).min() > 1e-4
    shallow = DiT(V, dim=32, depth=0, heads=4, two_time=two_time, frequency_dim=16).eval()
    perturb(shallow)
    delta = (shallow(x, *known) - shallow(x, *times)).abs().amax(dim=(0, 2))
    assert delta[0] > 1e-4
    assert torch.equal(delta[1:], torch.zeros(L - 1))


def test_one_time_per_example_and_the_other_per_token():
    model = tiny(two_time=True)
    perturb(model)
    x = torch.randn(B, L, V, generator=torch.Generator().manual_seed(5))
    t, s = torch.rand(B), torch.rand(B)
    both = model(x, t[:, None].expand(B, L).contiguous(), s[:, None].expand(B, L).contiguous())
    torch.testing.assert_close(model(x, t, s[:, None].expand(B, L).contiguous()), both)
    torch.testing.assert_close(model(x, t[:, None].expand(B, L).contiguous(), s), both)


def test_per_example_times_keep_one_conditioning_vector_per_example():
    model = tiny()
    shapes: list[tuple[int, ...]] = []
    model.blocks[0].modulation.register_forward_hook(
        lambda m, i, o: shapes.append(tuple(i[0].shape))
    )
    model(torch.randn(B, L, V), torch.rand(B))
    model(torch.randn(B, L, V), torch.rand(B, L))
    assert shapes == [(B, 32), (B, L, 32)]
