"""HuggingFaceScorer end to end on a tiny random GPT-2 saved to a folder (nothing downloaded).

The reference is computed by hand: each decoded text re-tokenized by the judge's own
``tokenizer.json`` (through ``tokenizers``, not ``transformers``), scored one unpadded row at a
time from the model's logits, the unigram entropy counted with a ``Counter``.
"""

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from flowlm.data import CharTokenizer, SubwordTokenizer, train_bpe
from flowlm.metrics import (
    GenerativePerplexity,
    HuggingFaceScorer,
    TokenEntropy,
    generative_perplexity,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CONTEXT = 24  # judge positions: BOS + at most 23 text tokens
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "the the the the",
    "And the evening and the morning were the first day, and the second, and the third.",
    "Amen.",
]
JUDGE_TRAINING_TEXT = " ".join(TEXTS) * 3


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style byte-level BPE and a randomly initialised 2-layer GPT-2, saved."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([JUDGE_TRAINING_TEXT], trainer=trainer)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    ).save_pretrained(folder)
    config = transformers.GPT2Config(
        vocab_size=backend.get_vocab_size(), n_positions=CONTEXT, n_embd=16, n_layer=2, n_head=2
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.from_text("".join(TEXTS), specials=("<pad>",))


def padded_samples(tokenizer: CharTokenizer | SubwordTokenizer, texts: list[str]) -> torch.Tensor:
    """Samples as a flowlm model would give them: ids padded to a common length."""
    encoded = tokenizer.encode_batch(texts)
    assert tokenizer.pad_id is not None
    samples = torch.full((len(texts), max(ids.numel() for ids in encoded) + 2), tokenizer.pad_id)
    for row, ids in enumerate(encoded):
        samples[row, : ids.numel()] = ids
    return samples


def reference(judge_folder: Path, texts: list[str]) -> tuple[float, list[float]]:
    """PPL over all judge tokens and each text's entropy, one unpadded row at a time."""
    judge_tokenizer = tokenizers.Tokenizer.from_file(str(judge_folder / "tokenizer.json"))
    bos = judge_tokenizer.token_to_id("<|endoftext|>")
    model = transformers.GPT2LMHeadModel.from_pretrained(judge_folder).eval()
    nll_sum, count, entropies = 0.0, 0, []
    for text in texts:
        ids = judge_tokenizer.encode(text, add_special_tokens=False).ids
        frequencies = [c / len(ids) for c in Counter(ids).values()]
        entropies.append(-sum(p * math.log(p) for p in frequencies))
        row = torch.tensor([bos, *ids][:CONTEXT])
        with torch.no_grad():
            log_probs = model(row[None]).logits[0].double().log_softmax(-1)
        for position in range(len(row) - 1):
            nll_sum -= log_probs[position, row[position + 1]].item()
            count += 1
    return math.exp(nll_sum / count), entropies


def test_the_reference_truncates_one_text_to_the_context(judge_folder: Path) -> None:
    judge_tokenizer = tokenizers.Tokenizer.from_file(str(judge_folder / "tokenizer.json"))
    lengths = [len(judge_tokenizer.encode(text).ids) for text in TEXTS]
    assert max(lengths) > CONTEXT - 1 > min(lengths)  # both cases are exercised


def test_perplexity_and_entropy_match_the_reference(
    judge_folder: Path, char_tokenizer: CharTokenizer
) -> None:
    samples = padded_samples(char_tokenizer, TEXTS)
    assert char_tokenizer.decode_batch(samples) == TEXTS
    judge = HuggingFaceScorer(str(judge_folder), char_tokenizer.decode_batch)
    expected_ppl, expected_entropies = reference(judge_folder, TEXTS)

    assert generative_perplexity(judge, samples).item() == pytest.approx(expected_ppl, rel=1e-5)
    metric = GenerativePerplexity(judge)
    metric.update(samples[:2])
    metric.update(samples[2:])
    assert metric.compute().item() == pytest.approx(expected_ppl, rel=1e-5)

    torch.testing.assert_close(
        judge.entropy(samples).double(), torch.tensor(expected_entropies, dtype=torch.float64)
    )
    entropy = TokenEntropy()
    entropy.update(*judge.retokenize(samples))
    assert entropy.compute().item() == pytest.approx(sum(expected_entropies) / len(TEXTS))


def test_the_judge_sees_text_whatever_tokenizer_made_the_samples(
    judge_folder: Path, char_tokenizer: CharTokenizer
) -> None:
    bpe = train_bpe(TEXTS, 300)  # the samples' tokenizer, different from the judge's
    char_samples = padded_samples(char_tokenizer, TEXTS)
    bpe_samples = padded_samples(bpe, TEXTS)
    assert bpe_samples.shape[1] < char_samples.shape[1]
    by_char = HuggingFaceScorer(str(judge_folder), char_tokenizer.decode_batch)
    by_bpe = HuggingFaceScorer(str(judge_folder), bpe.decode_batch)
    torch.testing.assert_close(
        generative_perplexity(by_bpe, bpe_samples), generative_perplexity(by_char, char_samples)
    )
    torch.testing.assert_close(by_bpe.entropy(bpe_samples), by_char.entropy(char_samples))
    ids, mask = by_bpe.retokenize(bpe_samples)
    assert torch.equal(ids[mask], by_char.retokenize(char_samples)[0][mask])


def test_an_empty_text_has_no_entropy_and_no_tokens(
    judge_folder: Path, char_tokenizer: CharTokenizer
) -> None:
    samples = padded_samples(char_tokenizer, ["Amen.", "Amen."])
    samples[1] = char_tokenizer.pad_id  # decodes to ""
    judge = HuggingFaceScorer(str(judge_folder), char_tokenizer.decode_batch)
    entropies = judge.entropy(samples)
    assert math.isnan(entropies[1].item()) and not math.isnan(entropies[0].item())
    _, counted = judge(samples)
    assert counted[1].sum().item() == 0
    expected_ppl, _ = reference(judge_folder, ["Amen."])
    assert generative_perplexity(judge, samples).item() == pytest.approx(expected_ppl, rel=1e-5)


def test_an_unavailable_judge_raises_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="could not load the judge 'gpt2-large'"):
        HuggingFaceScorer("gpt2-large", lambda tokens: [])


def test_decode_must_return_one_text_per_sample(judge_folder: Path) -> None:
    judge = HuggingFaceScorer(str(judge_folder), lambda tokens: ["only one"])
    with pytest.raises(ValueError, match="decode returned 1 texts for 2 samples"):
        judge.retokenize(torch.zeros(2, 3, dtype=torch.long))
