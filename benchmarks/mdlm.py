"""MDLM: masked (absorbing-state) discrete diffusion, a baseline written from its published math.

The forward process replaces each token by an extra MASK id (``vocab_size``) independently
with probability ``1 - alpha_t``; with the log-linear schedule ``alpha_t = 1 - t``, a token is
masked with probability ``t`` (all masked at t = 1). The SUBS parameterization gives the MASK
id zero probability (its logit is dropped, i.e. set to -inf) and copies unmasked positions
through, so the continuous-time NELBO is

    L = E_t [ -alpha'_t / (1 - alpha_t) * sum over masked positions of -log p(x | z_t) ]
      = E_t [ (1/t) * CE at masked positions ],

averaged here over all positions (unmasked ones add 0), t ~ U[min_time, 1] stratified.
The ancestral sampler runs from t = 1 to 0 in N equal steps; at a step t -> s every position
still masked is revealed with probability (alpha_s - alpha_t)/(1 - alpha_t) = (t - s)/t, to a
token drawn from the predicted categorical (Gumbel-max in float64). The last step has s = 0,
so it reveals every position left.

Import it from other benchmarks (a script in ``benchmarks/`` has it on ``sys.path``)::

    from mdlm import MaskedDiffusion
    model = MaskedDiffusion(DiT(vocab_size + 1, dim=128, depth=2, heads=4), vocab_size)
    loss = model.loss(tokens, generator)
    tokens, nfe = model.eval().sample(batch=64, length=8, steps=64, generator=generator)

Usage as a script (trains on alpha-repeat and prints valid rates per sampler step count):
    python benchmarks/mdlm.py [--train-steps 800] [--out-dir results] [--threads 1]
    python benchmarks/mdlm.py --quick --out-dir /tmp/m      # seconds

Writes ``<out-dir>/mdlm_alpha_repeat.json`` and ``.md`` (the table, also printed).
"""

import argparse
import itertools

import torch
from harness import (
    describe_machine,
    machine_context,
    parse_flags,
    positive_int,
    stopwatch,
    write_results,
)
from jaxtyping import Float, Int
from torch import Tensor, nn

import flowlm
from flowlm import Time, TokenMask, Tokens
from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat


def log_linear_alpha(t: Tensor) -> Tensor:
    """Probability that a token is still unmasked at time t: alpha_t = 1 - t."""
    return 1.0 - t


def gumbel_argmax(
    log_probs: Float[Tensor, "*batch vocab"], generator: torch.Generator | None
) -> Int[Tensor, "*batch"]:
    """One draw from each categorical, by Gumbel-max in float64."""
    wide = log_probs.double()
    uniform = torch.rand(wide.shape, generator=generator, dtype=torch.float64, device=wide.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
    return (wide + gumbel).argmax(dim=-1)


class MaskedDiffusion(nn.Module):
    """MDLM with the log-linear schedule and the SUBS parameterization.

    SUBS: `log_probs` never puts mass on MASK; the carry-over of unmasked positions is exact
    by construction, as `loss` counts only masked positions and `sample` only rewrites them.

    Args:
        backbone: called as ``backbone(z_t, t)`` on integer tokens in [0, vocab_size]
            (``vocab_size`` is MASK) and times of shape (batch,); returns logits over
            ``vocab_size + 1`` ids, e.g. ``DiT(vocab_size + 1, ...)``.
        vocab_size: number of real tokens V.
        min_time: smallest training time (the 1/t weight is unbounded at 0).
    """

    def __init__(self, backbone: nn.Module, vocab_size: int, min_time: float = 1e-3) -> None:
        super().__init__()
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.min_time = min_time

    def mask_tokens(
        self, tokens: Tokens, t: Time, generator: torch.Generator | None = None
    ) -> tuple[Tokens, TokenMask]:
        """Sample z_t: each token becomes MASK independently with probability 1 - alpha_t."""
        draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        masked = draw < (1.0 - log_linear_alpha(t))[:, None]
        return torch.where(masked, self.mask_id, tokens), masked

    def log_probs(self, z_t: Tokens, t: Time) -> Float[Tensor, "batch seq vocab"]:
        """log p(x | z_t) over the V real tokens (the MASK logit dropped), in float32 or wider."""
        logits = self.backbone(z_t, t)
        expected = (*z_t.shape, self.vocab_size + 1)
        if logits.shape != expected:
            raise ValueError(f"backbone returned logits {tuple(logits.shape)}, need {expected}")
        real = logits[..., : self.vocab_size]
        return torch.log_softmax(real.to(torch.promote_types(real.dtype, torch.float32)), dim=-1)

    def loss(self, tokens: Tokens, generator: torch.Generator | None = None) -> Tensor:
        """Continuous-time NELBO per token: mean over positions of (1/t) CE at masked ones."""
        times = flowlm.uniform_times(tokens.shape[0], generator=generator, device=tokens.device)
        t = self.min_time + (1.0 - self.min_time) * times
        z_t, masked = self.mask_tokens(tokens, t, generator)
        nll = -self.log_probs(z_t, t).gather(-1, tokens[..., None].long()).squeeze(-1)
        weight = 1.0 / (1.0 - log_linear_alpha(t))  # -alpha'_t / (1 - alpha_t) = 1/t
        return torch.where(masked, nll * weight[:, None], 0.0).mean()

    @torch.no_grad()
    def sample(
        self, batch: int, length: int, steps: int, generator: torch.Generator | None = None
    ) -> tuple[Tokens, int]:
        """Ancestral sampling from all-MASK at t = 1 to t = 0 in ``steps`` equal steps.

        Returns the tokens and the number of backbone calls (one per step). Put the backbone
        in eval mode first (dropout).
        """
        if steps < 1:
            raise ValueError(f"need at least one step, got {steps}")
        device = next(self.backbone.parameters()).device
        z = torch.full((batch, length), self.mask_id, dtype=torch.long, device=device)
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
        calls = 0
        for t, s in itertools.pairwise(grid):
            log_probs = self.log_probs(z, t.float().expand(batch))
            calls += 1
            proposal = gumbel_argmax(log_probs, generator)
            alpha_t, alpha_s = log_linear_alpha(t), log_linear_alpha(s)
            reveal_probability = (alpha_s - alpha_t) / (1.0 - alpha_t)
            draw = torch.rand(z.shape, generator=generator, dtype=torch.float64, device=device)
            reveal = (z == self.mask_id) & (draw < reveal_probability)
            z = torch.where(reveal, proposal, z)
        return z, calls


def train(
    model: MaskedDiffusion,
    task: AlphaRepeat,
    steps: int,
    batch: int,
    learning_rate: float,
    generator: torch.Generator,
) -> list[float]:
    """AdamW on fresh task samples every step; returns the loss of every step.

    The losses are read on the host once, after the last step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    losses: list[Tensor] = []
    for _ in range(steps):
        loss = model.loss(task.sample(batch, generator), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-steps", type=positive_int, default=800)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--samples", type=positive_int, default=512)


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    if arguments.quick:
        arguments.train_steps, arguments.samples = 20, 16
    torch.manual_seed(arguments.seed)
    generator = torch.Generator().manual_seed(arguments.seed)
    task = AlphaRepeat(26, 8)
    backbone = DiT(task.vocab_size + 1, dim=128, depth=2, heads=4, dropout=0.0)
    model = MaskedDiffusion(backbone, task.vocab_size)
    with stopwatch() as seconds:
        losses = train(model, task, arguments.train_steps, arguments.batch, 1e-3, generator)
    train_seconds = seconds.wall
    model.eval()
    rows = []
    for steps in (1, 2, 4, 8, 16, 32, 64, 128):
        tokens, calls = model.sample(arguments.samples, task.length, steps, generator)
        rows.append({"steps": steps, "nfe": calls, "valid_rate": task.valid_rate(tokens)})
    report = {
        "benchmark": "mdlm_alpha_repeat",
        "task": {"vocab_size": task.vocab_size, "length": task.length},
        "backbone": {"dim": 128, "depth": 2, "heads": 4},
        "train_steps": arguments.train_steps,
        "batch": arguments.batch,
        "train_seconds": train_seconds,
        "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "samples": arguments.samples,
        "sampler": "ancestral, float64 Gumbel-max",
        "rows": rows,
        "machine": machine_context(),
    }
    lines = [
        f"MDLM on alpha-repeat (V 26, L 8): DiT dim 128, depth 2; {arguments.train_steps} steps "
        f"of batch {arguments.batch} in {train_seconds:.0f} s; {arguments.samples} samples each; "
        f"{describe_machine(report['machine'])}.",
        "",
        "| sampler steps | NFE | valid rate |",
        "|---|---|---|",
    ]
    lines += [f"| {row['steps']} | {row['nfe']} | {row['valid_rate']:.3f} |" for row in rows]
    write_results(arguments.out_dir, "mdlm_alpha_repeat", report, "\n".join(lines))


if __name__ == "__main__":
    main()
