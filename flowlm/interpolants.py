r"""Paths from Gaussian noise to one-hot data.

An interpolant mixes noise $x_0 \sim N(0, I)$ and data $x_1 = e_x$ at path time
$\gamma = \kappa(t)$:

$$x_t = \sigma(\gamma)\,x_0 + \alpha(\gamma)\,x_1,\qquad
  \alpha(0) = 0,\ \sigma(0) = 1,\ \alpha(1) = 1,\ \sigma(1) = 0.$$

Velocities are per unit of $\gamma$. Given a prediction $\hat x_1$, the noise it implies is
$\hat x_0 = (x_t - \alpha\hat x_1)/\sigma$.
"""

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from flowlm._checks import check_state, check_time, check_tokens
from flowlm._tensors import broadcast_time
from flowlm._types import Probs, State, Time, Tokens
from flowlm.reparam import Identity, TimeReparam

NOISE_FLOOR = 1e-5
"""Smallest $\\sigma$ divided by, so a velocity at $\\gamma = 1$ stays finite."""


def one_hot(tokens: Tokens, vocab_size: int, dtype: torch.dtype = torch.float32) -> State:
    """One-hot vectors $e_x$ of integer token ids, scattered straight into ``dtype``.

    The only (batch, seq, vocab) tensor made is the result (no int64 one-hot on the way).

    Examples:
        >>> one_hot(torch.tensor([[0, 2]]), 3)
        tensor([[[1., 0., 0.],
                 [0., 0., 1.]]])
    """
    check_tokens(tokens, vocab_size)
    out = torch.zeros(*tokens.shape, vocab_size, dtype=dtype, device=tokens.device)
    return out.scatter_(-1, tokens.long().unsqueeze(-1), 1)


class Interpolant(nn.Module, ABC):
    r"""A path $x_t = \sigma(\gamma)x_0 + \alpha(\gamma)x_1$ run on the clock $\gamma = \kappa(t)$.

    Subclasses give $\alpha$, $\sigma$ and their $\gamma$-derivatives. Times are per example
    ``(batch,)`` or per token ``(batch, seq)``. `sample` is the entry point that checks its
    inputs (and the vocabulary, when the clock names one, e.g. `TokenAccuracy`); the
    per-step methods (`step`, `velocity`, ...) trust theirs. Results keep the state's dtype.

    Args:
        reparam: the clock $\kappa$ (default: identity).
    """

    def __init__(self, reparam: TimeReparam | None = None) -> None:
        super().__init__()
        if reparam is not None and not isinstance(reparam, TimeReparam):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"reparam must be a TimeReparam such as TokenAccuracy(vocab_size), got "
                f"{reparam!r} ({type(reparam).__name__})"
            )
        self.reparam = reparam if reparam is not None else Identity()

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary of the clock (e.g. `TokenAccuracy`'s), checked against states."""
        return self.reparam.vocab_size

    @staticmethod
    @abstractmethod
    def alpha(gamma: Tensor) -> Tensor:
        r"""Data coefficient $\alpha(\gamma)$."""

    @staticmethod
    @abstractmethod
    def sigma(gamma: Tensor) -> Tensor:
        r"""Noise coefficient $\sigma(\gamma)$."""

    @staticmethod
    @abstractmethod
    def alpha_rate(gamma: Tensor) -> Tensor:
        r"""$d\alpha/d\gamma$."""

    @staticmethod
    @abstractmethod
    def sigma_rate(gamma: Tensor) -> Tensor:
        r"""$d\sigma/d\gamma$."""

    @classmethod
    def signal_to_noise(cls, gamma: Tensor) -> Tensor:
        r"""$m(\gamma) = \alpha/\sigma$: feed it to `TokenAccuracy` for this path's clock."""
        return cls.alpha(gamma) / cls.sigma(gamma)

    def check_state(self, x: State, name: str = "x") -> None:
        """Raise unless ``x`` is a (batch, seq, vocab) float state of this path's vocabulary."""
        check_state(x, self.vocab_size, name)

    def sample(self, x0: State, x1: State, t: Time) -> State:
        r"""The point $x_t = \sigma x_0 + \alpha x_1$ of the path at model time ``t``.

        One (batch, seq, vocab) tensor is allocated (the result; the inputs are not modified),
        in the inputs' dtype (bfloat16 stays bfloat16). Positions at $\gamma = 1$ are exactly
        ``x1``.
        """
        self.check_state(x1, "x1")
        if not isinstance(x0, Tensor) or x0.shape != x1.shape:  # pyright: ignore[reportUnnecessaryIsInstance]
            shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"noise shape {shape} != data shape {tuple(x1.shape)}")
        check_time(t, x1)
        dtype = torch.promote_types(x0.dtype, x1.dtype)
        gamma = self.reparam(t)
        out = torch.mul(x0, broadcast_time(self.sigma(gamma), x0).to(dtype))
        return out.addcmul_(x1, broadcast_time(self.alpha(gamma), out))

    def noised(
        self,
        tokens: Tokens,
        t: Time,
        vocab_size: int | None = None,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> State:
        r"""A fresh point $x_t = \sigma(\gamma)\,\varepsilon + \alpha(\gamma)\,e_x$ built from the tokens.

        $\varepsilon \sim N(0, I)$ is drawn straight into the result on the tokens' device, scaled
        in place by $\sigma$, and $\alpha$ is added at each position's token entry (a
        scatter-add): the result is the only (batch, seq, vocab) tensor allocated (no separate
        noise, no one-hot, no int64 temporary of that size). It equals
        ``sample(noise, one_hot(tokens, vocab_size, dtype), t)`` for ``noise`` drawn as
        ``torch.randn(..., generator=generator, device=tokens.device, dtype=dtype)`` from the
        same generator state (exactly, up to the sign of zeros), so its mean is $\alpha e_x$ and
        each entry's variance is $\sigma^2$. Every path of this module is built this way;
        positions at $\gamma = 1$ are exactly one-hot.

        Args:
            tokens: the clean token ids $x$, ``(batch, seq)``.
            t: model times per example ``(batch,)`` or per token ``(batch, seq)``, in [0, 1].
            vocab_size: $V$; by default the clock's (e.g. `TokenAccuracy`'s). Required when the
                clock names no vocabulary; must agree with it when both are known.
            generator: random source of $\varepsilon$, on the tokens' device.
            dtype: floating dtype of the result (e.g. ``torch.bfloat16``).

        Raises:
            ValueError: no vocabulary known or two that disagree, tokens not ``(batch, seq)``,
                times of the wrong shape, or a generator on another device.
            TypeError: float token ids or a non-floating ``dtype``.

        Examples:
            >>> from flowlm.reparam import TokenAccuracy
            >>> path = LinearInterpolant(reparam=TokenAccuracy(4))
            >>> tokens, t = torch.tensor([[1, 3]]), torch.tensor([0.5])
            >>> x_t = path.noised(tokens, t, generator=torch.Generator().manual_seed(0))
            >>> noise = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(0))
            >>> torch.equal(x_t, path.sample(noise, one_hot(tokens, 4), t))
            True
        """
        vocab = self._noised_vocabulary(vocab_size)
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:  # pyright: ignore[reportUnnecessaryIsInstance]
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"tokens must have shape (batch, seq), got {shape}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype for the state, got {dtype}")
        if generator is not None and generator.device != tokens.device:
            raise ValueError(
                f"the generator is on {generator.device} but the tokens are on "
                f"{tokens.device}: the noise is drawn on the tokens' device, so seed a "
                f"generator there, e.g. torch.Generator({str(tokens.device)!r})"
            )
        check_tokens(tokens, vocab)
        check_time(t, tokens)
        gamma = self.reparam(t)
        out = torch.empty((*tokens.shape, vocab), dtype=dtype, device=tokens.device)
        out.normal_(generator=generator)
        out.mul_(broadcast_time(self.sigma(gamma), out))
        alpha = broadcast_time(self.alpha(gamma), out).expand(*tokens.shape, 1)
        return out.scatter_add_(-1, tokens.long().unsqueeze(-1), alpha)

    def _noised_vocabulary(self, vocab_size: int | None) -> int:
        if vocab_size is None:
            if self.vocab_size is None:
                raise ValueError(
                    f"noised needs the vocabulary size: this path's clock "
                    f"({type(self.reparam).__name__}) names none, so pass vocab_size"
                )
            return self.vocab_size
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive number of tokens, got {vocab_size}")
        if self.vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: vocab_size={vocab_size} but this path's clock is built "
                f"for {self.vocab_size} tokens"
            )
        return vocab_size

    def predicted_noise(self, x_t: State, x1_hat: Probs, t: Time) -> State:
        r"""The noise $\hat x_0 = (x_t - \alpha\hat x_1)/\sigma$ implied by a data prediction."""
        gamma = self.reparam(t)
        alpha = broadcast_time(self.alpha(gamma), x_t)
        sigma = broadcast_time(self.sigma(gamma).clamp_min(NOISE_FLOOR), x_t)
        return (x_t - alpha * x1_hat.to(x_t.dtype)) / sigma

    def velocity(self, x_t: State, x1_hat: Probs, t: Time) -> State:
        r"""Marginal velocity per unit $\gamma$: $\sigma'\hat x_0 + \alpha'\hat x_1$.

        For the linear path this is $(\hat x_1 - x_t)/(1 - \gamma)$.
        """
        gamma = self.reparam(t)
        x0_hat = self.predicted_noise(x_t, x1_hat, t)
        sigma_rate = broadcast_time(self.sigma_rate(gamma), x_t)
        return x0_hat.mul_(sigma_rate).addcmul_(x1_hat, broadcast_time(self.alpha_rate(gamma), x_t))

    def step_weights(self, t: Time, s: Time) -> tuple[Tensor, Tensor]:
        r"""The weights $(a, b)$ of `step`: $X_{t\to s}(x) = a\,x + b\,\hat x_1$.

        $a = \sigma_s/\sigma_t$ and $b = \alpha_s - a\,\alpha_t$, except exactly $(0, 1)$
        where $\gamma_s = 1$ (the step lands on the prediction) and exactly $(1, 0)$ where
        $\gamma_s = \gamma_t$ (no move: a known position at $t = s = 1$ stays as it is).
        Shaped like the times.

        Examples:
            >>> LinearInterpolant().step_weights(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]))
            (tensor([0., 1.]), tensor([1., 0.]))
        """
        gamma_t, gamma_s = self.reparam(t), self.reparam(s)
        keep = self.sigma(gamma_s) / self.sigma(gamma_t).clamp_min(NOISE_FLOOR)
        keep = torch.where(gamma_s >= 1, 0.0, keep)
        move = self.alpha(gamma_s) - keep * self.alpha(gamma_t)
        move = torch.where(gamma_s >= 1, 1.0, move)
        still = gamma_s == gamma_t
        return torch.where(still, 1.0, keep), torch.where(still, 0.0, move)

    def step(self, x_t: State, x1_hat: Probs, t: Time, s: Time) -> State:
        r"""Move from ``t`` to ``s`` holding $\hat x_1$ fixed.

        $X_{t\to s}(x) = \sigma(\gamma_s)\hat x_0 + \alpha(\gamma_s)\hat x_1$ is the exact
        solution of the ODE when $\hat x_1$ is constant on the step (DDIM); for the linear
        path it equals the Euler step

        $x_t + (\gamma_s - \gamma_t)(\hat x_1 - x_t)/(1 - \gamma_t)$. It returns ``x1_hat``
        exactly where $\gamma_s = 1$ and ``x_t`` exactly where $\gamma_s = \gamma_t$ (so
        positions at $t = s = 1$ stay exactly one-hot); see `step_weights`. Works in either
        direction; the result has ``x_t``'s dtype.
        """
        keep, move = self.step_weights(t, s)
        out = torch.mul(x_t, broadcast_time(keep, x_t))
        return out.addcmul_(x1_hat, broadcast_time(move, x_t))

    def implied_prediction(self, x_t: State, x_s: State, t: Time, s: Time) -> State:
        r"""The data prediction $\hat x_1$ with which `step` moves ``x_t`` at ``t`` to ``x_s`` at ``s``.

        Solving $x_s = \sigma_s\hat x_0 + \alpha_s\hat x_1$, $\hat x_0 = (x_t - \alpha_t\hat x_1)/\sigma_t$:

        $$\hat x_1 = \frac{\sigma_t x_s - \sigma_s x_t}{\alpha_s\sigma_t - \sigma_s\alpha_t}
          = \frac{x_s - a\,x_t}{b}$$

        with the weights $(a, b)$ of `step_weights`, defined for $\gamma_s \neq \gamma_t$;
        where the step does not move ($b = 0$, e.g. a known position at $t = s = 1$) it
        returns ``x_s`` itself. Several `step`s in a row imply a convex
        combination of their predictions (the weights telescope), so a many-step rollout of
        simplex predictions implies a point of the simplex.

        Examples:
            >>> path = LinearInterpolant()
            >>> x, x1_hat = torch.randn(1, 2, 3), torch.softmax(torch.randn(1, 2, 3), -1)
            >>> t, s = torch.tensor([0.2]), torch.tensor([0.7])
            >>> implied = path.implied_prediction(x, path.step(x, x1_hat, t, s), t, s)
            >>> torch.allclose(implied, x1_hat, atol=1e-6)
            True
        """
        keep, move = self.step_weights(t, s)
        still = broadcast_time(move == 0, x_t)
        implied = (x_s - broadcast_time(keep, x_t) * x_t) / broadcast_time(move, x_t)
        return torch.where(still, x_s, implied)


class LinearInterpolant(Interpolant):
    r"""FLM's path $x_t = (1 - \gamma)x_0 + \gamma x_1$; velocity $(\hat x_1 - x_t)/(1 - \gamma)$.

    Examples:
        >>> from flowlm.reparam import TokenAccuracy
        >>> path = LinearInterpolant(reparam=TokenAccuracy(4))
        >>> x1 = one_hot(torch.tensor([[1, 3]]), 4)
        >>> torch.equal(path.sample(torch.randn_like(x1), x1, torch.ones(1)), x1)
        True
    """

    @staticmethod
    def alpha(gamma: Tensor) -> Tensor:
        r"""$\gamma$."""
        return gamma

    @staticmethod
    def sigma(gamma: Tensor) -> Tensor:
        r"""$1 - \gamma$."""
        return 1.0 - gamma

    @staticmethod
    def alpha_rate(gamma: Tensor) -> Tensor:
        """1."""
        return torch.ones_like(gamma)

    @staticmethod
    def sigma_rate(gamma: Tensor) -> Tensor:
        """-1."""
        return -torch.ones_like(gamma)

    def step_weights(self, t: Time, s: Time) -> tuple[Tensor, Tensor]:
        r"""$(1 - b, b)$ with $b = (\gamma_s - \gamma_t)/(1 - \gamma_t)$.

        Exactly $b = 1$ where $\gamma_s = 1$ and $b = 0$ where $\gamma_s = \gamma_t$.

        Examples:
            >>> LinearInterpolant().step_weights(torch.tensor([0.5]), torch.tensor([0.75]))
            (tensor([0.5000]), tensor([0.5000]))
        """
        gamma_t, gamma_s = self.reparam(t), self.reparam(s)
        move = (gamma_s - gamma_t) / (1.0 - gamma_t).clamp_min(NOISE_FLOOR)
        move = torch.where(gamma_s == gamma_t, 0.0, torch.where(gamma_s >= 1, 1.0, move))
        return 1.0 - move, move

    def step(self, x_t: State, x1_hat: Probs, t: Time, s: Time) -> State:
        r"""The linear `Interpolant.step` as one fused update: ``torch.lerp(x_t, x1_hat, b)``.

        $b$ is `step_weights`' second weight; one (batch, seq, vocab) tensor is allocated,
        in ``x_t``'s dtype.
        """
        _, move = self.step_weights(t, s)
        return torch.lerp(x_t, x1_hat.to(x_t.dtype), broadcast_time(move, x_t))


class SqrtNoiseInterpolant(Interpolant):
    r"""The reference code's variance-preserving variant: $x_t = \sqrt{1-\gamma}x_0 + \gamma x_1$.

    It has the linear path's data coefficient $\alpha = \gamma$ and shrinks the noise more
    slowly. Its matching clock is ``TokenAccuracy(V, snr=SqrtNoiseInterpolant.signal_to_noise)``
    with $m(\gamma) = \gamma/\sqrt{1 - \gamma}$.

    Examples:
        >>> x1 = one_hot(torch.tensor([[0]]), 2)
        >>> SqrtNoiseInterpolant().sample(torch.ones_like(x1), x1, torch.tensor([0.75]))
        tensor([[[1.2500, 0.5000]]])
    """

    @staticmethod
    def alpha(gamma: Tensor) -> Tensor:
        r"""$\gamma$."""
        return gamma

    @staticmethod
    def sigma(gamma: Tensor) -> Tensor:
        r"""$\sqrt{1 - \gamma}$."""
        return (1.0 - gamma).clamp_min(0.0).sqrt()

    @staticmethod
    def alpha_rate(gamma: Tensor) -> Tensor:
        """1."""
        return torch.ones_like(gamma)

    @staticmethod
    def sigma_rate(gamma: Tensor) -> Tensor:
        r"""$-1/(2\sqrt{1-\gamma})$."""
        return -0.5 / (1.0 - gamma).clamp_min(NOISE_FLOOR**2).sqrt()


class CosineInterpolant(Interpolant):
    r"""A variance-preserving path: $x_t = \cos(\pi\gamma/2)x_0 + \sin(\pi\gamma/2)x_1$.

    $\alpha^2 + \sigma^2 = 1$; its clock is
    ``TokenAccuracy(V, snr=CosineInterpolant.signal_to_noise)``,
    with $m(\gamma) = \tan(\pi\gamma/2)$.

    Examples:
        >>> x1 = one_hot(torch.tensor([[0]]), 2)
        >>> CosineInterpolant().sample(torch.zeros_like(x1), x1, torch.tensor([1.0]))
        tensor([[[1., 0.]]])
    """

    @staticmethod
    def alpha(gamma: Tensor) -> Tensor:
        r"""$\sin(\pi\gamma/2)$."""
        return torch.sin(0.5 * torch.pi * gamma)

    @staticmethod
    def sigma(gamma: Tensor) -> Tensor:
        r"""$\cos(\pi\gamma/2)$, exactly 0 at $\gamma = 1$."""
        return torch.where(gamma >= 1, 0.0, torch.cos(0.5 * torch.pi * gamma))

    @staticmethod
    def alpha_rate(gamma: Tensor) -> Tensor:
        r"""$\tfrac{\pi}{2}\cos(\pi\gamma/2)$."""
        return 0.5 * torch.pi * torch.cos(0.5 * torch.pi * gamma)

    @staticmethod
    def sigma_rate(gamma: Tensor) -> Tensor:
        r"""$-\tfrac{\pi}{2}\sin(\pi\gamma/2)$."""
        return -0.5 * torch.pi * torch.sin(0.5 * torch.pi * gamma)
