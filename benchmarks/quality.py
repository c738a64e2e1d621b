"""Sample quality of FMLM, FLM, MDLM and an autoregressive model, scored by one judge.

Every method learns character-level windows of the King James Bible (V = 63) with the same
backbone size, the same batches and the same budget of optimizer steps x batch: the AR
baseline (``benchmarks/autoregressive.py``), MDLM (``benchmarks/mdlm.py``), FLM
(``examples/flm.py``'s training loop) and, when the package is installed, the outside peer
(``benchmarks/peer_flow_matching.py``). FMLM students are distilled from that FLM with
``examples/fmlm.py``'s loop, one per method, for a further distillation budget (per stage for
v1). Each model samples at several step counts from fixed seeds (AR at its natural L steps);
the judge (``benchmarks/judge.py``) scores the samples, and the held-out books give the "data"
row. Training and sampling run in fp32 on one torch thread.

Samplers: FLM, the Euler x-prediction map on a uniform model-time grid (decoding-accuracy
clock), FMLM, the two-time denoiser map on the same grid, both from Gaussian noise with an
argmax at the end; MDLM, ancestral sampling with float64 Gumbel-max; AR, multinomial at
temperature 1 with a KV cache; the peer, the package's discrete Euler solver.

Usage:
    python benchmarks/quality.py --preset quick     # < 20 min on 2 cores: L 32, DiT 96 x 3
    python benchmarks/quality.py --preset full      # < 2 h on 2 cores: L 64, DiT 128 x 4
    python benchmarks/quality.py --preset smoke --results-dir /tmp/q   # seconds, for tests

Writes ``<results-dir>/quality.json`` (a list of rows: method, steps, nfe, judge_ppl, entropy,
distinct_2, seconds_per_sample, samples, ...), ``quality.md`` (the table, the targets, the
settings and the time of each phase), ``quality.png`` (judge PPL and entropy against steps)
and ``quality_run.json`` (settings, judge, targets, phases, load). Checkpoints are cached in
``<results-dir>/cache/`` under a hash of their settings and reused by later runs; the judge is
cached at ``<results-dir>/judge_L{length}.pt``.
"""

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import judge as judge_module
import peer_flow_matching
import torch
from autoregressive import generate
from autoregressive import train as train_autoregressive
from harness import (
    ONE_PROCESS,
    Phase,
    Sampler,
    checkpoint_path,
    examples_common,
    examples_flm,
    examples_fmlm,
    flow_sampler,
    load_corpus,
    timed,
    train_on_tokens,
)
from matplotlib.figure import Figure
from mdlm import MaskedDiffusion

import flowlm as fl
from flowlm.backbones import CausalTransformer, DiT
from flowlm.data import TextCorpus
from flowlm.metrics import DistinctN, GenerativePerplexity, TokenEntropy

Config = examples_common.Config

SHOWN_EXAMPLES = 3
SCORING_BATCH = 256
ENTROPY_TOLERANCE = 0.05


@dataclass(frozen=True)
class Preset:
    """What a run trains and samples.

    Attributes:
        model: the settings shared by AR, MDLM, FLM and the peer (examples ``Config``).
        judge: the judge's settings (same length).
        distill_steps: distillation steps of each FMLM student (per stage for v1).
        distill_lr: their peak learning rate.
        fmlm_methods: the ``examples/fmlm.py`` methods distilled.
        sample_steps: step counts of FLM, MDLM and the peer.
        fmlm_steps: step counts of the FMLM students.
        samples: samples per cell (and held-out windows in the data row).
    """

    model: Config
    judge: Config
    distill_steps: int
    distill_lr: float
    fmlm_methods: tuple[str, ...]
    sample_steps: tuple[int, ...]
    fmlm_steps: tuple[int, ...]
    samples: int


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        model=Config(
            length=8,
            dim=16,
            depth=1,
            heads=2,
            steps=4,
            batch_size=8,
            lr=1e-3,
            warmup=2,
            log_every=2,
            eval_every=4,
            sample_every=4,
            checkpoint_every=4,
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
        model=Config(
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
            eval_every=700,
            sample_every=700,
            checkpoint_every=700,
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
        model=Config(
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
            eval_every=2000,
            sample_every=2000,
            checkpoint_every=2000,
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


class Scorer:
    """Judge perplexity, entropy and distinct-2 of a set of samples (the torchmetrics metrics)."""

    def __init__(self, judge: CausalTransformer, task: examples_common.Task) -> None:
        self.judge = judge
        self.task = task

    def __call__(self, tokens: fl.Tokens) -> dict[str, object]:
        perplexity = GenerativePerplexity(self.judge.token_nll)
        entropy = TokenEntropy()
        distinct = DistinctN(self.task.vocab_size, n=2)
        for batch in tokens.split(SCORING_BATCH):
            perplexity.update(batch)
            entropy.update(batch)
            distinct.update(batch)
        return {
            "judge_ppl": perplexity.compute().item(),
            "entropy": entropy.compute().item(),
            "distinct_2": distinct.compute().item(),
            "samples": len(tokens),
            "examples": self.task.decode(tokens[:SHOWN_EXAMPLES]),
        }


def sample_rows(
    method: str, sampler: Sampler, steps: tuple[int, ...], score: Scorer
) -> list[dict[str, object]]:
    """Sample at each step count (timed: wall and thread CPU seconds) and score the samples."""
    rows = []
    for n_steps in steps:
        wall, cpu = time.perf_counter(), time.thread_time()
        tokens, nfe = sampler(n_steps)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        row: dict[str, object] = {"method": method, "steps": n_steps, "nfe": nfe}
        row |= score(tokens)
        row |= {
            "seconds_per_sample": wall / len(tokens),
            "cpu_seconds_per_sample": cpu / len(tokens),
        }
        print(
            f"   {method} {n_steps} step(s): judge PPL {row['judge_ppl']:.2f}, entropy "
            f"{row['entropy']:.3f}, {row['examples'][0]!r}",
            flush=True,
        )
        rows.append(row)
    return rows


def masked_backbone(config: Config, vocab_size: int) -> DiT:
    """The DiT of MDLM and the peer: integer tokens with a MASK id, logits over V + 1 ids."""
    return examples_common.build_backbone(config, vocab_size + 1)


def train_flm(config: Config, task: examples_common.Task, path: Path, threads: int) -> DiT:
    """Train FLM with ``examples/flm.py``'s loop (checkpoint at ``path``) unless cached."""
    if not path.exists():
        torch.manual_seed(config.seed)
        backbone = examples_common.build_backbone(config, task.vocab_size)
        interpolant = examples_common.build_interpolant(config, task.vocab_size)
        ema = examples_common.make_ema(backbone, config.ema_decay)
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=config.lr, weight_decay=0.0)
        options = examples_common.Options(path, False, False, None, threads, False)
        examples_flm.train(
            config, options, task, backbone, interpolant, ema, optimizer, 0, ONE_PROCESS
        )
    return examples_fmlm.load_teacher(path, ONE_PROCESS.device)[0]


def distill(
    method_name: str,
    config: Config,
    task: examples_common.Task,
    teacher: DiT,
    teacher_path: Path,
    path: Path,
    threads: int,
) -> DiT:
    """Distil an FMLM student with ``examples/fmlm.py``'s stages, or load them from ``path``."""
    torch.manual_seed(config.seed)
    interpolant = examples_common.build_interpolant(config, task.vocab_size)
    method = examples_fmlm.Method(name=method_name, teacher=str(teacher_path))
    stages = examples_fmlm.build_stages(method, config, teacher, interpolant, task.vocab_size)
    options = examples_common.Options(path, True, False, None, threads, False)
    saved = examples_common.load_checkpoint(path) if path.exists() else None
    for stage in stages:
        report = examples_fmlm.train_stage(
            stage, config, method, options, task, interpolant, ONE_PROCESS, saved
        )
        saved = report["checkpoint"]
    return stages[-1].network.eval()


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
        verdict = "PASS" if target["pass"] else "FAIL"
        lines.append(
            f"| {target['target']} | {describe(target['value'], 3)} | "
            f"{describe(target.get('reference'), 3)} | {verdict} |"
        )
    lines += ["", "Phases (thread CPU time is the work done on one torch thread):", ""]
    lines += [
        "| phase | wall s | CPU s | load before | load after | cached |",
        "|---|---|---|---|---|---|",
    ]
    for phase in run["phases"]:
        lines.append(
            f"| {phase['name']} | {phase['wall_seconds']:.1f} | {phase['cpu_seconds']:.1f} | "
            f"{phase['load_before'][0]:.2f} | {phase['load_after'][0]:.2f} | "
            f"{'yes' if phase['cached'] else 'no'} |"
        )
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


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-peer", action="store_true", help="leave out flow_matching")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    preset = PRESETS[arguments.preset]
    config, results = preset.model, arguments.results_dir
    if preset.judge.length != config.length:
        raise ValueError("the judge must be trained on windows of the samples' length")
    cache = results / "cache"
    use_peer = peer_flow_matching.available() and not arguments.no_peer
    phases: list[Phase] = []
    started = time.perf_counter(), time.thread_time()
    load_start = os.getloadavg()
    print(f"quality preset {arguments.preset}: load average {load_start}", flush=True)

    task = examples_common.build_task(config)
    vocab_size = task.vocab_size
    judge_path = judge_module.judge_path(results, config.length)
    with timed("judge", phases, cached=judge_path.exists()):
        judge_task = examples_common.build_task(preset.judge)
        judge = judge_module.load_or_train(preset.judge, judge_task, results)
        corpus = load_corpus()
        judge_report = judge_module.held_out_report(judge, corpus, config.length)
        judge_report["config"] = dataclasses.asdict(preset.judge)
    score = Scorer(judge, task)
    rows = [data_row(corpus, config.length, preset.samples, score)]

    settings = dataclasses.asdict(config)
    path = checkpoint_path(cache, "ar", settings)
    with timed("AR: train", phases, cached=path.exists()):
        ar = train_autoregressive(config, task, path)
    with timed("AR: sample and score", phases):
        generator = examples_common.seeded_generator(config.seed, "quality-ar")
        rows += sample_rows(
            "AR",
            lambda _: (generate(ar, preset.samples, config.length, generator), config.length),
            (config.length,),
            score,
        )

    path = checkpoint_path(cache, "mdlm", settings)
    with timed("MDLM: train", phases, cached=path.exists()):
        torch.manual_seed(config.seed)
        mdlm = MaskedDiffusion(masked_backbone(config, vocab_size), vocab_size)
        mdlm_ema = train_on_tokens(mdlm, mdlm.loss, config, task, path, "MDLM")
        if not isinstance(mdlm_ema, MaskedDiffusion):
            raise TypeError(f"expected MaskedDiffusion, got {type(mdlm_ema).__name__}")
    with timed("MDLM: sample and score", phases):
        rows += sample_rows(
            "MDLM",
            lambda n: mdlm_ema.sample(
                preset.samples,
                config.length,
                n,
                examples_common.seeded_generator(config.seed, "quality-mdlm", n),
            ),
            preset.sample_steps,
            score,
        )

    noise = torch.randn(
        (preset.samples, config.length, vocab_size),
        generator=examples_common.seeded_generator(config.seed, "quality-noise"),
    )
    interpolant = examples_common.build_interpolant(config, vocab_size)
    flm_path = checkpoint_path(cache, "flm", settings)
    with timed("FLM: train", phases, cached=flm_path.exists()):
        teacher = train_flm(config, task, flm_path, arguments.threads)
    with timed("FLM: sample and score", phases):
        flm_map = fl.XPredMap(fl.XPredictor(teacher), interpolant)
        rows += sample_rows("FLM", flow_sampler(flm_map, noise), preset.sample_steps, score)

    distill_config = replace(
        config,
        steps=preset.distill_steps,
        lr=preset.distill_lr,
        warmup=min(20, preset.distill_steps),
        ema_decay=0.99,
        checkpoint_every=preset.distill_steps,
        log_every=max(1, preset.distill_steps // 5),
    )
    diverged: list[str] = []
    for method in preset.fmlm_methods:
        key = dataclasses.asdict(distill_config) | {"teacher": flm_path.name}
        path = checkpoint_path(cache, f"fmlm-{method}", key)
        with timed(f"FMLM {method}: distil", phases, cached=path.exists()):
            student = distill(
                method, distill_config, task, teacher, flm_path, path, arguments.threads
            )
        if not all(bool(torch.isfinite(p).all()) for p in student.parameters()):
            print(f"   FMLM {method} diverged: non-finite weights in {path}", flush=True)
            diverged.append(method)
            continue
        with timed(f"FMLM {method}: sample and score", phases):
            student_map = fl.XPredMap(fl.XPredictor(student), interpolant, two_time=True)
            rows += sample_rows(
                f"FMLM {method}", flow_sampler(student_map, noise), preset.fmlm_steps, score
            )

    if use_peer:
        path = checkpoint_path(cache, "flow-matching", settings)
        with timed("flow_matching: train", phases, cached=path.exists()):
            torch.manual_seed(config.seed)
            peer = peer_flow_matching.MaskedFlowMatching(
                masked_backbone(config, vocab_size), vocab_size
            )
            peer_ema = train_on_tokens(peer, peer.loss, config, task, path, "flow_matching")
            if not isinstance(peer_ema, peer_flow_matching.MaskedFlowMatching):
                raise TypeError(f"expected MaskedFlowMatching, got {type(peer_ema).__name__}")
        with timed("flow_matching: sample and score", phases):
            rows += sample_rows(
                "flow_matching",
                lambda n: peer_ema.sample(preset.samples, config.length, n, config.seed + n),
                preset.sample_steps,
                score,
            )

    run: dict[str, object] = {
        "benchmark": "quality",
        "preset": arguments.preset,
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
        "targets": evaluate_targets(rows, preset.fmlm_methods),
        "phases": [phase.as_dict() for phase in phases],
        "total_seconds": {
            "wall": time.perf_counter() - started[0],
            "cpu": time.thread_time() - started[1],
        },
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / "quality_run.json").write_text(json.dumps(run, indent=2) + "\n")
    table = markdown(rows, run)
    (results / "quality.md").write_text(table + "\n")
    title = (
        f"KJV characters, L = {config.length}, {preset.samples} samples per point; "
        f"judge PPL {judge_report['validation_ppl']:.2f} on held-out books"
    )
    plot(rows, results / "quality.png", title)
    print(table)
    print(f"\nwrote {results / 'quality.json'}, quality.md, quality.png and quality_run.json")


if __name__ == "__main__":
    main()
