import pytest
import torch
from jaxtyping import TypeCheckError
from torch import nn

from flowlm import cross_entropy
from flowlm.chunked import (
    chunked_cross_entropy,
    chunked_expectation_and_argmax,
    chunked_kl_divergence,
    chunked_softmax,
)
from flowlm.distill import kl_divergence

B, L, D, V = 3, 11, 5, 17


def head_and_features(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    head = nn.Linear(D, V).double()
    return head, torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)


def gradients(loss: torch.Tensor, head: nn.Linear, features: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss.square().sum(), [features, head.weight, head.bias]))


@pytest.mark.parametrize("chunk_size", [1, 4, L, 2 * L])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_cross_entropy_and_its_gradient_equal_the_dense_ones(chunk_size: int, checkpoint: bool):
    head, features = head_and_features()
    tokens = torch.randint(V, (B, L))
    dense = cross_entropy(head(features), tokens)
    chunked = chunked_cross_entropy(
        head, features, tokens, chunk_size=chunk_size, checkpoint=checkpoint
    )
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    for got, want in zip(
        gradients(chunked, head, features), gradients(dense, head, features), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_kl_and_its_gradient_equal_the_dense_ones(checkpoint: bool):
    head, features = head_and_features(1)
    target = torch.softmax(torch.randn(B, L, V, dtype=torch.float64), -1)
    target[0, 0] = torch.eye(V, dtype=torch.float64)[3]  # zeros in the target: 0 log 0 = 0
    dense = kl_divergence(target, head(features))
    chunked = chunked_kl_divergence(target, head, features, chunk_size=3, checkpoint=checkpoint)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    assert bool((chunked > 0).all())
    for got, want in zip(
        gradients(chunked, head, features), gradients(dense, head, features), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_checkpointing_recomputes_the_head_in_the_backward_pass():
    head, features = head_and_features()
    calls = [0]

    def counted(chunk: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return head(chunk)

    tokens = torch.randint(V, (B, L))
    for checkpoint, expected in [(False, 3), (True, 6)]:
        calls[0] = 0
        loss = chunked_cross_entropy(counted, features, tokens, chunk_size=4, checkpoint=checkpoint)
        loss.sum().backward()
        assert calls[0] == expected


@pytest.mark.parametrize("grad", [False, True])
def test_softmax_equals_the_dense_one(grad: bool):
    head, features = head_and_features(2)
    with torch.set_grad_enabled(grad):
        probs = chunked_softmax(head, features, chunk_size=4)
    torch.testing.assert_close(probs, torch.softmax(head(features), -1), rtol=1e-12, atol=1e-12)
    assert probs.requires_grad is grad


def test_float16_logits_are_reduced_in_float32():
    head = nn.Linear(D, V).half()
    features = torch.randn(B, L, D).half()
    probs = chunked_softmax(head, features)
    loss = chunked_cross_entropy(head, features, torch.randint(V, (B, L)))
    assert probs.dtype == loss.dtype == torch.float32


def test_bad_values_are_named():
    head, features = head_and_features()
    tokens = torch.randint(V, (B, L))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(head, features, tokens, chunk_size=0)
    with pytest.raises(RuntimeError, match="out of range"):
        chunked_cross_entropy(head, features, tokens + V)


def test_bad_shapes_and_types_are_named(checks: str):
    head, features = head_and_features()
    tokens = torch.randint(V, (B, L))
    jaxtyping = checks == "jaxtyping"
    with pytest.raises((TypeCheckError, ValueError), match="'tokens'" if jaxtyping else "disagree"):
        chunked_cross_entropy(head, features, tokens[:, :-1])
    with pytest.raises((TypeCheckError, TypeError), match="'tokens'" if jaxtyping else "integers"):
        chunked_cross_entropy(head, features, tokens.double())
    with pytest.raises((TypeCheckError, ValueError), match="'target'" if jaxtyping else "disagree"):
        chunked_kl_divergence(torch.ones(B, L + 1, V), head, features)


@pytest.mark.parametrize("chunk_size", [1, 4, L, 2 * L])
def test_expectation_and_argmax_equal_the_dense_ones(chunk_size: int):
    head, features = head_and_features(seed=3)
    table = torch.randn(V, 4, dtype=torch.float64)
    probs = torch.softmax(head(features), -1)
    mean, tokens = chunked_expectation_and_argmax(head, features, table, chunk_size=chunk_size)
    torch.testing.assert_close(mean, probs @ table, rtol=1e-12, atol=1e-12)
    assert torch.equal(tokens, probs.argmax(-1))
    assert tokens.unique().numel() > 1  # the argmax varies: the comparison is not trivial
    # the gradient reaches the head through the expectation
    (gradient,) = torch.autograd.grad(mean.sum(), [head.weight])
    (expected,) = torch.autograd.grad((probs @ table).sum(), [head.weight])
    torch.testing.assert_close(gradient, expected)


def test_expectation_with_a_table_of_another_vocabulary_is_refused():
    head, features = head_and_features()
    with pytest.raises(ValueError, match="predicts 17 entries but the table has 16 rows"):
        chunked_expectation_and_argmax(head, features, torch.randn(V - 1, 4, dtype=torch.float64))
