"""Swap one component at a time on a synthetic task; write a markdown table for the docs.

Task: `AlphaRepeat` (one of V letters repeated L times). A sample is valid when all its
positions agree, so the valid rate measures exactly what one-step factorized sampling cannot
do. Every FLM row trains the same tiny DiT from the same seed for the same number of steps;
only the named component changes. Distillation rows start from the baseline FLM model
(linear path, accuracy clock) and train a two-time DiT initialized from it.

    python docs/scripts/ablation_table.py                 # a few CPU-minutes, one thread
    python docs/scripts/ablation_table.py --smoke --out /tmp/ablations.md   # seconds

Writes ``docs/assets/ablations.md`` (included by the ablations guide) unless ``--out`` is given.
"""

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

import flowlm as fl
from flowlm import distill
from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat

OUT = Path(__file__).resolve().parents[1] / "assets" / "ablations.md"


@dataclass(frozen=True)
class Settings:
    vocab_size: int = 26
    length: int = 8
    dim: int = 64
    depth: int = 2
    heads: int = 2
    batch_size: int = 64
    flm_steps: int = 1000
    distill_steps: int = 400
    lr: float = 1e-3
    distill_lr: float = 3e-4
    samples: int = 1024
    seed: int = 0


SMOKE = {"flm_steps": 3, "distill_steps": 2, "samples": 16, "dim": 16, "depth": 1}
STEP_COUNTS = (1, 2, 4, 8)


def flm(settings: Settings, interpolant: fl.Interpolant) -> tuple[fl.XPredictor, float]:
    """Train an FLM x-predictor on the task; return it and its seconds per step."""
    task = AlphaRepeat(settings.vocab_size, settings.length)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = DiT(settings.vocab_size, settings.dim, settings.depth, settings.heads, dropout=0.0)
    predictor = fl.XPredictor(model)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=settings.lr)
    started = time.process_time()
    for _ in range(settings.flm_steps):
        tokens = task.sample(settings.batch_size, generator)
        x1 = fl.one_hot(tokens, settings.vocab_size)
        t = fl.uniform_times(len(tokens), generator=generator)
        x0 = torch.randn(x1.shape, generator=generator)
        loss = fl.masked_mean(
            fl.cross_entropy(predictor.logits(interpolant.sample(x0, x1, t), t), tokens)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return predictor.eval(), (time.process_time() - started) / settings.flm_steps


BatchLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""(tokens, x_t, t, s) -> per-token loss."""


def two_time_dit(settings: Settings, teacher: fl.XPredictor, zero: tuple[str, ...] = ()) -> DiT:
    """A two-time DiT initialized from the teacher's weights (second time embedding at zero)."""
    s = settings
    net = DiT(s.vocab_size, s.dim, s.depth, s.heads, two_time=True, dropout=0.0)
    distill.init_student(net, teacher.backbone, zero=zero)
    return net


def distill_run(
    settings: Settings, net: DiT, loss_fn: BatchLoss, interpolant: fl.Interpolant
) -> float:
    """Train ``net`` on ``loss_fn`` over jumps from `time_pairs`; return seconds per step."""
    task = AlphaRepeat(settings.vocab_size, settings.length)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.distill_lr)
    started = time.process_time()
    for _ in range(settings.distill_steps):
        tokens = task.sample(settings.batch_size, generator)
        x1 = fl.one_hot(tokens, settings.vocab_size)
        t, s = fl.time_pairs(len(tokens), generator=generator)
        x_t = interpolant.sample(torch.randn(x1.shape, generator=generator), x1, t)
        loss = fl.masked_mean(loss_fn(tokens, x_t, t, s))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    return (time.process_time() - started) / settings.distill_steps


def distillation_rows(
    settings: Settings, teacher: fl.XPredictor, interp: fl.Interpolant
) -> list[list[str]]:
    """One row per loss of `flowlm.distill`, each from the same teacher and budget."""
    teacher_cells = quality(settings, fl.XPredMap(teacher, interp)).values()
    rows = [["FLM teacher, no distillation", *teacher_cells, "–"]]

    def report(name: str, flow_map: fl.FlowMap, seconds: float) -> None:
        rows.append([name, *quality(settings, flow_map).values(), f"{1000 * seconds:.0f}"])
        print(rows[-1], flush=True)

    def two_time_map(net: DiT) -> fl.XPredMap:
        return fl.XPredMap(fl.XPredictor(net), interp, two_time=True)

    kl_losses = {
        "`semigroup_kl_loss` (v2)": distill.semigroup_kl_loss,
        "`lagrangian_kl_loss`": distill.lagrangian_kl_loss,
        "`eulerian_kl_loss`": distill.eulerian_kl_loss,
    }
    for name, kl_loss in kl_losses.items():
        student = two_time_map(two_time_dit(settings, teacher))
        seconds = distill_run(
            settings,
            student.predictor.backbone,
            lambda tokens, x_t, t, s, kl_loss=kl_loss, student=student: kl_loss(
                student, teacher, x_t, t, s
            ),
            interp,
        )
        report(name, student, seconds)

    student = two_time_map(two_time_dit(settings, teacher))
    seconds = distill_run(
        settings,
        student.predictor.backbone,
        lambda tokens, x_t, t, s: distill.self_semigroup_loss(student, tokens, x_t, t, s),
        interp,
    )
    report("`self_semigroup_loss` (no teacher calls)", student, seconds)

    correction = two_time_dit(settings, teacher, zero=("output",))  # g = 0: the Euler step
    taylor = fl.TaylorMap(fl.XPredVelocity(teacher, interp), correction)
    seconds = distill_run(
        settings,
        correction,
        lambda tokens, x_t, t, s: distill.taylor_semigroup_loss(taylor, x_t, t, s),
        interp,
    )
    report("`taylor_semigroup_loss` (v1 stage 1, 2 NFE/step)", taylor, seconds)

    student = two_time_map(two_time_dit(settings, teacher))
    seconds = distill_run(
        settings,
        student.predictor.backbone,
        lambda tokens, x_t, t, s: distill.map_regression_loss(student, taylor, x_t, t, s),
        interp,
    )
    report("`map_regression_loss` (v1 stage 2, onto stage 1)", student, seconds)
    return rows


def quality(settings: Settings, flow_map: fl.FlowMap) -> dict[int, str]:
    """``valid rate / mode coverage`` by network calls (NFE), sampling with each step count of
    `STEP_COUNTS` from the same noise."""
    task = AlphaRepeat(settings.vocab_size, settings.length)
    noise = torch.randn(
        settings.samples,
        settings.length,
        settings.vocab_size,
        generator=torch.Generator().manual_seed(1234),
    )
    cells = {}
    for n_steps in STEP_COUNTS:
        trajectory = fl.rollout(flow_map, noise, fl.time_grid(n_steps))
        tokens = fl.decode(trajectory.x)
        cells[trajectory.nfe] = f"{task.valid_rate(tokens):.2f} / {task.mode_coverage(tokens):.2f}"
    return cells


def within_budgets(cells: dict[int, str]) -> list[str]:
    """For each NFE budget of `STEP_COUNTS`, the cell of the most calls within it, with its NFE
    in brackets when below the budget ("–" when even one step costs more)."""
    row = []
    for budget in STEP_COUNTS:
        nfe = max((calls for calls in cells if calls <= budget), default=None)
        if nfe is None:
            row.append("–")
        else:
            row.append(cells[nfe] + ("" if nfe == budget else f" ({nfe})"))
    return row


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--smoke", action="store_true", help="tiny settings, seconds (tests)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = replace(Settings(), **SMOKE) if args.smoke else Settings()
    V = settings.vocab_size
    load_before = os.getloadavg()
    started = time.perf_counter()
    steps_header = [f"{n} step{'s' if n > 1 else ''}" for n in STEP_COUNTS]

    # 1. FLM: swap the clock, then the path (each path with its own accuracy clock).
    linear = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
    flm_rows: list[list[str]] = []
    baseline = None
    variants: list[tuple[str, str, fl.Interpolant]] = [
        ("Linear", "TokenAccuracy(V)", linear),
        ("Linear", "Identity()", fl.LinearInterpolant(reparam=fl.Identity())),
        ("Linear", "Power(0.5)", fl.LinearInterpolant(reparam=fl.Power(0.5))),
        (
            "Cosine",
            "TokenAccuracy(V, snr=cosine)",
            fl.CosineInterpolant(fl.TokenAccuracy(V, snr=fl.CosineInterpolant.signal_to_noise)),
        ),
        (
            "SqrtNoise",
            "TokenAccuracy(V, snr=sqrt-noise)",
            fl.SqrtNoiseInterpolant(
                fl.TokenAccuracy(V, snr=fl.SqrtNoiseInterpolant.signal_to_noise)
            ),
        ),
    ]
    for path, clock, interpolant in variants:
        predictor, seconds = flm(settings, interpolant)
        if baseline is None:
            baseline = predictor
        cells = quality(settings, fl.XPredMap(predictor, interpolant)).values()
        flm_rows.append([path, f"`{clock}`", *cells, f"{1000 * seconds:.0f}"])
        print(flm_rows[-1], flush=True)
    assert baseline is not None

    # 2. Solvers on the baseline model, compared within budgets of network calls (NFE).
    velocity = fl.XPredVelocity(baseline, linear)
    solver_rows = []
    for name, flow_map in [
        ("XPredMap (FLM Euler)", fl.XPredMap(baseline, linear)),
        ("Euler(XPredVelocity)", fl.Euler(velocity)),
        ("Midpoint(XPredVelocity)", fl.Midpoint(velocity)),
        ("Heun(XPredVelocity)", fl.Heun(velocity, skip_at_data=True)),
    ]:
        solver_rows.append([f"`{name}`", *within_budgets(quality(settings, flow_map))])
        print(solver_rows[-1], flush=True)

    # 3. Distillation losses, all from the baseline teacher.
    distill_rows = distillation_rows(settings, baseline, linear)

    minutes = (time.perf_counter() - started) / 60
    load_after = os.getloadavg()
    s = settings
    report = [
        "<!-- Generated by docs/scripts/ablation_table.py; do not edit by hand. -->",
        f"Task `AlphaRepeat(vocab_size={s.vocab_size}, length={s.length})`. Each cell is "
        "*valid rate / mode coverage* over "
        f"{s.samples} samples drawn from the same noise: the fraction of samples whose "
        "positions all agree, and the fraction of the letters that occur as a valid sample "
        "(a sampler that always writes one letter scores 1.00 / 0.04). Columns are sampling "
        "steps on a uniform `time_grid`. "
        f"Backbone `DiT(dim={s.dim}, depth={s.depth}, heads={s.heads}, dropout=0)`, "
        f"batch {s.batch_size}, AdamW; FLM {s.flm_steps} steps at lr {s.lr}; distillation "
        f"{s.distill_steps} steps at lr {s.distill_lr} with `time_pairs`, from the first row's "
        f"model. One seed ({s.seed}), float32, {args.threads} CPU thread; ms/step is the "
        "process CPU time per training step (less sensitive to other jobs than wall time).",
        "",
        "**FLM: clock and path** (Euler sampler, `XPredMap`)",
        "",
        table(["path", "clock", *steps_header, "CPU ms/step"], flm_rows),
        "",
        "**Solvers** on the first model, within budgets of network calls (NFE): each cell "
        "samples with the most steps that fit the budget and shows its NFE in brackets when "
        "below it. The midpoint rule spends 2n NFE on n steps, Heun 2n - 1 (it skips its "
        "second call on the step onto the data)",
        "",
        table(["solver", *[f"{n} NFE" for n in STEP_COUNTS]], solver_rows),
        "",
        "**Distillation** from the first model: a two-time `XPredMap` (1 NFE per step) unless noted",
        "",
        table(["loss", *steps_header, "CPU ms/step"], distill_rows),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after the run"
        f"; total {minutes:.1f} min wall time.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report))
    print("\n".join(report))
    print(f"settings: {asdict(settings)}; wrote {args.out}")


if __name__ == "__main__":
    main()
