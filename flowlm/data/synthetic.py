"""Synthetic sequence tasks whose quality metrics are exact, for tests and ablations."""

import string
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from flowlm._checks import check_tokens
from flowlm._types import Tokens
from flowlm.data.tokenizer import CharTokenizer


@dataclass(frozen=True)
class AlphaRepeat:
    """Sequences made of one symbol repeated ``length`` times, the symbol uniform.

    A valid sequence needs every position to agree: a sampler that draws each position
    independently from the true (uniform) marginals is valid with probability only
    ``vocab_size ** (1 - length)``.

    Args:
        vocab_size: number of symbols.
        length: positions per sequence.

    Examples:
        >>> task = AlphaRepeat(vocab_size=4, length=3)
        >>> tokens = task.sample(5, torch.Generator().manual_seed(0))
        >>> task.valid_rate(tokens)
        1.0
        >>> task.decode(torch.tensor([[0, 0, 0], [3, 3, 1]]))
        ['aaa', 'ddb']
    """

    vocab_size: int = 26
    length: int = 8

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.length < 1:
            raise ValueError(f"vocab_size and length must be positive, got {self}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Tokens:
        """Draw ``batch_size`` sequences.

        Examples:
            >>> AlphaRepeat(3, 4).sample(2, torch.Generator().manual_seed(0)).shape
            torch.Size([2, 4])
        """
        symbols = torch.randint(self.vocab_size, (batch_size, 1), generator=generator)
        return symbols.expand(batch_size, self.length).clone()

    def _valid_rows(self, tokens: Tokens) -> Int[Tensor, " valid"]:
        if tokens.shape[0] == 0 or tokens.shape[1] != self.length:
            raise ValueError(
                f"expected a non-empty batch of length-{self.length} sequences, "
                f"got shape {tuple(tokens.shape)}"
            )
        check_tokens(tokens, self.vocab_size)
        return (tokens == tokens[:, :1]).all(dim=1).nonzero().squeeze(1)

    def valid_rate(self, tokens: Tokens) -> float:
        """Fraction of rows that are one symbol repeated.

        Examples:
            >>> AlphaRepeat(3, 2).valid_rate(torch.tensor([[0, 0], [1, 2], [2, 2], [0, 1]]))
            0.5
        """
        return self._valid_rows(tokens).numel() / tokens.shape[0]

    def mode_coverage(self, tokens: Tokens) -> float:
        """Fraction of the symbols that appear as at least one valid row.

        Examples:
            >>> AlphaRepeat(4, 2).mode_coverage(torch.tensor([[0, 0], [0, 0], [1, 2], [3, 3]]))
            0.5
        """
        symbols = tokens[self._valid_rows(tokens), 0]
        return symbols.unique().numel() / self.vocab_size

    def decode(self, tokens: Tokens) -> list[str]:
        """Each row as letters: ``a`` to ``z`` then ``A`` to ``Z`` (up to 52 symbols).

        Examples:
            >>> AlphaRepeat(26, 2).decode(torch.tensor([[25, 25]]))
            ['zz']
        """
        if self.vocab_size > len(string.ascii_letters):
            raise ValueError(f"only 52 symbols have letters, this task has {self.vocab_size}")
        return CharTokenizer(string.ascii_letters[: self.vocab_size]).decode_batch(tokens)


class MarkovChain(nn.Module):
    r"""A random stationary Markov chain of known order over a small vocabulary.

    The state after position ``i`` is the last ``order`` tokens. Each state's next-token
    distribution $P(x_i \mid x_{i-k}, \dots, x_{i-1})$ is drawn once from a symmetric
    Dirichlet(``concentration``) with a seeded generator; the first ``k = order`` tokens
    follow the stationary distribution $\pi$ of the state chain, so every window of a sample
    is distributed alike. The entropy rate is

    $$h = -\sum_s \pi(s) \sum_y P(y \mid s) \log P(y \mid s)$$

    in nats per token. Buffers (float64): ``transition`` (states × vocab) and ``initial``
    ($\pi$ over the ``vocab_size ** order`` states; a state's index reads its tokens as
    base-``vocab_size`` digits, oldest first).

    Args:
        vocab_size: number of symbols.
        order: number of previous tokens the next one depends on.
        seed: seed of the draw of the transition probabilities.
        concentration: Dirichlet concentration; smaller is more predictable.

    Examples:
        >>> chain = MarkovChain(vocab_size=4, order=1, seed=0)
        >>> tokens = chain.sample(2, 6, torch.Generator().manual_seed(0))
        >>> tokens.shape, chain.log_likelihood(tokens).dtype
        (torch.Size([2, 6]), torch.float64)
    """

    transition: Float[Tensor, "states vocab"]
    initial: Float[Tensor, " states"]

    def __init__(
        self, vocab_size: int, order: int = 1, seed: int = 0, concentration: float = 0.5
    ) -> None:
        super().__init__()
        if vocab_size < 2 or order < 1 or concentration <= 0:
            raise ValueError(
                f"need vocab_size >= 2, order >= 1 and concentration > 0, got {vocab_size}, "
                f"{order} and {concentration}"
            )
        self.vocab_size = vocab_size
        self.order = order
        draws = np.random.default_rng(seed).dirichlet(
            np.full(vocab_size, concentration), size=vocab_size**order
        )
        transition = torch.from_numpy(draws)
        self.register_buffer("transition", transition)
        self.register_buffer("initial", _stationary(transition))

    def _state_index(self, tokens: Int[Tensor, "*batch digits"]) -> Int[Tensor, "*batch"]:
        digits = tokens.shape[-1]
        powers = self.vocab_size ** torch.arange(digits - 1, -1, -1, device=tokens.device)
        return (tokens * powers).sum(-1)

    def sample(
        self, batch_size: int, length: int, generator: torch.Generator | None = None
    ) -> Tokens:
        """Draw ``batch_size`` sequences of ``length`` tokens, on the buffers' device.

        Examples:
            >>> MarkovChain(3, order=2).sample(4, 5, torch.Generator().manual_seed(0)).shape
            torch.Size([4, 5])
        """
        state = torch.multinomial(self.initial, batch_size, replacement=True, generator=generator)
        powers = self.vocab_size ** torch.arange(self.order - 1, -1, -1, device=state.device)
        tokens = list((state[:, None] // powers % self.vocab_size).unbind(1))
        for _ in range(length - self.order):
            following = torch.multinomial(self.transition[state], 1, generator=generator)[:, 0]
            state = state % (self.vocab_size ** (self.order - 1)) * self.vocab_size + following
            tokens.append(following)
        return torch.stack(tokens, dim=1)[:, :length]

    def log_likelihood(self, tokens: Tokens) -> Float[Tensor, " batch"]:
        """Exact log-probability of each sequence under the chain (float64).

        Examples:
            >>> chain = MarkovChain(2)
            >>> tokens = torch.tensor([[0, 1]])
            >>> expected = (chain.initial[0] * chain.transition[0, 1]).log()
            >>> torch.allclose(chain.log_likelihood(tokens), expected)
            True
        """
        check_tokens(tokens, self.vocab_size)
        prefix = min(self.order, tokens.shape[1])
        prefix_probabilities = self.initial.view(self.vocab_size**prefix, -1).sum(1)
        log_probability = prefix_probabilities[self._state_index(tokens[:, :prefix])].log()
        if tokens.shape[1] > self.order:
            states = self._state_index(tokens[:, :-1].unfold(1, self.order, 1))
            steps = self.transition[states, tokens[:, self.order :]].log()
            log_probability = log_probability + steps.sum(1)
        return log_probability

    def exact_perplexity(self, tokens: Tokens) -> float:
        """``exp`` of minus the mean log-likelihood per token of a batch of sequences.

        For long samples of the chain this tends to ``exp(entropy_rate())``.

        Examples:
            >>> chain = MarkovChain(2)
            >>> 1.0 <= chain.exact_perplexity(torch.tensor([[0, 1, 1, 0]]))
            True
        """
        return torch.exp(-self.log_likelihood(tokens).sum() / tokens.numel()).item()

    def entropy_rate(self) -> float:
        """Entropy rate of the chain, in nats per token.

        Examples:
            >>> import math
            >>> 0 < MarkovChain(8).entropy_rate() < math.log(8)
            True
        """
        entropy_per_state = -torch.special.xlogy(self.transition, self.transition).sum(1)
        return (self.initial * entropy_per_state).sum().item()


def _stationary(transition: Float[Tensor, "states vocab"]) -> Float[Tensor, " states"]:
    """Stationary distribution of the state chain, by power iteration from uniform.

    From state ``(a, rest)`` the next state is ``(rest, y)`` with probability
    ``transition[(a, rest), y]``. Strictly positive transitions (Dirichlet draws almost
    surely) make the chain primitive, so the iteration converges geometrically.
    """
    states, vocab_size = transition.shape
    by_oldest = transition.view(vocab_size, states // vocab_size, vocab_size)
    distribution = torch.full((states,), 1 / states, dtype=transition.dtype)
    for _ in range(100_000):
        following = torch.einsum(
            "ar,ary->ry", distribution.view(vocab_size, -1), by_oldest
        ).reshape(states)
        if (following - distribution).abs().sum() < 1e-14:
            return following
        distribution = following
    raise RuntimeError("the stationary distribution of the Markov chain did not converge")
