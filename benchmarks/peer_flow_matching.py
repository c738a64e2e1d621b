"""Optional outside peer: masked discrete flow matching with Meta's ``flow_matching`` package.

The mixture path with a MASK source (Gat et al., 2024): every position starts at the MASK id
(``vocab_size``) at t = 0 and has flipped to its data token by time t with probability
kappa_t = t (``MixtureDiscreteProbPath(PolynomialConvexScheduler(n=1))``). It is trained with
the package's ``MixturePathGeneralizedKL`` and sampled with its ``MixtureDiscreteEulerSolver``
on a uniform grid of t, with the same DiT backbone as MDLM (``DiT(vocab_size + 1, ...)`` on
integer tokens). The posterior given to the solver puts no mass on MASK.

The package is licensed CC-BY-NC: flowlm uses it and copies none of it. It is an optional
extra (``pip install "flowlm[benchmarks]"`` or ``pip install flow-matching``); without it
`available` is False and ``benchmarks/quality.py`` leaves this row out.

Not a script: ``benchmarks/quality.py`` imports it (``benchmarks/`` on ``sys.path``)::

    from peer_flow_matching import MaskedFlowMatching, available
    model = MaskedFlowMatching(DiT(vocab_size + 1, dim=96, depth=3, heads=4), vocab_size)
    loss = model.loss(tokens, generator)
    tokens, nfe = model.eval().sample(count=256, length=32, steps=8, seed=0)
"""

import importlib
import importlib.util

import torch
from torch import Tensor, nn

from flowlm import Probs, Time, Tokens, uniform_times

LAST_TRAINING_TIME = 1.0 - 1e-3
"""Training times are drawn in [0, this]: the loss weights kappa'/(1 - kappa) = 1/(1 - t)."""


def available() -> bool:
    """Whether the ``flow_matching`` package is installed."""
    return importlib.util.find_spec("flow_matching") is not None


class MaskedFlowMatching(nn.Module):
    """Discrete flow matching on the masked mixture path, with the package's loss and solver.

    Args:
        backbone: called as ``backbone(x_t, t)`` on integer tokens in [0, vocab_size]
            (``vocab_size`` is MASK) and times of shape (batch,); returns logits over
            ``vocab_size + 1`` ids, e.g. ``DiT(vocab_size + 1, ...)``.
        vocab_size: number of real tokens V.

    Raises:
        ImportError: if ``flow_matching`` is not installed.
    """

    def __init__(self, backbone: nn.Module, vocab_size: int) -> None:
        super().__init__()
        paths = importlib.import_module("flow_matching.path")
        schedulers = importlib.import_module("flow_matching.path.scheduler")
        losses = importlib.import_module("flow_matching.loss")
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.path = paths.MixtureDiscreteProbPath(schedulers.PolynomialConvexScheduler(n=1.0))
        self.generalized_kl = losses.MixturePathGeneralizedKL(self.path)
        self.calls = 0

    def loss(self, tokens: Tokens, generator: torch.Generator) -> Tensor:
        """The package's generalized KL at stratified times t in [0, `LAST_TRAINING_TIME`].

        The path draws which positions are still masked from torch's global generator.
        """
        t = LAST_TRAINING_TIME * uniform_times(len(tokens), generator=generator)
        source = torch.full_like(tokens, self.mask_id)
        x_t = self.path.sample(source, tokens, t).x_t
        return self.generalized_kl(self.backbone(x_t, t), tokens, x_t, t)

    def forward(self, x: Tokens, t: Time) -> Probs:
        """The posterior p(x_1 | x_t) over the V + 1 ids, MASK excluded; what the solver calls."""
        self.calls += 1
        logits = self.backbone(x, t).float()
        is_mask = torch.arange(self.vocab_size + 1, device=logits.device) == self.mask_id
        return torch.softmax(logits.masked_fill(is_mask, float("-inf")), dim=-1)

    @torch.no_grad()
    def sample(self, count: int, length: int, steps: int, seed: int) -> tuple[Tokens, int]:
        """The package's discrete Euler solver from all-MASK at t = 0 to t = 1 in equal steps.

        The solver draws from torch's global generator, which is seeded with ``seed`` first.
        Returns the tokens and the number of backbone calls.
        """
        solvers = importlib.import_module("flow_matching.solver")
        solver = solvers.MixtureDiscreteEulerSolver(
            model=self, path=self.path, vocabulary_size=self.vocab_size + 1
        )
        device = next(self.backbone.parameters()).device
        torch.manual_seed(seed)
        calls_before = self.calls
        tokens = solver.sample(
            x_init=torch.full((count, length), self.mask_id, dtype=torch.long, device=device),
            step_size=None,
            time_grid=torch.linspace(0.0, 1.0, steps + 1),
        )
        return tokens, self.calls - calls_before
