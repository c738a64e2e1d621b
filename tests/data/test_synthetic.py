import itertools
import math

import pytest
import torch

from flowlm.data import AlphaRepeat, MarkovChain


def test_alpha_repeat_samples_are_valid_and_cover_every_symbol() -> None:
    task = AlphaRepeat()
    tokens = task.sample(2000, torch.Generator().manual_seed(0))
    assert tokens.shape == (2000, 8) and tokens.dtype == torch.long
    assert task.valid_rate(tokens) == 1.0
    assert task.mode_coverage(tokens) == 1.0


@pytest.mark.parametrize(
    ("rows", "valid_rate", "coverage"),
    [
        ([[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]], 1.0, 1.0),
        ([[0, 0, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]], 0.5, 0.25),
        ([[0, 1, 2], [3, 2, 1], [1, 1, 2]], 0.0, 0.0),
        ([[2, 2, 2], [3, 3, 1], [3, 3, 3], [0, 1, 1], [2, 2, 2]], 0.6, 0.5),
    ],
)
def test_alpha_repeat_metrics_by_hand(
    rows: list[list[int]], valid_rate: float, coverage: float
) -> None:
    task = AlphaRepeat(vocab_size=4, length=3)
    tokens = torch.tensor(rows)
    assert task.valid_rate(tokens) == pytest.approx(valid_rate)
    assert task.mode_coverage(tokens) == pytest.approx(coverage)


@pytest.mark.parametrize("shape", [(0, 3), (2, 4)])
def test_alpha_repeat_rejects_wrong_shapes(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="length-3 sequences"):
        AlphaRepeat(4, 3).valid_rate(torch.zeros(shape, dtype=torch.long))


def test_alpha_repeat_decode() -> None:
    assert AlphaRepeat(30, 2).decode(torch.tensor([[0, 0], [29, 26]])) == ["aa", "DA"]
    with pytest.raises(ValueError, match="only 52 symbols"):
        AlphaRepeat(53, 2).decode(torch.tensor([[0, 0]]))


def hand_log_likelihood(chain: MarkovChain, sequence: list[int]) -> float:
    """Log-probability from the buffers, one position at a time, marginalizing by hand."""
    vocab, order = chain.vocab_size, chain.order
    stationary = chain.initial.tolist()
    prefix = sequence[:order]
    total = 0.0
    for state in range(vocab**order):
        digits = [state // vocab ** (order - 1 - j) % vocab for j in range(order)]
        if digits[: len(prefix)] == prefix:
            total += stationary[state]
    log_probability = math.log(total)
    for i in range(order, len(sequence)):
        state = sum(x * vocab ** (order - 1 - j) for j, x in enumerate(sequence[i - order : i]))
        log_probability += math.log(chain.transition[state, sequence[i]].item())
    return log_probability


@pytest.mark.parametrize(("vocab", "order"), [(2, 1), (3, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("length", [1, 2, 5])
def test_markov_log_likelihood_matches_hand_computation(
    vocab: int, order: int, length: int
) -> None:
    chain = MarkovChain(vocab, order=order, seed=1)
    tokens = chain.sample(6, length, torch.Generator().manual_seed(0))
    expected = torch.tensor([hand_log_likelihood(chain, row) for row in tokens.tolist()])
    assert chain.log_likelihood(tokens).dtype == torch.float64
    torch.testing.assert_close(chain.log_likelihood(tokens), expected.double())


@pytest.mark.parametrize(("vocab", "order", "length"), [(3, 1, 4), (3, 2, 4), (2, 3, 2)])
def test_markov_probabilities_of_all_sequences_sum_to_one(
    vocab: int, order: int, length: int
) -> None:
    chain = MarkovChain(vocab, order=order)
    every_sequence = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    total = chain.log_likelihood(every_sequence).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))


def test_markov_initial_is_stationary() -> None:
    chain = MarkovChain(5, order=1, seed=3)
    torch.testing.assert_close(chain.initial @ chain.transition, chain.initial)
    assert chain.initial.sum().item() == pytest.approx(1.0)


def test_markov_sampled_transitions_match_the_matrix() -> None:
    chain = MarkovChain(3, order=1, seed=2)
    tokens = chain.sample(4000, 26, torch.Generator().manual_seed(0))
    pairs = tokens[:, :-1] * 3 + tokens[:, 1:]
    counts = torch.bincount(pairs.flatten(), minlength=9).view(3, 3).double()
    rows = counts.sum(1, keepdim=True)
    frequencies = counts / rows
    standard_error = (chain.transition * (1 - chain.transition) / rows).sqrt()
    assert ((frequencies - chain.transition).abs() <= 5 * standard_error + 1e-9).all()
    first = torch.bincount(tokens[:, 0], minlength=3).double() / 4000
    assert ((first - chain.initial).abs() <= 5 * (0.25 / 4000) ** 0.5).all()


@pytest.mark.parametrize(("vocab", "order"), [(8, 1), (4, 2)])
def test_markov_perplexity_of_samples_matches_entropy_rate(vocab: int, order: int) -> None:
    chain = MarkovChain(vocab, order=order, seed=0)
    batch, length = 1000, 200
    tokens = chain.sample(batch, length, torch.Generator().manual_seed(0))
    negative_log_likelihood = -chain.log_likelihood(tokens)
    # Exact expectation for a stationary start: the first `order` tokens carry the entropy
    # of the stationary distribution, every later token the entropy rate.
    start_entropy = -torch.special.xlogy(chain.initial, chain.initial).sum().item()
    expected = start_entropy + (length - order) * chain.entropy_rate()
    standard_error = negative_log_likelihood.std().item() / batch**0.5
    assert abs(negative_log_likelihood.mean().item() - expected) < 5 * standard_error
    perplexity = chain.exact_perplexity(tokens)
    assert perplexity == pytest.approx(math.exp(chain.entropy_rate()), rel=0.02)


def test_markov_entropy_rate_bounds_and_concentration() -> None:
    rates = [MarkovChain(8, concentration=c).entropy_rate() for c in (0.05, 0.5, 50.0)]
    assert 0 < rates[0] < rates[1] < rates[2] < math.log(8)
    assert rates[2] == pytest.approx(math.log(8), rel=0.02)


def test_markov_seed_fixes_the_chain() -> None:
    assert torch.equal(MarkovChain(4, seed=7).transition, MarkovChain(4, seed=7).transition)
    assert not torch.equal(MarkovChain(4, seed=7).transition, MarkovChain(4, seed=8).transition)


def test_markov_buffers_are_in_the_state_dict() -> None:
    state = MarkovChain(3, order=2).state_dict()
    assert state["transition"].shape == (9, 3) and state["initial"].shape == (9,)


def test_markov_rejects_ids_out_of_range() -> None:
    with pytest.raises(RuntimeError, match="token ids out of range"):
        MarkovChain(3).log_likelihood(torch.tensor([[0, 3]]))


@pytest.mark.parametrize(
    ("vocab", "order", "concentration"), [(1, 1, 0.5), (3, 0, 0.5), (3, 1, 0.0)]
)
def test_markov_invalid_arguments(vocab: int, order: int, concentration: float) -> None:
    with pytest.raises(ValueError, match="need vocab_size >= 2"):
        MarkovChain(vocab, order=order, concentration=concentration)
