r"""An output head applied a few positions at a time: cross-entropy, KL and softmax.

A network's last layer maps per-position features $f_i \in \mathbb{R}^d$ to logits
$z_i = \mathrm{head}(f_i) \in \mathbb{R}^V$. Every quantity here is per position, so it can be
computed over ``chunk_size`` positions at a time: the full ``(batch, seq, vocab)`` logits never
exist at once. With ``checkpoint=True`` (and gradients on) a chunk's logits are not kept for
the backward pass either: they are recomputed from the features, which costs one more head
product per chunk and saves about three ``(batch, seq, vocab)`` tensors at the peak of a
training step. The values equal the unchunked ones up to float rounding.
"""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute

from flowlm._checks import check_tokens
from flowlm._types import Logits, Probs, TokenLoss, Tokens

Features = Float[Tensor, "batch seq dim"]
"""Per-position features, the input of an output head."""

Head = Callable[[Features], Logits]
"""A position-wise map from features to logits (e.g. the last ``nn.Linear`` of a network)."""

DEFAULT_CHUNK_SIZE = 16
"""Positions per chunk by default."""


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")


def _check_positions(features: Tensor, other: Tensor, what: str) -> None:
    if features.ndim != 3:
        raise ValueError(f"features must have shape (batch, seq, dim), got {tuple(features.shape)}")
    if other.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"{what} {tuple(other.shape)} and features {tuple(features.shape)} "
            "disagree on (batch, seq)"
        )


def _per_chunk(
    loss: Callable[..., Tensor],
    features: Tensor,
    *others: Tensor,
    chunk_size: int,
    checkpoint: bool,
) -> Tensor:
    recomputed = checkpoint and torch.is_grad_enabled()
    pieces: list[Tensor] = []
    for start in range(0, features.shape[1], chunk_size):
        chunk = tuple(x[:, start : start + chunk_size] for x in (features, *others))
        if recomputed:
            piece = recompute(loss, *chunk, use_reentrant=False)
            assert isinstance(piece, Tensor)
            pieces.append(piece)
        else:
            pieces.append(loss(*chunk))
    return torch.cat(pieces, dim=1)


def _wide_log_softmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _wide_softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def chunked_cross_entropy(
    head: Head,
    features: Features,
    tokens: Tokens,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint: bool = True,
) -> TokenLoss:
    r"""Per-token cross-entropy $-\log\mathrm{softmax}(\mathrm{head}(f_i))[x_i]$, chunk by chunk.

    Equal to ``cross_entropy(head(features), tokens)`` (in float32 or wider), with at most
    ``batch * chunk_size * vocab`` logits alive at a time.

    Args:
        head: position-wise map from features to logits.
        features: the head's input at every position.
        tokens: the target token at every position.
        chunk_size: positions per chunk.
        checkpoint: recompute each chunk's logits in the backward pass instead of storing them.

    Examples:
        >>> from flowlm.heads import cross_entropy
        >>> head = torch.nn.Linear(4, 7)
        >>> features, tokens = torch.randn(2, 5, 4), torch.randint(0, 7, (2, 5))
        >>> chunked = chunked_cross_entropy(head, features, tokens, chunk_size=2)
        >>> torch.allclose(chunked, cross_entropy(head(features), tokens))
        True
    """
    _check_chunk_size(chunk_size)
    _check_positions(features, tokens, "tokens")
    if tokens.is_floating_point():
        raise TypeError(f"token ids must be integers, got {tokens.dtype}")

    def loss(chunk: Tensor, targets: Tensor) -> Tensor:
        log_probs = _wide_log_softmax(head(chunk))
        check_tokens(targets, log_probs.shape[-1])
        return -log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)

    return _per_chunk(loss, features, tokens, chunk_size=chunk_size, checkpoint=checkpoint)


def chunked_kl_divergence(
    target: Probs,
    head: Head,
    features: Features,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint: bool = True,
) -> TokenLoss:
    r"""Per-token $\mathrm{KL}(p_i \,\Vert\, \mathrm{softmax}(\mathrm{head}(f_i)))$, chunk by chunk.

    $\sum_v p_v(\log p_v - \log q_v)$ with $q = \mathrm{softmax}(\mathrm{head}(f))$; the target
    $p$ is a constant (no gradient flows into it).

    Examples:
        >>> head = torch.nn.Linear(3, 4)
        >>> features = torch.randn(1, 6, 3)
        >>> target = torch.softmax(head(features), -1).detach()
        >>> bool(chunked_kl_divergence(target, head, features, chunk_size=4).abs().max() < 1e-6)
        True
    """
    _check_chunk_size(chunk_size)
    _check_positions(features, target, "target")
    target = target.detach()

    def loss(chunk: Tensor, p: Tensor) -> Tensor:
        return (torch.special.xlogy(p, p) - p * _wide_log_softmax(head(chunk))).sum(-1)

    return _per_chunk(loss, features, target, chunk_size=chunk_size, checkpoint=checkpoint)


def chunked_softmax(
    head: Head, features: Features, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Probs:
    r"""Probabilities $\mathrm{softmax}(\mathrm{head}(f_i))$ (float32 or wider), chunk by chunk.

    The output is the only ``(batch, seq, vocab)`` tensor allocated; each chunk's logits are
    freed once its probabilities are written.

    Examples:
        >>> head = torch.nn.Linear(3, 4)
        >>> features = torch.randn(2, 5, 3)
        >>> torch.allclose(chunked_softmax(head, features, chunk_size=2), torch.softmax(head(features), -1))
        True
    """
    _check_chunk_size(chunk_size)
    starts = range(0, features.shape[1], chunk_size)
    chunks = (_wide_softmax(head(features[:, start : start + chunk_size])) for start in starts)
    if torch.is_grad_enabled():
        return torch.cat(list(chunks), dim=1)
    output: Tensor | None = None
    for start, probs in zip(starts, chunks, strict=True):
        if output is None:
            output = probs.new_empty((features.shape[0], features.shape[1], probs.shape[-1]))
        output[:, start : start + probs.shape[1]] = probs
    assert output is not None
    return output


def chunked_expectation_and_argmax(
    head: Head,
    features: Features,
    table: Float[Tensor, "vocab width"],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Float[Tensor, "batch seq width"], Tokens]:
    r"""$pE$ and $\arg\max_v p_v$ for $p = \mathrm{softmax}(\mathrm{head}(f_i))$, chunk by chunk.

    The expectation of the table's rows under the predicted distribution (in the table's
    dtype) and the most likely token, at every position; neither the logits nor the
    probabilities of more than ``chunk_size`` positions exist at a time, so no
    ``(batch, seq, vocab)`` tensor is allocated. `chunked_expectations_and_argmax` does the
    same for several tables in one pass.

    Examples:
        >>> head, table = torch.nn.Linear(3, 6), torch.randn(6, 2)
        >>> features = torch.randn(2, 5, 3)
        >>> mean, tokens = chunked_expectation_and_argmax(head, features, table, chunk_size=2)
        >>> probs = torch.softmax(head(features), -1)
        >>> torch.allclose(mean, probs @ table, atol=1e-6), torch.equal(tokens, probs.argmax(-1))
        (True, True)
    """
    (mean,), tokens = chunked_expectations_and_argmax(
        head, features, [table], chunk_size=chunk_size
    )
    return mean, tokens


def chunked_expectations_and_argmax(
    head: Head,
    features: Features,
    tables: Sequence[Float[Tensor, "vocab _"]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[tuple[Float[Tensor, "batch seq _"], ...], Tokens]:
    r"""$pE_1, \dots, pE_k$ and $\arg\max_v p_v$ from one chunked pass of the head.

    As `chunked_expectation_and_argmax`, with one expectation per table (each in its table's
    dtype): the head runs once per chunk whatever the number of tables, and the tables are
    never joined (no ``vocab``-sized copy).

    Examples:
        >>> head, first, second = torch.nn.Linear(3, 6), torch.randn(6, 2), torch.randn(6, 4)
        >>> features = torch.randn(2, 5, 3)
        >>> (a, b), tokens = chunked_expectations_and_argmax(head, features, [first, second])
        >>> probs = torch.softmax(head(features), -1)
        >>> torch.allclose(a, probs @ first, atol=1e-6), torch.allclose(b, probs @ second, atol=1e-6)
        (True, True)
    """
    _check_chunk_size(chunk_size)
    if features.ndim != 3:
        raise ValueError(f"features must have shape (batch, seq, dim), got {tuple(features.shape)}")
    if not tables:
        raise ValueError("pass at least one table")
    means: list[list[Tensor]] = [[] for _ in tables]
    tokens: list[Tensor] = []
    for start in range(0, features.shape[1], chunk_size):
        probs = _wide_softmax(head(features[:, start : start + chunk_size]))
        for table, pieces in zip(tables, means, strict=True):
            if probs.shape[-1] != table.shape[0]:
                raise ValueError(
                    f"the head predicts {probs.shape[-1]} entries but the table has "
                    f"{table.shape[0]} rows"
                )
            pieces.append(probs.to(table.dtype) @ table)
        tokens.append(probs.argmax(-1))
    return tuple(torch.cat(pieces, dim=1) for pieces in means), torch.cat(tokens, dim=1)


def chunked_expectation(
    head: Head,
    features: Features,
    table: Float[Tensor, "vocab width"],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint: bool = True,
) -> Float[Tensor, "batch seq width"]:
    r"""$\mathrm{sg}(p)\,E$ for $p = \mathrm{softmax}(\mathrm{head}(f_i))$, chunk by chunk, differentiable in $E$.

    The probabilities are a constant (no gradient reaches the head or the features); the
    table gets $\partial\ell/\partial E = \sum_i p_i^\top\,\partial\ell/\partial(pE)_i$, which
    needs $p$ again. With ``checkpoint=True`` (and gradients on) each chunk's probabilities are
    recomputed in the backward pass instead of stored, so no ``(batch, seq, vocab)`` tensor is
    kept for it; without, autograd keeps them all.

    Examples:
        >>> head, table = torch.nn.Linear(3, 6), torch.randn(6, 2, requires_grad=True)
        >>> features = torch.randn(2, 5, 3)
        >>> mean = chunked_expectation(head, features, table, chunk_size=2)
        >>> probs = torch.softmax(head(features), -1).detach()
        >>> torch.allclose(mean, probs @ table, atol=1e-6)
        True
        >>> (gradient,) = torch.autograd.grad(mean.sum(), table)
        >>> torch.allclose(gradient, probs.sum((0, 1))[:, None].expand(6, 2), atol=1e-6)
        True
    """
    _check_chunk_size(chunk_size)
    if features.ndim != 3:
        raise ValueError(f"features must have shape (batch, seq, dim), got {tuple(features.shape)}")

    def expectation(chunk: Tensor) -> Tensor:
        with torch.no_grad():
            probs = _wide_softmax(head(chunk))
        if probs.shape[-1] != table.shape[0]:
            raise ValueError(
                f"the head predicts {probs.shape[-1]} entries but the table has "
                f"{table.shape[0]} rows"
            )
        return probs.to(table.dtype) @ table

    return _per_chunk(expectation, features.detach(), chunk_size=chunk_size, checkpoint=checkpoint)
