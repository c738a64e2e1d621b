r"""x-prediction: a backbone's logits as a distribution over the clean token at every position.

FLM trains $\hat x_1 = \mathrm{softmax}(f_\theta(x_t, t))$ with the per-token cross-entropy
$-\log \hat x_1[x]$; the optimum is $\hat x_1 = \mathbb{E}[e_x \mid x_t]$, the quantity every
sampler and flow map needs.
"""

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from flowlm._checks import check_state, check_time, check_tokens
from flowlm._tensors import at_least_float32, broadcast_time
from flowlm._types import Logits, Probs, State, Time, TokenLoss, TokenMask, Tokens
from flowlm.embeddings import TimeEmbedding
from flowlm.network_calls import record_network_call
from flowlm.protocols import Backbone, RowSelectable


class XPredictor(nn.Module):
    r"""Wrap any backbone as an x-predictor $\hat x_1 = \mathrm{softmax}(f(x_t, t[, s]))$.

    The backbone is called as ``backbone(x_t, t)`` or, with a second time, ``backbone(x_t, t, s)``.
    Inputs are validated (times per example ``(batch,)`` or per token ``(batch, seq)`` in
    [0, 1]); the backbone must return a tensor of logits of the state's shape; the softmax
    runs in at least float32, also under autocast. Every backbone call is recorded with
    `record_network_call`, which is how `rollout` counts NFE.

    Args:
        backbone: the network; an ``nn.Module`` is registered as a submodule.

    Examples:
        >>> predictor = XPredictor(lambda x, t: torch.zeros_like(x))
        >>> predictor(torch.randn(2, 3, 4), torch.rand(2))[0, 0]
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def logits(self, x_t: State, t: Time, s: Time | None = None) -> Logits:
        """The backbone's logits, after checking the inputs and the output's type and shape."""
        check_state(x_t, name="x_t")
        check_time(t, x_t)
        if s is None:
            logits = self.backbone(x_t, t)
        else:
            check_time(s, x_t, "s")
            logits = self.backbone(x_t, t, s)
        record_network_call()
        if not isinstance(logits, Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"the backbone returned a {type(logits).__name__}, not a tensor of logits; "
                "a Hugging Face style model returns a tuple or ModelOutput: wrap it, e.g. "
                "lambda x, t: model(...).logits"
            )
        if logits.shape != x_t.shape:
            raise ValueError(
                f"vocabulary mismatch: the backbone returned logits of shape {tuple(logits.shape)} "
                f"for a state of shape {tuple(x_t.shape)}"
            )
        return logits

    def forward(self, x_t: State, t: Time, s: Time | None = None) -> Probs:
        r"""Predicted data $\hat x_1$: probabilities over the vocabulary at every position."""
        return torch.softmax(at_least_float32(self.logits(x_t, t, s)), dim=-1)

    def rows(self, index: Int[Tensor, " rows"]) -> "XPredictor":
        """This predictor for the rows ``index`` of its batch (`flowlm.RowSelectable`).

        A backbone holding inputs per row (e.g. `flowlm.WithPrevious`) keeps those rows';
        any other backbone reads none, and the predictor is returned as it is.
        """
        backbone = self.backbone
        return XPredictor(backbone.rows(index)) if isinstance(backbone, RowSelectable) else self


class _CrossEntropyKeepingLogits(torch.autograd.Function):
    r"""$\ell = \operatorname{logsumexp}(z) - z_x$ whose backward pass keeps only the logits $z$.

    The gradient $\partial\ell/\partial z = \mathrm{softmax}(z) - e_x$ is built in the one
    (batch, seq, vocab) tensor of the softmax (scaled in place, then a scatter-add at the
    token entries), so a training step holds the logits and one gradient, not also the
    log-probabilities and their gradient.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(logits, index)
        return torch.logsumexp(logits, -1) - logits.gather(-1, index).squeeze(-1)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        logits, index = ctx.saved_tensors
        weight = grad_outputs[0].unsqueeze(-1).to(logits.dtype)
        if torch.is_grad_enabled():  # create_graph=True: out of place, so twice differentiable
            return (torch.softmax(logits, -1) * weight).scatter_add(-1, index, -weight), None
        gradient = torch.softmax(logits, -1).mul_(weight)
        return gradient.scatter_add_(-1, index, -weight), None


def cross_entropy(logits: Logits, tokens: Tokens) -> TokenLoss:
    r"""Per-token cross-entropy $-\log\mathrm{softmax}(\text{logits})[x]$, in float32 or wider.

    Computed as $\operatorname{logsumexp}(z) - z_x$; the backward pass keeps only the logits
    and builds the gradient $\mathrm{softmax}(z) - e_x$ in one (batch, seq, vocab) tensor, so
    no log-probabilities are stored (with ``create_graph=True`` it is built out of place, so
    second derivatives work).

    Examples:
        >>> cross_entropy(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
        tensor([[1.3863, 1.3863]])
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} "
            "disagree on (batch, seq)"
        )
    check_tokens(tokens, logits.shape[-1])
    loss = _CrossEntropyKeepingLogits.apply(at_least_float32(logits), tokens.long().unsqueeze(-1))
    assert isinstance(loss, Tensor)
    return loss


def masked_mean(loss: TokenLoss, mask: TokenMask | None = None) -> Tensor:
    r"""Mean of a per-token loss over the tokens that count: $\sum \ell m / \sum m$.

    Examples:
        >>> masked_mean(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, False]]))
        tensor(1.)
    """
    if mask is None:
        return loss.mean()
    if mask.shape != loss.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match loss {tuple(loss.shape)}")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


class LearnedTimeWeighting(nn.Module):
    r"""Adaptive loss weighting $\ell \mapsto e^{-w(t)}\ell + w(t)$ with a learned $w$.

    $w$ is an MLP on a time embedding whose last layer starts at zero, so $w \equiv 0$ at
    init; the optimum is $w(t) = \log\mathbb{E}[\ell \mid t]$, which equalizes the loss scale
    across times.

    Examples:
        >>> weighting = LearnedTimeWeighting()
        >>> loss = torch.rand(2, 5)
        >>> torch.equal(weighting(loss, torch.rand(2)), loss)
        True
    """

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.embedding = TimeEmbedding(dim)
        last = nn.Linear(dim, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.head = nn.Sequential(nn.SiLU(), last)

    def log_weight(self, t: Time) -> Tensor:
        """$w(t)$, shaped like ``t`` (per example or per token)."""
        return self.head(self.embedding(t)).squeeze(-1)

    def forward(self, loss: TokenLoss, t: Time) -> TokenLoss:
        r"""$e^{-w(t)}\ell + w(t)$, per token."""
        check_time(t, loss)
        w = broadcast_time(self.log_weight(t), loss)
        return torch.exp(-w) * loss + w
