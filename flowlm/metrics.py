r"""Sample-quality metrics: unigram entropy, distinct n-grams and generative perplexity.

Each metric is a `torchmetrics.Metric` with a functional twin that scores one batch. The
metric accumulates over ``update`` calls (and over processes: its states synchronize under
``torch.distributed``), and ``compute`` returns the value on everything seen so far.

The paper reports generative perplexity together with entropy (its evaluation protocol,
following MDLM and Duo): a low perplexity bought by repetitive samples shows up as a low
entropy. `HuggingFaceScorer` computes both the way the paper does, on the samples decoded to
text and re-tokenized by the judge's tokenizer.
"""

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from flowlm._checks import check_tokens
from flowlm._types import TokenLoss, TokenMask, Tokens

__all__ = [
    "DistinctN",
    "GenerativePerplexity",
    "HuggingFaceScorer",
    "Scorer",
    "TokenEntropy",
    "distinct_n",
    "generative_perplexity",
    "token_entropy",
]

JudgeLoss = Float[Tensor, "batch judge_seq"]
"""A negative log-likelihood per token of the judge's own tokenization."""
JudgeMask = Bool[Tensor, "batch judge_seq"]
"""True where a judge token counts (not padding)."""
JudgeTokens = Int[Tensor, "batch judge_seq"]
"""Token ids in the judge's own tokenization."""

Scorer = Callable[[Tokens], TokenLoss | tuple[JudgeLoss, JudgeMask]]
"""Maps samples ``(batch, seq)`` to a negative log-likelihood (nats) per token.

Either one value per input token, shape ``(batch, seq)``, or a pair ``(nll, mask)`` in the
scorer's own token space, shape ``(batch, judge_seq)``, where ``mask`` marks the tokens that
count (a judge with its own tokenizer pads its rows to a common length).
"""


def _check_samples(tokens: Tensor) -> None:
    """Raise if ``tokens`` is not a non-empty (batch, seq) tensor of integer ids."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor, got {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError("samples must hold at least one token, got seq = 0")


def token_entropy(tokens: Tokens, mask: TokenMask | None = None) -> Float[Tensor, " batch"]:
    r"""Unigram entropy (nats) of each sample's own token ids.

    For a sample $x_{1:L}$ with $c_v$ counted occurrences of id $v$ among its $n$ counted
    positions (all $L$ without a mask) and $p_v = c_v / n$,

    $$H(x) = -\sum_v p_v \log p_v = \sum_v p_v \log(1 / p_v),$$

    which lies in $[0, \log \min(n, V)]$. The counts come from sorting each row, so the cost
    does not depend on the vocabulary size.

    Args:
        tokens: integer samples, one per row.
        mask: True where a token counts (padding of rows of different lengths is False).

    Returns:
        The entropy of every sample, in the default float dtype (NaN for a row in which no
        token counts).

    Raises:
        TypeError: if ``tokens`` is not an integer tensor.
        ValueError: if ``tokens`` is not 2-d or has no positions, or the mask's shape differs.

    Examples:
        >>> token_entropy(torch.tensor([[3, 3, 7, 7], [5, 5, 5, 5]]))
        tensor([0.6931, 0.0000])
        >>> token_entropy(torch.tensor([[3, 7, 0, 0]]), torch.tensor([[True, True, False, False]]))
        tensor([0.6931])
    """
    _check_samples(tokens)
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(
            f"the mask has shape {tuple(mask.shape)} but the tokens {tuple(tokens.shape)}"
        )
    sorted_tokens, order = tokens.sort(dim=1)
    starts_run = torch.ones_like(sorted_tokens, dtype=torch.bool)
    starts_run[:, 1:] = sorted_tokens[:, 1:] != sorted_tokens[:, :-1]
    run_index = starts_run.cumsum(dim=1) - 1
    dtype = torch.get_default_dtype()
    weights = (
        torch.ones(tokens.shape, dtype=dtype, device=tokens.device)
        if mask is None
        else mask.gather(1, order).to(dtype)
    )
    run_lengths = torch.zeros(tokens.shape, dtype=dtype, device=tokens.device)
    run_lengths.scatter_add_(1, run_index, weights)
    frequencies = run_lengths / weights.sum(dim=1, keepdim=True)
    return torch.xlogy(frequencies, frequencies.reciprocal()).sum(dim=1)


class TokenEntropy(Metric):
    r"""Mean over samples of the unigram entropy of each sample's own token ids.

    $$\bar H = \frac{1}{N} \sum_{i=1}^{N} H(x^{(i)}),$$

    with $H$ as in `token_entropy`. The states are the sum of entropies and the number of
    samples, both summed across processes.

    Examples:
        >>> metric = TokenEntropy()
        >>> metric.update(torch.tensor([[3, 3, 7, 7]]))
        >>> metric.update(torch.tensor([[5, 5, 5, 5]]))
        >>> metric.compute()
        tensor(0.3466)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    entropy_sum: Tensor
    sample_count: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("entropy_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("sample_count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, tokens: Tokens, mask: TokenMask | None = None) -> None:
        """Add the entropies of a batch of samples (``mask``: True where a token counts)."""
        self.entropy_sum += token_entropy(tokens, mask).sum()
        self.sample_count += tokens.shape[0]

    def compute(self) -> Float[Tensor, ""]:
        """The mean entropy over every sample seen."""
        return self.entropy_sum / self.sample_count


def _ngram_hashes(tokens: Tokens, n: int, vocab_size: int) -> Tensor:
    """Encode every n-gram of every row as one int64: its digits in base ``vocab_size``."""
    _check_samples(tokens)
    _check_hashable(n, vocab_size)
    if n > tokens.shape[1]:
        raise ValueError(f"n = {n} is larger than the sequence length {tokens.shape[1]}")
    check_tokens(tokens, vocab_size)
    windows = tokens.long().unfold(1, n, 1)
    place_values = torch.tensor(
        [vocab_size**power for power in reversed(range(n))], device=tokens.device
    )
    return (windows * place_values).sum(dim=-1).flatten()


def _check_hashable(n: int, vocab_size: int) -> None:
    """Raise unless every n-gram over the vocabulary has its own int64 code."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    if vocab_size**n - 1 > torch.iinfo(torch.int64).max:
        raise ValueError(
            f"{n}-grams over a vocabulary of {vocab_size} have {vocab_size}**{n} values, more "
            f"than an int64 code can tell apart exactly; use a smaller n"
        )


def _distinct_fraction(hashes: Tensor) -> Float[Tensor, ""]:
    """Number of distinct codes over the number of codes (NaN when there is none)."""
    distinct = torch.tensor(float(torch.unique(hashes).numel()), device=hashes.device)
    return distinct / hashes.numel()


def distinct_n(tokens: Tokens, n: int, vocab_size: int) -> Float[Tensor, ""]:
    r"""Fraction of distinct n-grams among all n-grams of a batch of samples.

    The n-grams are the contiguous windows $x_{j:j+n}$ inside each sample (none crosses a
    sample boundary), pooled over the batch:

    $$\text{distinct-}n = \frac{\left|\{\,x^{(i)}_{j:j+n}\,\}_{i,j}\right|}{B\,(L - n + 1)}.$$

    An n-gram is compared through its exact code $\sum_k x_{j+k} V^{n-1-k}$ in int64.

    Args:
        tokens: integer samples in ``[0, vocab_size)``, one per row.
        n: the n-gram length, at most the sequence length.
        vocab_size: the number of token ids $V$; $V^n$ must fit in int64.

    Returns:
        A value in $(0, 1]$: 1 when no n-gram repeats anywhere in the batch.

    Raises:
        TypeError: if ``tokens`` is not an integer tensor.
        ValueError: if ``tokens`` is not 2-d, if ``n`` is not in ``[1, seq]`` or if
            $V^n$ overflows int64.

    Examples:
        >>> tokens = torch.tensor([[1, 2, 1, 2], [2, 1, 2, 3]])
        >>> distinct_n(tokens, n=2, vocab_size=4)  # (1,2) (2,1) (2,3) among 6 bigrams
        tensor(0.5000)
    """
    return _distinct_fraction(_ngram_hashes(tokens, n, vocab_size))


class DistinctN(Metric):
    r"""Fraction of distinct n-grams among all n-grams of every sample seen.

    The same quantity as `distinct_n`, pooled over all updates (and processes): the distinct
    count is taken over the union of every batch, so it is not a sum of per-batch counts. The
    state is therefore the list of n-gram codes (concatenated across processes), and
    ``compute`` counts the distinct ones; it holds one int64 per n-gram seen.

    Args:
        vocab_size: the number of token ids $V$; $V^n$ must fit in int64.
        n: the n-gram length.

    Examples:
        >>> metric = DistinctN(vocab_size=4, n=2)
        >>> metric.update(torch.tensor([[1, 2, 1, 2]]))
        >>> metric.update(torch.tensor([[2, 1, 2, 3]]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    ngram_hashes: list[Tensor]

    def __init__(self, vocab_size: int, n: int = 2) -> None:
        super().__init__()
        _check_hashable(n, vocab_size)
        self.vocab_size = vocab_size
        self.n = n
        self.add_state("ngram_hashes", default=[], dist_reduce_fx="cat")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the n-gram codes, int64.

        torchmetrics gives a process that saw no samples an empty state of this dtype before
        gathering, so the codes of the other processes stay exact integers.
        """
        return torch.int64

    def update(self, tokens: Tokens) -> None:
        """Store the codes of the n-grams of a batch of samples."""
        self.ngram_hashes.append(_ngram_hashes(tokens, self.n, self.vocab_size))

    def compute(self) -> Float[Tensor, ""]:
        """The distinct fraction over every n-gram seen."""
        return _distinct_fraction(dim_zero_cat(self.ngram_hashes))


def _nll_sum_and_count(
    scorer: Scorer, tokens: Tokens, mask: TokenMask | None
) -> tuple[Float[Tensor, ""], Tensor]:
    """Score ``tokens`` without gradients; return the summed NLL and the number of tokens."""
    _check_samples(tokens)
    with torch.no_grad():
        scored = scorer(tokens)
    if isinstance(scored, tuple):
        nll, counted = scored
        if mask is not None:
            raise ValueError(
                "the scorer returned its own mask (its own token space), so a mask over the "
                "input tokens does not apply; drop padding before scoring (e.g. in `decode`)"
            )
        if counted.shape != nll.shape:
            raise ValueError(
                f"the scorer returned an NLL of shape {tuple(nll.shape)} with a mask of "
                f"shape {tuple(counted.shape)}"
            )
    else:
        nll = scored
        if nll.shape != tokens.shape:
            raise ValueError(
                f"the scorer returned an NLL of shape {tuple(nll.shape)} for tokens of shape "
                f"{tuple(tokens.shape)}; a scorer in another token space returns (nll, mask)"
            )
        counted = torch.ones_like(nll, dtype=torch.bool) if mask is None else mask
    return torch.where(counted, nll, 0.0).sum(), counted.sum()


def generative_perplexity(
    scorer: Scorer, tokens: Tokens, mask: TokenMask | None = None
) -> Float[Tensor, ""]:
    r"""Perplexity of samples under a judge: the exponential of the mean per-token NLL.

    $$\mathrm{PPL} = \exp\Big(\frac{\sum_{i,j} m_{ij}\,\ell_{ij}}{\sum_{i,j} m_{ij}}\Big),
    \qquad \ell_{ij} = -\log p_{\text{judge}}(y_{ij} \mid y_{i,<j}),$$

    where $m$ marks the tokens that count. The scorer runs under `torch.no_grad`. With a
    judge that re-tokenizes (such as `HuggingFaceScorer`), $y$ are the judge's tokens, so the
    mean is per judge token, not per sample token.

    Args:
        scorer: a `Scorer`, e.g. an autoregressive judge's per-token NLL or an exact
            likelihood.
        tokens: integer samples, one per row.
        mask: True where a token counts; only for a scorer that returns one NLL per input
            token.

    Returns:
        The perplexity (NaN when no token counts).

    Raises:
        ValueError: if the scorer's output does not match ``tokens`` (or its own mask), or
            if ``mask`` is given to a scorer that returns its own.

    Examples:
        >>> log_p = torch.log(torch.tensor([0.5, 0.25, 0.25]))
        >>> def iid_nll(tokens):  # every position i.i.d. with probabilities p
        ...     return -log_p[tokens]
        >>> generative_perplexity(iid_nll, torch.tensor([[0, 1]]))  # exp(1.5 log 2)
        tensor(2.8284)
    """
    nll_sum, token_count = _nll_sum_and_count(scorer, tokens, mask)
    return torch.exp(nll_sum / token_count)


class GenerativePerplexity(Metric):
    r"""Perplexity of every sample seen under a judge (see `generative_perplexity`).

    $$\mathrm{PPL} = \exp\Big(\frac{\sum \ell}{\#\text{tokens}}\Big)$$

    over every token of every update. The states are the summed NLL and the token count,
    both summed across processes, so the value equals the perplexity of all samples pooled
    (not the mean of per-batch perplexities).

    The metric uses the scorer but does not own it: the scorer is kept outside the module
    tree. Assigning an `nn.Module` judge as a plain attribute would register it as a
    submodule (what torchmetrics does, e.g. for the FID network), which puts the judge's
    weights in the metric's ``state_dict``, and in the ``parameters()`` and checkpoints of
    any model that holds the metric. So ``metric.to(device)`` moves the states only: place
    the judge yourself.

    Args:
        scorer: a `Scorer`, run under `torch.no_grad` on every update.

    Examples:
        >>> log_p = torch.log(torch.tensor([0.5, 0.25, 0.25]))
        >>> metric = GenerativePerplexity(lambda tokens: -log_p[tokens])
        >>> metric.update(torch.tensor([[0, 1]]))
        >>> metric.update(torch.tensor([[2, 0]]), mask=torch.tensor([[True, False]]))
        >>> metric.compute()  # exp((log 2 + 2 log 2 + 2 log 2) / 3)
        tensor(3.1748)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    scorer: Scorer
    nll_sum: Tensor
    token_count: Tensor

    def __init__(self, scorer: Scorer) -> None:
        super().__init__()
        # Bypass nn.Module.__setattr__ so that a judge module is not registered (see above).
        object.__setattr__(self, "scorer", scorer)
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("token_count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, tokens: Tokens, mask: TokenMask | None = None) -> None:
        """Score a batch of samples and add its NLL and token count."""
        nll_sum, token_count = _nll_sum_and_count(self.scorer, tokens, mask)
        self.nll_sum += nll_sum.to(self.device)
        self.token_count += token_count.to(self.device)

    def compute(self) -> Float[Tensor, ""]:
        """The perplexity over every token seen."""
        return torch.exp(self.nll_sum / self.token_count)


class HuggingFaceScorer:
    r"""The paper's judge: a causal language model from `transformers` (e.g. GPT-2 Large).

    Samples are decoded to text with the user's ``decode`` (e.g. a flowlm tokenizer's
    ``decode_batch``) and re-tokenized with the judge's tokenizer (`retokenize`): the judge
    scores text, whatever tokenizer produced the samples. For the NLL, each row is prefixed
    with the judge's BOS token (so that the first text token is scored too) and truncated to
    the judge's context. The NLL is per *judge* token:

    $$\ell_j = -\log p_{	ext{judge}}(y_j \mid 	ext{BOS}, y_{<j}),$$

    so a perplexity built on it counts judge tokens, not sample tokens. Rows are padded to
    the longest text and returned with a mask. `entropy` is the unigram entropy of each
    sample's judge tokens, the entropy the paper reports next to the perplexity.

    `transformers` is optional (``pip install "flowlm[hf]"``); it is imported by this
    constructor only.

    Args:
        model_name_or_path: a Hub name or a local directory for ``AutoModelForCausalLM``
            and ``AutoTokenizer``.
        decode: turns a batch of sample tokens into one string per sample.
        device: where the judge runs.

    Raises:
        ImportError: if `transformers` is not installed.
        OSError: if the judge's files are neither local nor downloadable (say, offline).
        ValueError: if the judge's tokenizer has no BOS token.

    Examples:
        >>> from flowlm.data import CharTokenizer
        >>> tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
        >>> tokenizer.decode_batch(torch.tensor([[7, 8]]))
        ['hi']
        >>> judge = HuggingFaceScorer("gpt2-large", tokenizer.decode_batch)  # doctest: +SKIP
        >>> samples = torch.randint(27, (4, 64))
        >>> generative_perplexity(judge, samples), judge.entropy(samples)  # doctest: +SKIP
    """

    def __init__(
        self,
        model_name_or_path: str,
        decode: Callable[[Tokens], list[str]],
        device: str | torch.device = "cpu",
    ) -> None:
        try:
            transformers = importlib.import_module("transformers")
        except ImportError as missing:
            raise ImportError(
                "HuggingFaceScorer needs the `transformers` package, an optional dependency "
                'of flowlm: run `pip install "flowlm[hf]"` (or `pip install transformers`)'
            ) from missing
        self.decode = decode
        self.device = torch.device(device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_name_or_path)
            model = transformers.AutoModelForCausalLM.from_pretrained(model_name_or_path)
        except OSError as error:
            raise OSError(
                f"could not load the judge {model_name_or_path!r}: its files are not in a "
                f"local folder or the Hugging Face cache, and the Hub did not provide them "
                f"(offline?). Cause: {error}"
            ) from error
        if self.tokenizer.bos_token_id is None:
            raise ValueError(f"the tokenizer of {model_name_or_path!r} has no BOS token")
        self.model = model.to(self.device).eval()

    def retokenize(self, tokens: Tokens) -> tuple[JudgeTokens, JudgeMask]:
        """The judge's token ids of the decoded samples, right-padded, with the mask of ids.

        No special token is added and rows are not truncated; padding positions hold the
        BOS id and are False in the mask. On the judge's device.
        """
        texts = self.decode(tokens)
        if len(texts) != tokens.shape[0]:
            raise ValueError(f"decode returned {len(texts)} texts for {tokens.shape[0]} samples")
        text_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        rows = [torch.tensor(ids, dtype=torch.long) for ids in text_ids]
        lengths = torch.tensor([len(ids) for ids in text_ids])
        width = max(1, int(lengths.max()))
        ids = torch.full((len(rows), width), self.tokenizer.bos_token_id, dtype=torch.long)
        for row, row_ids in enumerate(rows):
            ids[row, : row_ids.numel()] = row_ids
        mask = torch.arange(width) < lengths[:, None]
        return ids.to(self.device), mask.to(self.device)

    def entropy(self, tokens: Tokens) -> Float[Tensor, " batch"]:
        """Unigram entropy (nats) of each sample's judge tokens (`token_entropy` of them).

        NaN for a sample whose text is empty.
        """
        return token_entropy(*self.retokenize(tokens))

    def __call__(self, tokens: Tokens) -> tuple[JudgeLoss, JudgeMask]:
        """Per-judge-token NLL of the decoded samples, padded, with the mask of real tokens."""
        text_ids, text_mask = self.retokenize(tokens)
        max_text_tokens = self.model.config.max_position_embeddings - 1
        bos = torch.full_like(text_ids[:, :1], self.tokenizer.bos_token_id)
        input_ids = torch.cat([bos, text_ids[:, :max_text_tokens]], dim=1)
        attention_mask = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask], dim=1)
        attention_mask = attention_mask[:, : input_ids.shape[1]]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask.long()).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
        )
        return nll, attention_mask[:, 1:]
