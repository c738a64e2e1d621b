"""Context: validation, per-token times, exact one-hot imposition, and the training samplers.

The samplers are checked against their exact laws by Monte Carlo: a prefix length uniform on
{0, ..., L-1}; a Bernoulli context with r ~ U[0, 1] has a number of known positions uniform
on {0, ..., L} (Beta(1, 1)-binomial); spans change from known to unknown between neighbours
with probability E[2r(1 - r)]/mean_span = 1/(3 mean_span).
"""

import jaxtyping
import pytest
import torch
from jaxtyping import TypeCheckError

import flowlm as fl
from flowlm import Context, bernoulli_context, prefix_context, span_context
from flowlm.data import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLERS = [prefix_context, bernoulli_context, span_context]
ROWS = 40_000


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_times_are_one_on_known_positions_per_example_and_per_token() -> None:
    known = torch.tensor([[True, False, False], [False, True, True]])
    context = Context(torch.zeros(2, 3, dtype=torch.long), known)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    per_example = context.times(t)
    assert per_example.dtype == torch.float64
    assert torch.equal(
        per_example, torch.tensor([[1.0, 0.25, 0.25], [0.5, 1.0, 1.0]], dtype=torch.float64)
    )
    per_token = torch.rand(2, 3)
    assert torch.equal(context.times(per_token), torch.where(known, 1.0, per_token))


@pytest.mark.parametrize("shape", [(3,), (2, 4), (2, 3, 1), (1, 3)])
def test_times_of_the_wrong_shape_are_an_error(checks: str, shape: tuple[int, ...]) -> None:
    context = Context.none(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises((ValueError, TypeCheckError) if checks == "jaxtyping" else ValueError):
        context.times(torch.rand(shape))
    jaxtyping.config.update("jaxtyping_disable", True)
    with pytest.raises(ValueError, match="do not fit"):
        context.times(torch.rand(shape))


def test_impose_writes_exact_one_hots_and_leaves_the_rest() -> None:
    tokens = torch.tensor([[3, 1, 0, 2]])
    known = torch.tensor([[True, False, True, False]])
    x = torch.randn(1, 4, 5, dtype=torch.float64)
    imposed = Context(tokens, known).impose(x)
    assert torch.equal(imposed[known], fl.one_hot(tokens, 5, torch.float64)[known])
    assert torch.equal(imposed[~known], x[~known])
    assert imposed.dtype == torch.float64


def test_impose_rejects_a_state_of_another_shape() -> None:
    context = Context.prefix(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="does not fit a context"):
        context.impose(torch.zeros(2, 4, 5))


def test_impose_checks_the_token_range() -> None:
    context = Context.prefix(torch.tensor([[7, 0]]), 1)
    with pytest.raises(RuntimeError, match="out of range"):
        context.impose(torch.zeros(1, 2, 5))


@pytest.mark.parametrize(
    ("tokens", "known", "error"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), TypeError),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), TypeError),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool), ValueError),
        (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool), ValueError),
    ],
)
def test_bad_contexts_name_the_problem(
    checks: str, tokens: torch.Tensor, known: torch.Tensor, error: type[Exception]
) -> None:
    expected = (error, TypeCheckError) if checks == "jaxtyping" else error
    with pytest.raises(expected):
        Context(tokens, known)


def test_prefix_and_none_constructors() -> None:
    tokens = torch.arange(6).view(2, 3)
    assert torch.equal(Context.prefix(tokens, 2).known, torch.tensor([[1, 1, 0], [1, 1, 0]]).bool())
    assert not Context.none(tokens).known.any()
    assert torch.equal(Context.prefix(tokens, 2).unknown, ~Context.prefix(tokens, 2).known)
    with pytest.raises(ValueError, match="prefix length"):
        Context.prefix(tokens, 4)


def test_contexts_are_frozen() -> None:
    context = Context.none(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(AttributeError):
        context.known = torch.ones(1, 2, dtype=torch.bool)  # type: ignore[misc]


def test_prefix_lengths_are_uniform_and_leave_one_position() -> None:
    seq = 5
    known = prefix_context(torch.zeros(ROWS, seq, dtype=torch.long), generator=generator()).known
    lengths = known.sum(1)
    assert torch.equal(known, torch.arange(seq) < lengths[:, None])  # a prefix per row
    frequencies = torch.bincount(lengths, minlength=seq + 1).double() / ROWS
    assert frequencies[seq] == 0
    assert torch.allclose(
        frequencies[:seq], torch.full((seq,), 1 / seq, dtype=torch.float64), atol=0.01
    )


def test_bernoulli_counts_are_uniform_as_for_a_uniform_rate() -> None:
    seq = 4
    known = bernoulli_context(torch.zeros(ROWS, seq, dtype=torch.long), generator=generator()).known
    frequencies = torch.bincount(known.sum(1), minlength=seq + 1).double() / ROWS
    expected = torch.full((seq + 1,), 1 / (seq + 1), dtype=torch.float64)
    assert torch.allclose(frequencies, expected, atol=0.01)


@pytest.mark.parametrize("mean_span", [1.0, 2.0, 4.0])
def test_spans_change_with_the_expected_probability(mean_span: float) -> None:
    tokens = torch.zeros(ROWS, 12, dtype=torch.long)
    known = span_context(tokens, mean_span=mean_span, generator=generator()).known
    changes = (known[:, 1:] != known[:, :-1]).double().mean().item()
    assert changes == pytest.approx(1 / (3 * mean_span), abs=0.006)
    assert known.double().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_p_uncond_drops_whole_rows(sampler) -> None:
    seq, p = 4, 0.3
    tokens = torch.zeros(ROWS, seq, dtype=torch.long)
    empty = (~sampler(tokens, p_uncond=p, generator=generator()).known.any(1)).double().mean()
    baseline = (~sampler(tokens, generator=generator()).known.any(1)).double().mean()
    assert empty.item() == pytest.approx(p + (1 - p) * baseline.item(), abs=0.01)
    assert not sampler(tokens[:100], p_uncond=1.0, generator=generator()).known.any()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_are_reproducible_and_keep_the_tokens(sampler) -> None:
    tokens = torch.randint(9, (16, 10), generator=generator(1))
    first, second = sampler(tokens, generator=generator(3)), sampler(tokens, generator=generator(3))
    assert torch.equal(first.known, second.known)
    assert first.tokens is tokens
    assert first.known.device == tokens.device


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_reject_a_bad_p_uncond(sampler) -> None:
    with pytest.raises(ValueError, match="p_uncond"):
        sampler(torch.zeros(2, 3, dtype=torch.long), p_uncond=1.5)


def test_spans_reject_a_mean_below_one() -> None:
    with pytest.raises(ValueError, match="mean_span"):
        span_context(torch.zeros(2, 3, dtype=torch.long), mean_span=0.5)


def test_templates_know_the_text_and_generate_the_holes_and_the_rest() -> None:
    tokenizer = CharTokenizer("abc ")
    context = Context.from_template("ab __c", tokenizer.encode, 8, batch_size=3)
    assert context.tokens.shape == context.known.shape == (3, 8)
    expected_known = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0]).bool()
    assert torch.equal(context.known, expected_known.expand(3, 8))
    assert tokenizer.decode(context.tokens[0, context.known[0]]) == "ab c"


def test_a_template_encodes_each_piece_with_any_tokenizer() -> None:
    def two_per_character(text: str) -> list[int]:  # e.g. a byte-level tokenizer
        return [i for char in text for i in (ord(char) % 5, 4)]

    context = Context.from_template("a_b", two_per_character, 6)
    assert context.known[0].tolist() == [True, True, False, True, True, False]
    assert context.tokens[0, :2].tolist() == two_per_character("a")


def test_templates_that_do_not_fit_are_an_error() -> None:
    encode = CharTokenizer("ab").encode
    with pytest.raises(ValueError, match="takes 5 positions but sequences have 4"):
        Context.from_template("ab__a", encode, 4)
    with pytest.raises(ValueError, match="not in the tokenizer's alphabet"):
        Context.from_template("abz", encode, 4)
    with pytest.raises(ValueError, match="one character"):
        Context.from_template("ab", encode, 4, hole="__")


def test_a_lifted_context_imposes_on_both_halves_and_reads_the_state_half() -> None:
    tokens = torch.tensor([[3, 1, 0, 2]])
    known = torch.tensor([[True, False, True, False]])
    x, previous = torch.randn(1, 4, 5, dtype=torch.float64), torch.rand(1, 4, 5).double()
    context = Context(tokens, known).lift()
    assert context.lifted and not Context(tokens, known).lifted
    imposed = fl.split_state(context.impose(fl.lift_state(x, previous)))
    assert torch.equal(imposed.x, Context(tokens, known).impose(x))
    assert torch.equal(imposed.previous, Context(tokens, known).impose(previous))
    lifted = fl.lift_state(x, previous)
    assert torch.equal(context.state(lifted), x)
    assert torch.equal(context.with_state(lifted, context.state(lifted)), lifted)
    plain = Context(tokens, known)
    assert plain.state(x) is x and plain.with_state(x, previous) is previous


def test_a_lifted_context_refuses_a_state_that_is_not_lifted(checks: str) -> None:
    context = Context.none(torch.zeros(1, 2, dtype=torch.long)).lift()
    with pytest.raises(ValueError, match="a lifted state has 2 \\* vocab entries"):
        context.impose(torch.zeros(1, 2, 5))
