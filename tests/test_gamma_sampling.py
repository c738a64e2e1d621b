"""γ-sampling: the renoising rule keeps the path's marginal, exactly and by Monte Carlo."""

import math

import pytest
import torch
from torch import Tensor

import flowlm as fl
from flowlm.gamma_sampling import GammaSampling

PATHS = [
    fl.LinearInterpolant(reparam=fl.TokenAccuracy(7)),
    fl.CosineInterpolant(),
    fl.SqrtNoiseInterpolant(),
]


def _jump(path: fl.Interpolant) -> fl.XPredMap:
    return fl.XPredMap(fl.XPredictor(lambda x, t, s: 3 * x), path, two_time=True)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("churn", [0.2, 0.8, 1.0])
def test_renoising_weights_match_signal_and_noise(path: fl.Interpolant, churn: float) -> None:
    s = torch.rand(64, dtype=torch.float64) * 0.99
    sampler = GammaSampling(_jump(path), path, churn)
    keep, noise = sampler.renoise_weights(s)
    gamma_s, gamma_tilde = path.reparam(s), path.reparam(sampler.jump_time(s))
    assert bool((gamma_tilde >= gamma_s).all())
    # x_s = a x~ + b e': data coefficient alpha_s, noise variance sigma_s^2
    torch.testing.assert_close(keep * path.alpha(gamma_tilde), path.alpha(gamma_s))
    torch.testing.assert_close(
        (keep * path.sigma(gamma_tilde)) ** 2 + noise**2, path.sigma(gamma_s) ** 2
    )


def test_the_linear_rule_is_the_closed_form() -> None:
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(7))
    sampler = GammaSampling(_jump(path), path, 0.6)
    s = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    g_s, g_t = path.reparam(s), path.reparam(sampler.jump_time(s))
    keep, noise = sampler.renoise_weights(s)
    torch.testing.assert_close(keep, g_s / g_t)
    torch.testing.assert_close(noise, ((1 - g_s) ** 2 - (g_s * (1 - g_t) / g_t) ** 2).sqrt())


@pytest.mark.parametrize("per_token", [False, True])
def test_no_churn_and_steps_onto_the_data_are_the_map_itself(per_token: bool) -> None:
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(5))
    jump = _jump(path)
    x = torch.randn(3, 4, 5)
    t = torch.rand(3, 4) * 0.5 if per_token else torch.rand(3) * 0.5
    s = t + 0.3
    assert torch.equal(GammaSampling(jump, path, 0.0)(x, t, s), jump(x, t, s))
    one = torch.ones_like(t)
    assert torch.equal(GammaSampling(jump, path, 0.7)(x, t, one), jump(x, t, one))


def test_known_positions_stay_clean() -> None:
    path = fl.LinearInterpolant(reparam=fl.TokenAccuracy(5))
    x = torch.randn(2, 4, 5)
    x[:, :2] = torch.eye(5)[:2]
    t = torch.full((2, 4), 0.2)
    t[:, :2] = 1.0
    s = torch.full((2, 4), 0.6)
    s[:, :2] = 1.0
    out = GammaSampling(_jump(path), path, 0.9, generator=torch.Generator().manual_seed(0))(x, t, s)
    assert torch.equal(out[:, :2], x[:, :2])
    assert not torch.allclose(out[:, 2:], _jump(path)(x, t, s)[:, 2:])


def test_noise_comes_from_the_generator_and_nfe_from_the_map() -> None:
    path = fl.LinearInterpolant()

    def sample(seed: int) -> fl.Trajectory:
        sampler = GammaSampling(
            _jump(path), path, 0.5, generator=torch.Generator().manual_seed(seed)
        )
        return fl.rollout(sampler, torch.ones(2, 3, 4), fl.time_grid(6))

    first, again, other = sample(0), sample(0), sample(1)
    assert first.nfe == 6
    assert torch.equal(first.x, again.x)
    assert not torch.equal(first.x, other.x)


def test_churn_outside_the_unit_interval_is_refused() -> None:
    path = fl.LinearInterpolant()
    with pytest.raises(ValueError, match="churn must lie in"):
        GammaSampling(_jump(path), path, 1.5)


# ---------------------------------------------------------------- marginals, Monte Carlo

PROBS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _exact_logits(x: Tensor, t: Tensor) -> Tensor:
    """The exact denoiser of the linear path for data e_k ~ PROBS, identity clock.

    log p(k | x) = log p_k + gamma x_k / (1 - gamma)^2 + const (|e_k| = 1 for every k).
    """
    gamma = t[:, None, None]
    return torch.log(PROBS) + gamma * x / (1 - gamma).clamp_min(1e-12) ** 2


def _marginal(gamma: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of x = (1 - gamma) eps + gamma e_k on the path."""
    mean = gamma * PROBS
    data = torch.diag(PROBS) - torch.outer(PROBS, PROBS)
    return mean, (1 - gamma) ** 2 * torch.eye(3, dtype=torch.float64) + gamma**2 * data


@pytest.mark.parametrize("churn", [0.0, 0.5, 1.0])
def test_every_state_has_the_paths_mean_and_covariance(churn: float, one_thread: None) -> None:
    path = fl.LinearInterpolant()
    exact_flow = fl.Substeps(fl.XPredMap(fl.XPredictor(_exact_logits), path), 40)
    generator = torch.Generator().manual_seed(0)
    n = 40_000
    noise = torch.randn(n, 1, 3, dtype=torch.float64, generator=generator)
    grid = fl.time_grid(4, dtype=torch.float64)
    sampler = GammaSampling(exact_flow, path, churn, generator=generator)
    states = fl.rollout(sampler, noise, grid, save_states=True).states
    assert states is not None
    for gamma, state in zip(grid.tolist()[1:], states[1:], strict=True):
        x = state[:, 0]
        mean, cov = _marginal(gamma)
        variance = cov.diag()
        mean_error = (x.mean(0) - mean) / (variance / n).sqrt()
        # standard error of a sample covariance entry: sqrt((s_ii s_jj + s_ij^2) / n)
        cov_se = ((torch.outer(variance, variance) + cov**2) / n).sqrt()
        cov_error = (torch.cov(x.T) - cov) / cov_se
        assert mean_error.abs().max() < 5, (gamma, mean_error)
        assert cov_error.abs().max() < 5, (gamma, cov_error)
    final = states[-1][:, 0]
    assert torch.equal(final.sum(-1), torch.ones(n, dtype=torch.float64).to(final))
    frequencies = torch.bincount(final.argmax(-1), minlength=3).double() / n
    assert ((frequencies - PROBS).abs() < 5 * (PROBS * (1 - PROBS) / n).sqrt()).all()


def test_a_wrong_renoising_would_be_caught(one_thread: None) -> None:
    """The Monte Carlo check has the power to see a renoising that forgets to shrink."""
    n, gamma_s, gamma_tilde = 40_000, 0.5, 0.75
    generator = torch.Generator().manual_seed(1)
    x1 = torch.eye(3, dtype=torch.float64)[torch.multinomial(PROBS, n, True, generator=generator)]
    x_tilde = (1 - gamma_tilde) * torch.randn(n, 3, dtype=torch.float64, generator=generator)
    x_tilde = x_tilde + gamma_tilde * x1
    fresh = torch.randn(n, 3, dtype=torch.float64, generator=generator)
    naive = gamma_s / gamma_tilde * x_tilde + (1 - gamma_s) * fresh  # b = sigma_s: too noisy
    _, cov = _marginal(gamma_s)
    se = math.sqrt(2 / n) * cov.diag()
    assert ((torch.cov(naive.T).diag() - cov.diag()) / se).min() > 5
