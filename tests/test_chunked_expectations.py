"""Expectations of tables under a chunked head: several tables in one pass, and sg(p) E's gradient."""

import pytest
import torch
from live_tensors import LiveTensorBytes

from flowlm.chunked import (
    chunked_expectation,
    chunked_expectation_and_argmax,
    chunked_expectations_and_argmax,
)

V, B, L = 30, 2, 7


def head_and_features(vocab: int = V, seq: int = L) -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    head = torch.nn.Linear(4, vocab).double()
    with torch.no_grad():
        head.weight.mul_(3.0)  # far from uniform probabilities
    return head, torch.randn(B, seq, 4, dtype=torch.float64)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])
def test_several_tables_in_one_pass_equal_the_dense_products(chunk_size: int):
    head, features = head_and_features()
    tables = [torch.randn(V, 2, dtype=torch.float64), torch.randn(V, 5, dtype=torch.float64)]
    with torch.no_grad():
        (first, second), tokens = chunked_expectations_and_argmax(
            head, features, tables, chunk_size=chunk_size
        )
        probs = torch.softmax(head(features), -1)
        single, single_tokens = chunked_expectation_and_argmax(
            head, features, tables[0], chunk_size=chunk_size
        )
    torch.testing.assert_close(first, probs @ tables[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, probs @ tables[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(tokens, probs.argmax(-1)) and torch.equal(single_tokens, tokens)
    assert torch.equal(single, first)


def test_tables_of_another_vocabulary_are_refused():
    head, features = head_and_features()
    with pytest.raises(ValueError, match="table has 29 rows"):
        chunked_expectations_and_argmax(head, features, [torch.randn(V - 1, 2).double()])
    with pytest.raises(ValueError, match="at least one table"):
        chunked_expectations_and_argmax(head, features, [])
    with pytest.raises(ValueError, match="table has 29 rows"):
        chunked_expectation(head, features, torch.randn(V - 1, 2).double())


@pytest.mark.parametrize("checkpoint", [True, False])
def test_the_expectation_is_differentiable_in_the_table_only(checkpoint: bool):
    head, features = head_and_features()
    features.requires_grad_(True)
    table = torch.randn(V, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(B, L, 3, dtype=torch.float64)
    ours = chunked_expectation(head, features, table, chunk_size=2, checkpoint=checkpoint)
    probs = torch.softmax(head(features), -1).detach()
    torch.testing.assert_close(ours, probs @ table, rtol=1e-12, atol=1e-12)
    (ours * weights).sum().backward()
    # d/dE sum_i w_i . (p_i E) = sum_i p_i^T w_i; nothing reaches the head or the features
    expected = torch.einsum("blv,bld->vd", probs, weights)
    assert table.grad is not None
    torch.testing.assert_close(table.grad, expected, rtol=1e-12, atol=1e-12)
    assert features.grad is None and all(p.grad is None for p in head.parameters())


def test_checkpointing_keeps_no_probabilities_for_the_backward_pass():
    vocab, seq, chunk = 3000, 24, 2
    head, features = head_and_features(vocab, seq)
    head, features = head.float(), features.float()
    table = torch.randn(vocab, 3, requires_grad=True)
    unit = B * seq * vocab * 4  # one float32 (batch, seq, vocab) tensor
    peaks = {}
    for checkpoint in (True, False):
        with LiveTensorBytes() as tracker:
            chunked_expectation(head, features, table, chunk_size=chunk, checkpoint=checkpoint)
        peaks[checkpoint] = tracker.peak
    assert peaks[True] < unit / 4  # a chunk at a time, whatever the length
    assert peaks[False] > unit  # without, autograd keeps every chunk's probabilities
