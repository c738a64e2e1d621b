"""Sample quality of FMLM, FLM, MDLM and an autoregressive model, scored by one judge.

Every method learns character-level windows of the King James Bible (V = 63) with the same
backbone size, the same batches and the same budget of optimizer steps x batch, all with the
recipe of `harness.train_on_tokens`: the AR baseline (``benchmarks/autoregressive.py``), MDLM
(``benchmarks/mdlm.py``), FLM (cross-entropy x-prediction on the decoding-accuracy clock, with
`flowlm`'s interpolant and predictor) and, when the package is installed, the outside peer
(``benchmarks/peer_flow_matching.py``). FMLM students are distilled from that FLM with the
losses of `flowlm.distill`, one per method (as ``examples/fmlm.py --method`` names them), for
a further distillation budget (per stage for v1). Each model samples at several step counts from fixed seeds (AR at its natural L steps);
the judge (``benchmarks/judge.py``) scores the samples, and the held-out books give the "data"
row. Training and sampling run in fp32 on one torch thread.

Samplers: FLM, the Euler x-prediction map on a uniform model-time grid (decoding-accuracy
clock), FMLM, the two-time denoiser map on the same grid, both from Gaussian noise with an
argmax at the end; MDLM, ancestral sampling with float64 Gumbel-max; AR, multinomial at
temperature 1 with a KV cache; the peer, the package's discrete Euler solver.

Usage:
    python benchmarks/quality.py --preset quick     # < 20 min on 2 cores: L 32, DiT 96 x 3
    python benchmarks/quality.py --preset full      # < 2 h on 2 cores: L 64, DiT 128 x 4
    python benchmarks/quality.py --preset smoke --results-dir /tmp/q   # seconds (or --quick)

Writes ``<results-dir>/quality.json`` (a list of rows: method, steps, nfe, judge_ppl, entropy,
distinct_2, seconds_per_sample, samples, ...), ``quality.md`` (the table, the targets, the
settings and the time of each phase), ``quality.png`` (judge PPL and entropy against steps)
and ``quality_run.json`` (settings, judge, targets, phases, load). Checkpoints are cached in
``<results-dir>/cache/`` under a hash of their settings and reused by later runs; the judge is
cached at ``<results-dir>/judge_L{length}.pt``.
"""

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import judge as judge_module
import peer_flow_matching
import torch
from autoregressive import generate
from autoregressive import train as train_autoregressive
from harness import (
    Phase,
    Sampler,
    TokenObjective,
    TrainingSettings,
    checkpoint_path,
    clock,
    flm_interpolant,
    flow_sampler,
    load_average,
    load_corpus,
    machine_context,
    parse_flags,
    phase_table,
    print_verdicts,
    seeded_generator,
    stopwatch,
    timed,
    train_on_tokens,
    verdict,
    write_results,
)
from matplotlib.figure import Figure
from mdlm import MaskedDiffusion
from torch import nn

import flowlm as fl
from flowlm import distill
from flowlm.backbones import CausalTransformer, DiT
from flowlm.data import TextCorpus
from flowlm.metrics import DistinctN, GenerativePerplexity, TokenEntropy

SHOWN_EXAMPLES = 3
SCORING_BATCH = 256
ENTROPY_TOLERANCE = 0.05


@dataclass(frozen=True)
class Preset:
    """What a run trains and samples.

    Attributes:
        model: the settings shared by AR, MDLM, FLM and the peer.
        judge: the judge's settings (same length).
        distill_steps: distillation steps of each FMLM student (per stage for v1).
        distill_lr: their peak learning rate.
        fmlm_methods: the distillation methods (``examples/fmlm.py --method`` names).
        sample_steps: step counts of FLM, MDLM and the peer.
        fmlm_steps: step counts of the FMLM students.
        samples: samples per cell (and held-out windows in the data row).
    """

    model: TrainingSettings
    judge: TrainingSettings
    distill_steps: int
    distill_lr: float
    fmlm_methods: tuple[str, ...]
    sample_steps: tuple[int, ...]
    fmlm_steps: tuple[int, ...]
    samples: int


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        model=TrainingSettings(
            length=8,
            dim=16,
            depth=1,
            heads=2,
            steps=4,
            batch_size=8,
            lr=1e-3,
            warmup=2,
            log_every=2,
        ),
        judge=judge_module.JUDGES["smoke"],
        distill_steps=2,
        distill_lr=1e-3,
        fmlm_methods=("v2", "v1"),
        sample_steps=(1, 8),
        fmlm_steps=(1, 2),
        samples=16,
    ),
    "quick": Preset(
        model=TrainingSettings(
            length=32,
            dim=96,
            depth=3,
            heads=4,
            steps=700,
            batch_size=32,
            lr=1e-3,
            warmup=50,
            ema_decay=0.995,
            log_every=100,
        ),
        judge=judge_module.JUDGES["quick"],
        distill_steps=250,
        distill_lr=5e-4,
        fmlm_methods=("v2", "lagrangian", "v1"),
        sample_steps=(1, 2, 4, 8, 16, 32, 128),
        fmlm_steps=(1, 2, 4, 8),
        samples=256,
    ),
    "full": Preset(
        model=TrainingSettings(
            length=64,
            dim=128,
            depth=4,
            heads=4,
            steps=2000,
            batch_size=32,
            lr=1e-3,
            warmup=100,
            schedule="cosine",
            ema_decay=0.998,
            log_every=250,
        ),
        judge=judge_module.JUDGES["full"],
        distill_steps=400,
        distill_lr=5e-4,
        fmlm_methods=("v2", "lagrangian", "eulerian", "self", "regression", "v1"),
        sample_steps=(1, 2, 4, 8, 16, 32, 128),
        fmlm_steps=(1, 2, 4, 8, 16, 32),
        samples=256,
    ),
}

SAMPLERS = {
    "AR": "multinomial, temperature 1, KV cache (one call per token)",
    "MDLM": "ancestral, float64 Gumbel-max, uniform t grid",
    "FLM": "Euler x-prediction map, uniform model-time grid, decoding-accuracy clock, argmax",
    "FMLM": "two-time denoiser map, uniform model-time grid, argmax",
    "flow_matching": "flow_matching MixtureDiscreteEulerSolver, masked source, kappa_t = t",
}


BOUNDARY_PROB = {"v1-stage1": 1 / 64, "v1-stage2": 1 / 128}
"""Probability of the whole-path jump (0, 1) per example in v1's stages (the reference code's)."""
DEFAULT_BOUNDARY_PROB = 0.1
"""For the other methods: more one-step jumps than v1's 1/64 speed up one-step quality."""
MIN_GAP = {"v1-stage1": 1e-6, "v1-stage2": 1e-5}
DEFAULT_MIN_GAP = 1e-3
REGRESSION_TEACHER_STEPS = 8
"""The regression method's target: the teacher's rollout of this many Euler steps."""

JumpLoss = Callable[[fl.Tokens, fl.State, fl.Time, fl.Time], fl.TokenLoss]
"""A distillation objective on a batch: (tokens, x_t, t, s) -> per-token loss."""


class Scorer:
    """Judge perplexity, entropy and distinct-2 of a set of samples (the torchmetrics metrics)."""

    def __init__(self, judge: CausalTransformer, corpus: TextCorpus) -> None:
        self.judge = judge
        self.corpus = corpus

    def __call__(self, tokens: fl.Tokens) -> dict[str, object]:
        perplexity = GenerativePerplexity(self.judge.token_nll)
        entropy = TokenEntropy()
        distinct = DistinctN(self.corpus.tokenizer.vocab_size, n=2)
        for batch in tokens.split(SCORING_BATCH):
            perplexity.update(batch)
            entropy.update(batch)
            distinct.update(batch)
        return {
            "judge_ppl": perplexity.compute().item(),
            "entropy": entropy.compute().item(),
            "distinct_2": distinct.compute().item(),
            "samples": len(tokens),
            "examples": self.corpus.tokenizer.decode_batch(tokens[:SHOWN_EXAMPLES]),
        }


def sample_rows(
    method: str, sampler: Sampler, steps: tuple[int, ...], score: Scorer
) -> list[dict[str, object]]:
    """Sample at each step count (timed: wall and thread CPU seconds) and score the samples."""
    rows = []
    for n_steps in steps:
        with stopwatch() as seconds:
            tokens, nfe = sampler(n_steps)
        row: dict[str, object] = {"method": method, "steps": n_steps, "nfe": nfe}
        row |= score(tokens)
        row |= {
            "seconds_per_sample": seconds.wall / len(tokens),
            "cpu_seconds_per_sample": seconds.cpu / len(tokens),
        }
        print(
            f"   {method} {n_steps} step(s): judge PPL {row['judge_ppl']:.2f}, entropy "
            f"{row['entropy']:.3f}, {row['examples'][0]!r}",
            flush=True,
        )
        rows.append(row)
    return rows


def backbone(settings: TrainingSettings, vocab_size: int, two_time: bool = False) -> DiT:
    """The DiT of the settings' size."""
    return DiT(
        vocab_size,
        dim=settings.dim,
        depth=settings.depth,
        heads=settings.heads,
        two_time=two_time,
        dropout=settings.dropout,
    )


def as_dit(network: nn.Module) -> DiT:
    if not isinstance(network, DiT):
        raise TypeError(f"expected a DiT, got {type(network).__name__}")
    return network


def train_flm(settings: TrainingSettings, corpus: TextCorpus, path: Path) -> DiT:
    """FLM: cross-entropy of the x-prediction at x_t on the path (or load it from ``path``)."""
    vocab_size = corpus.tokenizer.vocab_size
    torch.manual_seed(settings.seed)
    network = backbone(settings, vocab_size)
    predictor, path_of_flm = fl.XPredictor(network), flm_interpolant(vocab_size)

    def objective(tokens: fl.Tokens, generator: torch.Generator) -> torch.Tensor:
        x1 = fl.one_hot(tokens, vocab_size)
        t = fl.uniform_times(len(tokens), generator=generator)
        x_t = path_of_flm.sample(torch.randn(x1.shape, generator=generator), x1, t)
        return fl.masked_mean(fl.cross_entropy(predictor.logits(x_t, t), tokens))

    teacher = train_on_tokens(network, objective, settings, corpus, path, "FLM")
    return as_dit(teacher).requires_grad_(False)


def jump_objective(stage: str, loss: JumpLoss, vocab_size: int) -> TokenObjective:
    """``loss`` at time pairs (t, s) of the stage's distribution and x_t on FLM's path."""
    path_of_flm = flm_interpolant(vocab_size)

    def objective(tokens: fl.Tokens, generator: torch.Generator) -> torch.Tensor:
        pair = fl.time_pairs(
            len(tokens),
            boundary_prob=BOUNDARY_PROB.get(stage, DEFAULT_BOUNDARY_PROB),
            min_gap=MIN_GAP.get(stage, DEFAULT_MIN_GAP),
            generator=generator,
        )
        x1 = fl.one_hot(tokens, vocab_size)
        x_t = path_of_flm.sample(torch.randn(x1.shape, generator=generator), x1, pair.t)
        return fl.masked_mean(loss(tokens, x_t, pair.t, pair.s))

    return objective


def distil(
    method: str,
    settings: TrainingSettings,
    corpus: TextCorpus,
    teacher: DiT,
    path_of: Callable[[str], Path],
) -> DiT:
    """Distil an FMLM student from ``teacher`` with ``method``, or load it from its checkpoints.

    The student is the teacher's DiT plus a second time embedding that starts at zero
    (`flowlm.distill.init_student`). v1 first trains a Taylor correction (2 NFE per step) by
    semigroup self-distillation, then regresses a one-network student onto that frozen map.
    ``path_of(stage)`` names each stage's checkpoint.
    """
    vocab_size = corpus.tokenizer.vocab_size
    torch.manual_seed(settings.seed)
    teacher_predictor, path_of_flm = fl.XPredictor(teacher), flm_interpolant(vocab_size)

    def student_network(zero_output: bool) -> DiT:
        network = backbone(settings, vocab_size, two_time=True)
        distill.init_student(network, teacher, zero=["output"] if zero_output else [])
        return network

    def train(stage: str, network: nn.Module, loss: JumpLoss) -> nn.Module:
        objective = jump_objective(stage, loss, vocab_size)
        label = f"FMLM {stage}"
        return train_on_tokens(network, objective, settings, corpus, path_of(stage), label, stage)

    student = student_network(zero_output=False)
    student_map = fl.XPredMap(fl.XPredictor(student), path_of_flm, two_time=True)
    if method != "v1":
        many_steps = fl.XPredMap(teacher_predictor, path_of_flm)
        regression_target = fl.Substeps(many_steps, REGRESSION_TEACHER_STEPS)

        def loss(tokens: fl.Tokens, x_t: fl.State, t: fl.Time, s: fl.Time) -> fl.TokenLoss:
            match method:
                case "v2":
                    return distill.semigroup_kl_loss(student_map, teacher_predictor, x_t, t, s)
                case "lagrangian":
                    return distill.lagrangian_kl_loss(student_map, teacher_predictor, x_t, t, s)
                case "eulerian":
                    return distill.eulerian_kl_loss(student_map, teacher_predictor, x_t, t, s)
                case "self":
                    return distill.self_semigroup_loss(student_map, tokens, x_t, t, s)
                case "regression":
                    return distill.map_regression_kl_loss(student_map, regression_target, x_t, t, s)
                case _:
                    raise ValueError(f"unknown distillation method {method!r}")

        return as_dit(train(method, student, loss))

    velocity = fl.XPredVelocity(teacher_predictor, path_of_flm)
    correction, weighting = student_network(zero_output=True), fl.LearnedTimeWeighting()
    taylor = fl.TaylorMap(velocity, correction)

    def taylor_loss(tokens: fl.Tokens, x_t: fl.State, t: fl.Time, s: fl.Time) -> fl.TokenLoss:
        return weighting(distill.taylor_semigroup_loss(taylor, x_t, t, s), t)

    stage_1 = train(
        "v1-stage1", nn.ModuleDict({"correction": correction, "weighting": weighting}), taylor_loss
    )
    frozen_taylor = fl.TaylorMap(velocity, as_dit(stage_1.get_submodule("correction")))
    frozen_taylor.requires_grad_(False)

    def regression_loss(tokens: fl.Tokens, x_t: fl.State, t: fl.Time, s: fl.Time) -> fl.TokenLoss:
        return distill.map_regression_loss(student_map, frozen_taylor, x_t, t, s)

    return as_dit(train("v1-stage2", student, regression_loss))


def row_of(
    rows: list[dict[str, object]], method: str, steps: int | None
) -> dict[str, object] | None:
    return next((r for r in rows if r["method"] == method and r["steps"] == steps), None)


def evaluate_targets(
    rows: list[dict[str, object]], methods: tuple[str, ...]
) -> list[dict[str, object]]:
    """One-step FMLM against eight-step MDLM (judge PPL) and the data (entropy within 5 %)."""
    data, mdlm_8 = row_of(rows, "data", None), row_of(rows, "MDLM", 8)
    targets: list[dict[str, object]] = []
    for method in methods:
        one_step = row_of(rows, f"FMLM {method}", 1)
        if data is None or mdlm_8 is None:
            continue
        if one_step is None:  # diverged: no samples, both targets fail
            targets += [
                {"target": f"FMLM {method} 1-step: {name}", "value": None, "pass": False}
                for name in ("judge PPL (diverged)", "entropy (diverged)")
            ]
            continue
        ppl, bound = float(one_step["judge_ppl"]), float(mdlm_8["judge_ppl"])
        entropy, reference = float(one_step["entropy"]), float(data["entropy"])
        targets += [
            {
                "target": f"FMLM {method} 1-step judge PPL <= MDLM 8-step judge PPL",
                "value": ppl,
                "reference": bound,
                "pass": ppl <= bound,
            },
            {
                "target": f"FMLM {method} 1-step entropy within 5% of the data row's",
                "value": entropy,
                "reference": reference,
                "pass": abs(entropy / reference - 1.0) <= ENTROPY_TOLERANCE,
            },
        ]
    return targets


def plot(rows: list[dict[str, object]], path: Path, title: str) -> None:
    """Judge PPL against steps (log-log) and entropy against steps, one line per method."""
    figure = Figure(figsize=(12, 4.5))
    ppl_axis, entropy_axis = figure.subplots(1, 2)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows if r["method"] != "data"))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        steps = [int(r["steps"]) for r in mine]
        marker = "s" if len(mine) == 1 else "o"
        ppl_axis.plot(steps, [r["judge_ppl"] for r in mine], marker=marker, label=method)
        entropy_axis.plot(steps, [r["entropy"] for r in mine], marker=marker, label=method)
    data = row_of(rows, "data", None)
    if data is not None:
        ppl_axis.axhline(float(data["judge_ppl"]), color="black", linestyle="--", label="data")
        entropy_axis.axhline(float(data["entropy"]), color="black", linestyle="--", label="data")
    for axis, label in ((ppl_axis, "judge perplexity"), (entropy_axis, "unigram entropy (nats)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sampling steps")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    ppl_axis.set_yscale("log")
    entropy_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)  # a PNG drawn by matplotlib's Agg canvas


def describe(value: object, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def markdown(rows: list[dict[str, object]], run: dict[str, object]) -> str:
    model, judge_report = run["model"], run["judge"]
    lines = [
        f"Preset `{run['preset']}`: character-level King James Bible (V = {run['vocab_size']}), "
        f"windows of L = {model['length']}. AR, MDLM, FLM{' and the peer' if run['peer'] else ''}: "
        f"{model['steps']} steps of batch {model['batch_size']} (same batches), lr {model['lr']}, "
        f"EMA {model['ema_decay']}; backbone width {model['dim']}, depth {model['depth']}, "
        f"heads {model['heads']} (DiT; AR: a causal transformer of the same size). FMLM: that "
        f"FLM plus {run['distill_steps']} distillation steps of batch {model['batch_size']} "
        f"(per stage for v1), methods {', '.join(run['fmlm_methods'])}.",
        f"Judge: causal transformer width {judge_report['config']['dim']}, depth "
        f"{judge_report['config']['depth']}, {judge_report['config']['steps']} steps; perplexity "
        f"{judge_report['validation_ppl']:.3f} on {judge_report['validation_windows']} held-out "
        f"windows. {run['samples']} samples per cell, fixed seeds; fp32 throughout, "
        f"{run['torch_threads']} torch thread(s).",
        "Samplers: " + "; ".join(f"{name}: {text}" for name, text in SAMPLERS.items()) + ".",
        "",
        "| method | steps | NFE | judge PPL | entropy | distinct-2 | s/sample wall | "
        "s/sample CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['steps'] if row['steps'] is not None else '-'} | "
            f"{row['nfe'] if row['nfe'] is not None else '-'} | {row['judge_ppl']:.3f} | "
            f"{row['entropy']:.3f} | {row['distinct_2']:.3f} | "
            f"{describe(row['seconds_per_sample'], 5)} | "
            f"{describe(row['cpu_seconds_per_sample'], 5)} |"
        )
    lines += ["", "Targets (written for the quick preset; evaluated on every run):", ""]
    lines += ["| target | value | reference | verdict |", "|---|---|---|---|"]
    for target in run["targets"]:
        lines.append(
            f"| {target['target']} | {describe(target['value'], 3)} | "
            f"{describe(target.get('reference'), 3)} | {verdict(target['pass'])} |"
        )
    lines += ["", "Phases (thread CPU time is the work done on one torch thread):", ""]
    lines += phase_table(run["phases"])
    if run["diverged"]:
        lines.append(f"\nDiverged (non-finite weights, no samples): {', '.join(run['diverged'])}.")
    total = run["total_seconds"]
    lines.append(f"\nTotal: {total['wall']:.0f} s wall, {total['cpu']:.0f} s CPU.")
    return "\n".join(lines)


def data_row(corpus: TextCorpus, length: int, count: int, score: Scorer) -> dict[str, object]:
    """The held-out books: ``count`` evenly spaced windows, scored like samples."""
    windows = corpus.fixed_windows("validation", length, count=count)
    row: dict[str, object] = {"method": "data", "steps": None, "nfe": None} | score(windows)
    return row | {"seconds_per_sample": None, "cpu_seconds_per_sample": None}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--no-peer", action="store_true", help="leave out flow_matching")


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    preset_name = "smoke" if arguments.quick else arguments.preset
    preset = PRESETS[preset_name]
    config, results = replace(preset.model, seed=arguments.seed), arguments.out_dir
    if preset.judge.length != config.length:
        raise ValueError("the judge must be trained on windows of the samples' length")
    cache = results / "cache"
    use_peer = peer_flow_matching.available() and not arguments.no_peer
    phases: list[Phase] = []
    started = clock()
    load_start = load_average()
    print(f"quality preset {preset_name}: load average {load_start}", flush=True)

    corpus = load_corpus()
    vocab_size = corpus.tokenizer.vocab_size
    judge_path = judge_module.judge_path(results, config.length)
    with timed("judge", phases, cached=judge_path.exists()):
        judge = judge_module.load_or_train(preset.judge, corpus, results)
        judge_report: dict[str, Any] = judge_module.held_out_report(judge, corpus, config.length)
        judge_report["config"] = dataclasses.asdict(preset.judge)
    score = Scorer(judge, corpus)
    rows = [data_row(corpus, config.length, preset.samples, score)]

    settings = dataclasses.asdict(config)
    path = checkpoint_path(cache, "ar", settings)
    with timed("AR: train", phases, cached=path.exists()):
        ar = train_autoregressive(config, corpus, path)
    with timed("AR: sample and score", phases):
        generator = seeded_generator(config.seed, "quality-ar")
        rows += sample_rows(
            "AR",
            lambda _: (generate(ar, preset.samples, config.length, generator), config.length),
            (config.length,),
            score,
        )

    path = checkpoint_path(cache, "mdlm", settings)
    with timed("MDLM: train", phases, cached=path.exists()):
        torch.manual_seed(config.seed)
        mdlm = MaskedDiffusion(backbone(config, vocab_size + 1), vocab_size)
        mdlm_ema = train_on_tokens(mdlm, mdlm.loss, config, corpus, path, "MDLM")
        if not isinstance(mdlm_ema, MaskedDiffusion):
            raise TypeError(f"expected MaskedDiffusion, got {type(mdlm_ema).__name__}")
    with timed("MDLM: sample and score", phases):
        rows += sample_rows(
            "MDLM",
            lambda n: mdlm_ema.sample(
                preset.samples,
                config.length,
                n,
                seeded_generator(config.seed, "quality-mdlm", n),
            ),
            preset.sample_steps,
            score,
        )

    noise = torch.randn(
        (preset.samples, config.length, vocab_size),
        generator=seeded_generator(config.seed, "quality-noise"),
    )
    flm_path = checkpoint_path(cache, "flm", settings)
    with timed("FLM: train", phases, cached=flm_path.exists()):
        teacher = train_flm(config, corpus, flm_path)
    with timed("FLM: sample and score", phases):
        flm_map = fl.XPredMap(fl.XPredictor(teacher), flm_interpolant(vocab_size))
        rows += sample_rows("FLM", flow_sampler(flm_map, noise), preset.sample_steps, score)

    distill_config = replace(
        config,
        steps=preset.distill_steps,
        lr=preset.distill_lr,
        warmup=min(20, preset.distill_steps),
        ema_decay=0.99,
        log_every=max(1, preset.distill_steps // 5),
    )
    key = dataclasses.asdict(distill_config) | {"teacher": flm_path.name}
    diverged: list[str] = []
    for method in preset.fmlm_methods:

        def path_of(stage: str) -> Path:
            return checkpoint_path(cache, f"fmlm-{stage}", key)

        final = path_of("v1-stage2" if method == "v1" else method)
        with timed(f"FMLM {method}: distil", phases, cached=final.exists()):
            try:
                student = distil(method, distill_config, corpus, teacher, path_of)
            except FloatingPointError as error:
                print(f"   FMLM {method} diverged: {error}", flush=True)
                diverged.append(method)
                continue
        with timed(f"FMLM {method}: sample and score", phases):
            student_map = fl.XPredMap(
                fl.XPredictor(student), flm_interpolant(vocab_size), two_time=True
            )
            rows += sample_rows(
                f"FMLM {method}", flow_sampler(student_map, noise), preset.fmlm_steps, score
            )

    if use_peer:
        path = checkpoint_path(cache, "flow-matching", settings)
        with timed("flow_matching: train", phases, cached=path.exists()):
            torch.manual_seed(config.seed)
            peer = peer_flow_matching.MaskedFlowMatching(
                backbone(config, vocab_size + 1), vocab_size
            )
            peer_ema = train_on_tokens(peer, peer.loss, config, corpus, path, "flow_matching")
            if not isinstance(peer_ema, peer_flow_matching.MaskedFlowMatching):
                raise TypeError(f"expected MaskedFlowMatching, got {type(peer_ema).__name__}")
        with timed("flow_matching: sample and score", phases):
            rows += sample_rows(
                "flow_matching",
                lambda n: peer_ema.sample(preset.samples, config.length, n, config.seed + n),
                preset.sample_steps,
                score,
            )

    targets = evaluate_targets(rows, preset.fmlm_methods)
    run: dict[str, Any] = {
        "benchmark": "quality",
        "preset": preset_name,
        "vocab_size": vocab_size,
        "model": settings,
        "distill": dataclasses.asdict(distill_config),
        "distill_steps": preset.distill_steps,
        "fmlm_methods": list(preset.fmlm_methods),
        "peer": use_peer,
        "peer_note": None if use_peer else "flow_matching not installed or --no-peer",
        "samples": preset.samples,
        "precision": "fp32 training and sampling",
        "samplers": SAMPLERS,
        "torch_threads": torch.get_num_threads(),
        "judge": judge_report,
        "diverged": diverged,
        "targets": targets,
        "phases": [dataclasses.asdict(phase) for phase in phases],
        "total_seconds": dataclasses.asdict(clock() - started),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "machine": machine_context(),
    }
    write_results(results, "quality", rows, markdown(rows, run))
    write_results(results, "quality_run", run)
    title = (
        f"KJV characters, L = {config.length}, {preset.samples} samples per point; "
        f"judge PPL {judge_report['validation_ppl']:.2f} on held-out books"
    )
    plot(rows, results / "quality.png", title)
    print(f"wrote {results / 'quality.png'}")
    print_verdicts(targets)


if __name__ == "__main__":
    main()
