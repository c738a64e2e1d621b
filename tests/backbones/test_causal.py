import pytest
import torch

from flowlm.backbones import CausalTransformer, KVCache

V, B, L = 7, 3, 6


def tiny(dtype: torch.dtype = torch.float32) -> CausalTransformer:
    torch.manual_seed(0)
    return CausalTransformer(V, dim=32, depth=2, heads=4, max_len=16).to(dtype).eval()


def test_forward_shape_and_causality():
    model = tiny(torch.float64)
    tokens = torch.randint(V, (B, L))
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % V
    logits, logits_changed = model(tokens), model(changed)
    assert logits.shape == (B, L, V)
    # position i sees tokens[:i]: changing token 3 leaves positions 0..3 untouched.
    torch.testing.assert_close(logits[:, :4], logits_changed[:, :4], atol=1e-12, rtol=0)
    assert not torch.allclose(logits[:, 4:], logits_changed[:, 4:])


def test_cached_logits_equal_recomputed_logits():
    model = tiny(torch.float64)
    tokens = torch.randint(V, (B, L))
    inputs = torch.cat([torch.full((B, 1), V), tokens[:, :-1]], dim=1)
    caches = [KVCache() for _ in model.blocks]
    cached = torch.cat([model.next_token_logits(inputs[:, [i]], caches) for i in range(L)], dim=1)
    torch.testing.assert_close(cached, model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_generation_equals_recomputation(temperature: float):
    model = tiny(torch.float64)
    samples = [
        model.generate(
            B,
            L,
            temperature=temperature,
            generator=torch.Generator().manual_seed(1),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert samples[0].shape == (B, L)
    assert samples[0].dtype == torch.long
    assert ((samples[0] >= 0) & (samples[0] < V)).all()
    assert torch.equal(samples[0], samples[1])


def test_token_nll_is_cross_entropy():
    model = tiny(torch.float64)
    tokens = torch.randint(V, (B, L))
    log_probs = model(tokens).log_softmax(-1)
    manual = -log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    nll = model.token_nll(tokens)
    assert nll.shape == (B, L)
    torch.testing.assert_close(nll, manual, atol=1e-12, rtol=0)


def test_token_nll_is_fp32_for_low_precision():
    model = tiny(torch.bfloat16)
    assert model.token_nll(torch.randint(V, (B, L))).dtype == torch.float32


def test_gradients_flow():
    model = tiny().train()
    model.token_nll(torch.randint(V, (B, L))).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_too_long_sequences_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(V, (B, 17)))
    with pytest.raises(ValueError, match="max_len"):
        model.generate(B, 17)


def test_non_positive_temperature_rejected():
    with pytest.raises(ValueError, match="temperature"):
        tiny().generate(B, L, temperature=0.0)
