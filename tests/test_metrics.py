import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jaxtyping
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from flowlm.metrics import (
    DistinctN,
    GenerativePerplexity,
    HuggingFaceScorer,
    TokenEntropy,
    distinct_n,
    generative_perplexity,
    token_entropy,
)

# ---------------------------------------------------------------------------------------------
# numpy references, written from the definitions


def entropy_reference(tokens: np.ndarray) -> np.ndarray:
    entropies = []
    for row in tokens:
        _, counts = np.unique(row, return_counts=True)
        p = counts / len(row)
        entropies.append(-(p * np.log(p)).sum())
    return np.array(entropies)


def distinct_reference(tokens: np.ndarray, n: int) -> float:
    ngrams = [tuple(row[j : j + n]) for row in tokens for j in range(len(row) - n + 1)]
    return len(set(ngrams)) / len(ngrams)


class IIDScorer(nn.Module):
    """Exact likelihood of an i.i.d. categorical: the NLL of a token is -log p[token]."""

    def __init__(self, probs: Tensor) -> None:
        super().__init__()
        self.log_probs = nn.Parameter(probs.log())

    def forward(self, tokens: Tensor) -> Tensor:
        return -self.log_probs[tokens]


PROBS = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)


@st.composite
def token_batches(draw: st.DrawFn, min_seq: int = 1) -> np.ndarray:
    vocab = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 5))
    seq = draw(st.integers(min_seq, 12))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=batch * seq, max_size=batch * seq))
    return np.array(ids, dtype=np.int64).reshape(batch, seq)


@pytest.fixture
def without_runtime_shape_checks() -> Iterator[None]:
    """What users see by default: flowlm's own errors, not the test suite's jaxtyping checks."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


# ---------------------------------------------------------------------------------------------
# token entropy


@settings(deadline=None)
@given(token_batches())
def test_token_entropy_matches_reference(tokens: np.ndarray) -> None:
    torch.testing.assert_close(
        token_entropy(torch.from_numpy(tokens)).double(),
        torch.from_numpy(entropy_reference(tokens)),
        atol=1e-6,
        rtol=1e-6,
    )


@settings(deadline=None)
@given(token_batches(), st.data())
def test_masked_token_entropy_is_the_entropy_of_the_counted_tokens(
    tokens: np.ndarray, data: st.DataObject
) -> None:
    keep = np.array(
        data.draw(st.lists(st.booleans(), min_size=tokens.size, max_size=tokens.size))
    ).reshape(tokens.shape)
    keep[:, 0] = True  # every row counts at least one token
    expected = np.array(
        [entropy_reference(row[kept][None])[0] for row, kept in zip(tokens, keep, strict=True)]
    )
    masked = token_entropy(torch.from_numpy(tokens), torch.from_numpy(keep))
    torch.testing.assert_close(masked.double(), torch.from_numpy(expected), atol=1e-6, rtol=1e-6)
    metric = TokenEntropy()
    metric.update(torch.from_numpy(tokens), torch.from_numpy(keep))
    assert metric.compute().item() == pytest.approx(expected.mean(), abs=1e-6)


@pytest.mark.usefixtures("without_runtime_shape_checks")
def test_masked_token_entropy_rejects_a_mask_of_another_shape() -> None:
    tokens = torch.tensor([[1, 2, 2], [4, 4, 4]])
    with pytest.raises(ValueError, match=r"the mask has shape \(2, 2\) but the tokens \(2, 3\)"):
        token_entropy(tokens, torch.ones(2, 2, dtype=torch.bool))


def test_masked_token_entropy_of_an_empty_row_is_nan() -> None:
    tokens = torch.tensor([[1, 2, 2], [4, 4, 4]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    entropy = token_entropy(tokens, mask)
    assert entropy[0].item() == pytest.approx(math.log(3) - 2 / 3 * math.log(2))
    assert math.isnan(entropy[1].item())


def test_token_entropy_extremes() -> None:
    constant = torch.full((2, 9), 4)
    all_distinct = torch.arange(16).reshape(1, 16)
    assert torch.equal(token_entropy(constant), torch.zeros(2))
    assert token_entropy(all_distinct).item() == pytest.approx(math.log(16))


def test_token_entropy_ignores_order_and_relabelling() -> None:
    tokens = torch.tensor([[5, 1, 5, 2, 2, 2, 9]])
    permuted = tokens[:, torch.randperm(7)]
    relabelled = (tokens * 7 + 3) % 101
    torch.testing.assert_close(token_entropy(permuted), token_entropy(tokens))
    torch.testing.assert_close(token_entropy(relabelled), token_entropy(tokens))


@settings(deadline=None)
@given(token_batches(), st.integers(1, 3))
def test_token_entropy_metric_equals_functional_on_all_chunks(
    tokens: np.ndarray, chunk_size: int
) -> None:
    all_tokens = torch.from_numpy(tokens)
    metric = TokenEntropy()
    for part in all_tokens.split(chunk_size):
        metric.update(part)
    torch.testing.assert_close(metric.compute(), token_entropy(all_tokens).mean())


# ---------------------------------------------------------------------------------------------
# distinct n-grams


@settings(deadline=None)
@given(token_batches(), st.integers(1, 4))
def test_distinct_n_matches_reference(tokens: np.ndarray, n: int) -> None:
    n = min(n, tokens.shape[1])
    value = distinct_n(torch.from_numpy(tokens), n, vocab_size=6)
    assert value.item() == pytest.approx(distinct_reference(tokens, n), abs=1e-6)


@settings(deadline=None)
@given(token_batches(), st.integers(1, 3), st.integers(1, 3))
def test_distinct_n_metric_equals_functional_on_all_chunks(
    tokens: np.ndarray, n: int, chunk_size: int
) -> None:
    n = min(n, tokens.shape[1])
    all_tokens = torch.from_numpy(tokens)
    metric = DistinctN(vocab_size=6, n=n)
    for part in all_tokens.split(chunk_size):
        metric.update(part)
    torch.testing.assert_close(metric.compute(), distinct_n(all_tokens, n, vocab_size=6))


def test_distinct_n_pools_over_updates() -> None:
    # Each batch alone has no repeated bigram; together every bigram appears twice.
    metric = DistinctN(vocab_size=3, n=2)
    metric.update(torch.tensor([[0, 1, 2]]))
    metric.update(torch.tensor([[0, 1, 2]]))
    assert metric.compute().item() == pytest.approx(0.5)


def test_distinct_n_hash_is_exact_near_the_int64_limit() -> None:
    vocab_size = 2**21 - 1  # vocab_size**3 < 2**63
    top = vocab_size - 1
    tokens = torch.tensor([[top, top, top - 1], [top, top - 1, top], [top, top, top - 1]])
    assert distinct_n(tokens, 3, vocab_size).item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# generative perplexity


@settings(deadline=None)
@given(token_batches(), st.integers(1, 3))
def test_generative_perplexity_with_exact_scorer_is_closed_form(
    tokens: np.ndarray, chunk_size: int
) -> None:
    probs = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    scorer = IIDScorer(torch.from_numpy(probs))
    # PPL = prod_v p_v^(-c_v / N) for the counts c_v of each id over the whole batch.
    counts = np.bincount(tokens.ravel(), minlength=len(probs))
    closed_form = float(np.prod(probs ** (-counts / counts.sum())))
    all_tokens = torch.from_numpy(tokens)
    metric = GenerativePerplexity(scorer)
    for part in all_tokens.split(chunk_size):
        metric.update(part)
    assert generative_perplexity(scorer, all_tokens).item() == pytest.approx(closed_form)
    assert metric.compute().item() == pytest.approx(closed_form, rel=1e-5)


def test_generative_perplexity_of_own_samples_approaches_exp_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(PROBS, 64 * 256, replacement=True, generator=generator)
    ppl = generative_perplexity(IIDScorer(PROBS), samples.reshape(64, 256))
    entropy = -(PROBS * PROBS.log()).sum()
    assert ppl.item() == pytest.approx(entropy.exp().item(), rel=0.02)


def test_generative_perplexity_mask_drops_padding_even_where_nll_is_infinite() -> None:
    probs = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)  # id 2 is padding: NLL = inf
    tokens = torch.tensor([[0, 1, 2], [1, 2, 2]])
    mask = tokens != 2
    assert generative_perplexity(IIDScorer(probs), tokens, mask).item() == pytest.approx(2.0)
    metric = GenerativePerplexity(IIDScorer(probs))
    metric.update(tokens, mask)
    assert metric.compute().item() == pytest.approx(2.0)
    assert math.isinf(generative_perplexity(IIDScorer(probs), tokens).item())


def test_generative_perplexity_accepts_a_scorer_with_its_own_token_space() -> None:
    def judge(tokens: Tensor) -> tuple[Tensor, Tensor]:
        # Two judge tokens per sample token; the last judge position of row 0 is padding.
        nll = torch.full((tokens.shape[0], 2 * tokens.shape[1]), math.log(3.0))
        nll[0, -1] = 100.0
        counted = torch.ones_like(nll, dtype=torch.bool)
        counted[0, -1] = False
        return nll, counted

    tokens = torch.zeros(2, 3, dtype=torch.long)
    assert generative_perplexity(judge, tokens).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="its own mask"):
        generative_perplexity(judge, tokens, torch.ones(2, 3, dtype=torch.bool))


def test_scorer_runs_without_gradients_and_stays_outside_the_metric() -> None:
    calls: list[bool] = []

    class RecordingScorer(IIDScorer):
        def forward(self, tokens: Tensor) -> Tensor:
            calls.append(torch.is_grad_enabled())
            return super().forward(tokens)

    scorer = RecordingScorer(PROBS)
    metric = GenerativePerplexity(scorer)
    holder = nn.ModuleDict({"metric": metric})
    metric.update(torch.tensor([[0, 1, 3]]))
    generative_perplexity(scorer, torch.tensor([[0, 1, 3]]))
    assert calls == [False, False]
    assert scorer.log_probs.grad is None
    assert metric.scorer is scorer
    assert list(metric.parameters()) == []
    assert list(holder.parameters()) == []
    assert list(metric.state_dict()) == []


def test_generative_perplexity_rejects_mismatched_scorer_output() -> None:
    with pytest.raises(ValueError, match="another token space"):
        generative_perplexity(lambda tokens: torch.zeros(2, 5), torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.usefixtures("without_runtime_shape_checks")
@pytest.mark.parametrize(
    "call",
    [
        lambda tokens: token_entropy(tokens),
        lambda tokens: distinct_n(tokens, 1, vocab_size=4),
        lambda tokens: generative_perplexity(IIDScorer(PROBS), tokens),
        lambda tokens: TokenEntropy().update(tokens),
    ],
)
def test_clear_errors_for_bad_tokens(call: Callable[[Tensor], object]) -> None:
    with pytest.raises(TypeError, match=r"integer tensor, got torch\.float32"):
        call(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\), got \(3,\)"):
        call(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        call(torch.zeros(2, 0, dtype=torch.long))


def test_bad_tokens_also_fail_the_runtime_shape_checks() -> None:
    with pytest.raises(TypeError):
        token_entropy(torch.zeros(2, 3))
    with pytest.raises(TypeError):
        token_entropy(torch.zeros(3, dtype=torch.long))


def test_clear_errors_for_n() -> None:
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="n = 4 is larger than the sequence length 3"):
        distinct_n(tokens, 4, vocab_size=2)
    with pytest.raises(ValueError, match="n = 4 is larger than the sequence length 3"):
        DistinctN(vocab_size=2, n=4).update(tokens)
    with pytest.raises(ValueError, match="at least 1"):
        DistinctN(vocab_size=2, n=0)
    with pytest.raises(ValueError, match="more than an int64 code"):
        DistinctN(vocab_size=50257, n=5)


def test_distinct_n_rejects_ids_outside_the_vocabulary() -> None:
    with pytest.raises(RuntimeError, match="out of range"):
        distinct_n(torch.tensor([[0, 7]]), 1, vocab_size=4)


# ---------------------------------------------------------------------------------------------
# distributed: two gloo processes, each with its own shard


SHARD_SIZES = (3, 5)  # uneven on purpose: the n-gram codes are gathered with padding


def all_samples() -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.multinomial(PROBS, sum(SHARD_SIZES) * 6, True, generator=generator).reshape(-1, 6)


def compute_all(shards: list[Tensor]) -> dict[str, float]:
    metrics = {
        "entropy": TokenEntropy(),
        "distinct": DistinctN(vocab_size=4, n=2),
        "perplexity": GenerativePerplexity(IIDScorer(PROBS)),
    }
    for shard in shards:
        for metric in metrics.values():
            metric.update(shard)
    return {name: metric.compute().item() for name, metric in metrics.items()}


def distributed_worker(rank: int, store: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        shards = all_samples().split(SHARD_SIZES)
        values = {
            "uneven shards": compute_all([shards[rank]]),
            # torchmetrics gives a process without samples an empty state of `metric.dtype`
            "rank 1 without samples": compute_all([all_samples()] if rank == 0 else []),
        }
        torch.save(values, Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_states_synchronize_across_two_processes(tmp_path: Path) -> None:
    mp.spawn(distributed_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    expected = compute_all([all_samples()])
    for rank in range(2):
        for split, values in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert values == pytest.approx(expected, rel=1e-6), (rank, split)


# ---------------------------------------------------------------------------------------------
# the transformers adaptor


def test_huggingface_scorer_explains_a_missing_transformers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        HuggingFaceScorer("gpt2", lambda tokens: [])


def test_huggingface_scorer_scores_judge_tokens(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<bos>": 0, "<unk>": 1, "a": 2, "b": 3, "c": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(tmp_path)
    config = transformers.GPT2Config(vocab_size=5, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)

    def decode(tokens: Tensor) -> list[str]:  # id 3 is our padding: decoded to nothing
        return [" ".join("abc"[int(i)] for i in row if i != 3) for row in tokens]

    scorer = HuggingFaceScorer(str(tmp_path), decode)
    tokens = torch.tensor([[0, 1, 2, 0], [2, 3, 3, 3]])
    nll, counted = scorer(tokens)
    assert counted.tolist() == [[True] * 4, [True, False, False, False]]

    judge_ids = torch.tensor([[0, 2, 3, 4, 2], [0, 4, 0, 0, 0]])
    with torch.no_grad():
        log_probs = scorer.model(judge_ids).logits.log_softmax(-1)
    expected = -log_probs[:, :-1].gather(-1, judge_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(nll[counted], expected[counted], atol=1e-5, rtol=1e-5)
    metric = GenerativePerplexity(scorer)
    metric.update(tokens)
    torch.testing.assert_close(metric.compute(), expected[counted].mean().exp())
