"""Sampling and training speed: one-step FMLM against FLM, MDLM and an AR model with a KV cache.

Every sampler makes ``batch`` sequences of ``length`` tokens over V = 63 ids with backbones of
one size: the DiT of FLM (one time input), of FMLM (two) and of MDLM (V + 1 ids on tokens),
and a causal transformer of the same width, depth and heads for AR. Weights are untrained (the
cost does not depend on them), dropout is off and sampling runs under ``torch.no_grad()``:

- FMLM, 1 step: ``rollout`` of the two-time denoiser map, then argmax;
- FLM, 8 and 32 steps: ``rollout`` of the Euler x-prediction map, then argmax;
- MDLM, 8 steps: ancestral sampling (``benchmarks/mdlm.py``);
- AR: token-by-token sampling with a KV cache (``length`` calls);

each in fp32 and under bf16 autocast. Sampler overhead, as in
``benchmarks/sampler_overhead.py``: the FLM 8-step and FMLM 1-step samplers against calling the
same DiT as many times on inputs of the same shape (the samplers' time includes the final
argmax). Training: one step of the FLM loss and of the FMLM v2 loss (zero_grad, loss,
backward) against a bare forward and backward of the same network (fp32, train mode). All
candidates of a group are timed interleaved (``benchmarks/timing.py``); medians over repeats
of wall-clock and thread CPU time, single torch thread by default. Verdicts use thread CPU
time, which other processes on a shared machine do not inflate.

Usage:
    python benchmarks/speed.py                  # batch 64, length 128: about 10 min on 2 cores
    python benchmarks/speed.py --quick          # seconds: tiny model, batch and length
    python benchmarks/speed.py --out-dir results --threads 1 --repeats 5

Writes ``<out-dir>/speed.json`` (rows of method, steps, precision, seconds_per_sample,
tokens_per_second, nfe; the overhead ratios; the training steps; targets; machine) and
``<out-dir>/speed.md`` (the tables, also printed).
"""

import argparse
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import Sampler, flow_sampler
from mdlm import MaskedDiffusion
from sampler_overhead import autocast_bf16, overhead, pass_fail, training_candidates
from timing import machine_context, time_interleaved

import flowlm as fl
from flowlm import distill
from flowlm.backbones import CausalTransformer, DiT

VOCAB_SIZE = 63
"""The character vocabulary of the King James Bible corpus."""
MDLM_SPEEDUP_TARGET = 4.0
OVERHEAD_TARGET = 0.03
FMLM, FLM_8, FLM_32, MDLM, AR = "FMLM 1", "FLM 8", "FLM 32", "MDLM 8", "AR (KV cache)"
"""Candidate names: a method and its steps."""
BARE_8, BARE_TWO_TIME = "bare DiT x8", "bare two-time DiT x1"
FLM_STEP, BARE_STEP = "flm_training_step", "bare_forward_backward"
"""The names `sampler_overhead.training_candidates` gives its two steps."""
FMLM_V2_STEP, BARE_TWO_TIME_STEP = "fmlm_v2_training_step", "bare_two_time_forward_backward"
PRECISIONS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "fp32": contextlib.nullcontext,
    "bf16 autocast": autocast_bf16,
}


@dataclass(frozen=True)
class Method:
    """A sampler timed at one number of steps."""

    name: str
    steps: int
    sampler: Sampler


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per candidate")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    arguments.vocab = VOCAB_SIZE  # the name sampler_overhead.training_candidates reads
    if arguments.quick:
        arguments.batch, arguments.length, arguments.dim = 2, 8, 16
        arguments.depth, arguments.heads, arguments.repeats = 1, 2, 2
    return arguments


def build_samplers(
    arguments: argparse.Namespace, generator: torch.Generator
) -> tuple[dict[str, Method], dict[str, Callable[[], object]], DiT]:
    """The timed methods, the bare-backbone loops they are compared with, and the FLM DiT."""
    batch, length, dim = arguments.batch, arguments.length, arguments.dim
    depth, heads = arguments.depth, arguments.heads

    def dit(vocab_size: int, two_time: bool) -> DiT:
        network = DiT(vocab_size, dim=dim, depth=depth, heads=heads, two_time=two_time, dropout=0.0)
        return network.eval()

    one_time, two_time = dit(VOCAB_SIZE, False), dit(VOCAB_SIZE, True)
    mdlm = MaskedDiffusion(dit(VOCAB_SIZE + 1, False), VOCAB_SIZE).eval()
    ar = CausalTransformer(VOCAB_SIZE, dim, depth, heads, max_len=length, dropout=0.0).eval()
    interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(VOCAB_SIZE))
    noise = torch.randn(batch, length, VOCAB_SIZE, generator=generator)
    flm = flow_sampler(fl.XPredMap(fl.XPredictor(one_time), interpolant), noise)
    fmlm = flow_sampler(fl.XPredMap(fl.XPredictor(two_time), interpolant, two_time=True), noise)

    def autoregressive(steps: int) -> tuple[fl.Tokens, int]:
        return ar.generate(batch, steps, generator=generator, use_cache=True), steps

    methods = {
        FMLM: Method("FMLM", 1, fmlm),
        FLM_8: Method("FLM", 8, flm),
        FLM_32: Method("FLM", 32, flm),
        MDLM: Method("MDLM", 8, lambda steps: mdlm.sample(batch, length, steps, generator)),
        AR: Method("AR (KV cache)", length, autoregressive),
    }
    times = [torch.full((batch,), float(t)) for t in fl.time_grid(8)[:-1]]

    def bare_one_time() -> object:
        with torch.no_grad():
            return [one_time(noise, t) for t in times]

    def bare_two_time() -> object:
        with torch.no_grad():
            return two_time(noise, times[0], torch.ones(batch))

    return methods, {BARE_8: bare_one_time, BARE_TWO_TIME: bare_two_time}, one_time


def method_call(
    name: str, steps: int, sampler: Sampler, nfe: dict[str, int]
) -> Callable[[], object]:
    """Sample once; record the network calls counted under ``name``."""

    def call() -> object:
        tokens, nfe[name] = sampler(steps)
        return tokens

    return call


def in_precision(
    precision: Callable[[], contextlib.AbstractContextManager], call: Callable[[], object]
) -> Callable[[], object]:
    def call_in_precision() -> object:
        with precision():
            return call()

    return call_in_precision


def label(name: str, precision: str) -> str:
    return f"{name} | {precision}"


def v2_training_candidates(
    teacher: DiT, arguments: argparse.Namespace, generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    """One FMLM v2 step (semigroup KL + diagonal KL to the teacher) and a bare two-time step."""
    batch, length = arguments.batch, arguments.length
    student = DiT(
        VOCAB_SIZE, arguments.dim, arguments.depth, arguments.heads, two_time=True, dropout=0.0
    )
    distill.init_student(student, teacher)
    student.train()
    interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(VOCAB_SIZE))
    student_map = fl.XPredMap(fl.XPredictor(student), interpolant, two_time=True)
    teacher_predictor = fl.XPredictor(teacher)
    tokens = torch.randint(VOCAB_SIZE, (batch, length), generator=generator)
    bare_state = torch.randn(batch, length, VOCAB_SIZE, generator=generator)
    bare_t, bare_s = torch.rand(batch, generator=generator), torch.ones(batch)

    def v2_step() -> None:
        student.zero_grad(set_to_none=True)
        pair = fl.time_pairs(batch, boundary_prob=0.1, min_gap=1e-3, generator=generator)
        x1 = fl.one_hot(tokens, VOCAB_SIZE)
        x_t = interpolant.sample(torch.randn(x1.shape, generator=generator), x1, pair.t)
        loss = distill.semigroup_kl_loss(student_map, teacher_predictor, x_t, pair.t, pair.s)
        fl.masked_mean(loss).backward()

    def bare_step() -> None:
        student.zero_grad(set_to_none=True)
        student(bare_state, bare_t, bare_s).sum().backward()

    return {FMLM_V2_STEP: v2_step, BARE_TWO_TIME_STEP: bare_step}


def sampling_report(
    arguments: argparse.Namespace, generator: torch.Generator
) -> tuple[list[dict[str, object]], list[dict[str, object]], DiT]:
    """Rows of every method in every precision, and the overhead ratios."""
    methods, bare, one_time = build_samplers(arguments, generator)
    nfe: dict[str, int] = {}
    timings = {}
    for precision, context in PRECISIONS.items():  # one precision at a time, see time_interleaved
        candidates: dict[str, Callable[[], object]] = {}
        for name, method in methods.items():
            call = method_call(name, method.steps, method.sampler, nfe)
            candidates[label(name, precision)] = in_precision(context, call)
        for name, loop in bare.items():
            candidates[label(name, precision)] = in_precision(context, loop)
        timings |= time_interleaved(candidates, arguments.repeats, calls=1, warmup=1)
    tokens = arguments.batch * arguments.length
    rows = []
    for precision in PRECISIONS:
        for name, method in methods.items():
            timing = timings[label(name, precision)]
            rows.append(
                {
                    "method": method.name,
                    "steps": method.steps,
                    "precision": precision,
                    "seconds_per_sample": timing.median / arguments.batch,
                    "tokens_per_second": tokens / timing.median,
                    "nfe": nfe[name],
                    "candidate": name,
                    "cpu_seconds_per_sample": timing.cpu_median / arguments.batch,
                    "cpu_tokens_per_second": tokens / timing.cpu_median,
                    "seconds_per_batch": timing.summary(1.0),
                }
            )
    ratios = [
        {
            "sampler": sampler,
            "baseline": baseline,
            "precision": precision,
            **overhead(timings, label(sampler, precision), label(baseline, precision)),
        }
        for precision in PRECISIONS
        for sampler, baseline in ((FLM_8, BARE_8), (FMLM, BARE_TWO_TIME))
    ]
    return rows, ratios, one_time


def training_report(
    one_time: DiT, arguments: argparse.Namespace, generator: torch.Generator
) -> list[dict[str, object]]:
    """FLM and FMLM v2 training steps against bare forward-backward passes (fp32)."""
    one_time.train()
    candidates = training_candidates(one_time, arguments, generator)
    candidates |= v2_training_candidates(one_time, arguments, generator)
    timings = time_interleaved(candidates, arguments.repeats, calls=1, warmup=1)
    return [
        {
            "step": step,
            "baseline": baseline,
            "step_seconds": timings[step].summary(1.0),
            "baseline_seconds": timings[baseline].summary(1.0),
            "wall_ratio": timings[step].median / timings[baseline].median,
            "cpu_ratio": timings[step].cpu_median / timings[baseline].cpu_median,
        }
        for step, baseline in (
            (FLM_STEP, BARE_STEP),
            (FMLM_V2_STEP, BARE_TWO_TIME_STEP),
        )
    ]


def row_for(rows: list[dict[str, object]], candidate: str, precision: str) -> dict[str, object]:
    return next(r for r in rows if r["candidate"] == candidate and r["precision"] == precision)


def evaluate_targets(
    rows: list[dict[str, object]], ratios: list[dict[str, object]]
) -> list[dict[str, object]]:
    """The speed targets, per precision, on thread CPU seconds per sample."""
    targets: list[dict[str, object]] = []
    for precision in PRECISIONS:
        fmlm = float(row_for(rows, FMLM, precision)["cpu_seconds_per_sample"])
        mdlm = float(row_for(rows, MDLM, precision)["cpu_seconds_per_sample"])
        ar = float(row_for(rows, AR, precision)["cpu_seconds_per_sample"])
        targets += [
            {
                "target": f"FMLM 1 step >= {MDLM_SPEEDUP_TARGET:g}x faster per sample than "
                f"MDLM 8 steps ({precision})",
                "value": mdlm / fmlm,
                "threshold": MDLM_SPEEDUP_TARGET,
                "pass": mdlm / fmlm >= MDLM_SPEEDUP_TARGET,
            },
            {
                "target": f"FMLM 1 step faster per sample than AR with a KV cache ({precision})",
                "value": ar / fmlm,
                "threshold": 1.0,
                "pass": ar / fmlm > 1.0,
            },
        ]
    targets += [
        {
            "target": f"{ratio['sampler']} sampler overhead over {ratio['baseline']} "
            f"<= {OVERHEAD_TARGET:.0%} ({ratio['precision']})",
            "value": ratio["cpu_overhead"],
            "threshold": OVERHEAD_TARGET,
            "pass": float(ratio["cpu_overhead"]) <= OVERHEAD_TARGET,
        }
        for ratio in ratios
    ]
    return targets


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"Batch {setup['batch']}, length {setup['length']}, V {setup['vocab']}; DiT and causal "
        f"transformer of width {setup['dim']}, depth {setup['depth']}, heads {setup['heads']} "
        f"(DiT {setup['dit_parameters']:,} parameters), untrained; {report['repeats']} "
        f"interleaved repeats, medians; torch threads {report['machine']['torch_threads']}; "
        f"load average before {report['load_average_before']}, after "
        f"{report['machine']['load_average_1_5_15min']}.",
        "Verdicts on thread CPU time (not inflated by other processes); wall-clock shown too.",
        "",
        "| method | steps | NFE | precision | s/sample wall | s/sample CPU | tokens/s wall | "
        "tokens/s CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['method']} | {row['steps']} | {row['nfe']} | {row['precision']} | "
            f"{row['seconds_per_sample']:.5f} | {row['cpu_seconds_per_sample']:.5f} | "
            f"{row['tokens_per_second']:,.0f} | {row['cpu_tokens_per_second']:,.0f} |"
        )
    lines += ["", "| sampler | bare backbone | precision | overhead wall | overhead CPU |"]
    lines.append("|---|---|---|---|---|")
    for ratio in report["overhead"]:
        lines.append(
            f"| {ratio['sampler']} | {ratio['baseline']} | {ratio['precision']} | "
            f"{ratio['wall_overhead']:+.2%} | {ratio['cpu_overhead']:+.2%} |"
        )
    lines += ["", "| training step (fp32) | baseline | step s (CPU) | baseline s (CPU) | "]
    lines[-1] += "ratio wall | ratio CPU |"
    lines.append("|---|---|---|---|---|---|")
    for step in report["training"]:
        lines.append(
            f"| {step['step']} | {step['baseline']} | {step['step_seconds']['cpu_median']:.3f} | "
            f"{step['baseline_seconds']['cpu_median']:.3f} | {step['wall_ratio']:.2f}x | "
            f"{step['cpu_ratio']:.2f}x |"
        )
    lines += ["", "| target | value | threshold | verdict |", "|---|---|---|---|"]
    for target in report["targets"]:
        lines.append(
            f"| {target['target']} | {target['value']:.3f} | {target['threshold']:g} | "
            f"{pass_fail(bool(target['pass']))} |"
        )
    return "\n".join(lines)


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    load_before = [round(value, 2) for value in machine_context()["load_average_1_5_15min"]]
    torch.manual_seed(arguments.seed)
    generator = torch.Generator().manual_seed(arguments.seed)
    rows, ratios, one_time = sampling_report(arguments, generator)
    training = training_report(one_time, arguments, generator)
    report = {
        "benchmark": "speed",
        "quick": arguments.quick,
        "setup": {
            "batch": arguments.batch,
            "length": arguments.length,
            "vocab": VOCAB_SIZE,
            "dim": arguments.dim,
            "depth": arguments.depth,
            "heads": arguments.heads,
            "dit_parameters": sum(p.numel() for p in one_time.parameters()),
        },
        "repeats": arguments.repeats,
        "speed_verdict_measure": "thread CPU time (time.thread_time), medians",
        "load_average_before": load_before,
        "machine": machine_context(),
        "rows": rows,
        "overhead": ratios,
        "training": training,
        "targets": evaluate_targets(rows, ratios),
    }
    arguments.out_dir.mkdir(parents=True, exist_ok=True)
    path = arguments.out_dir / "speed.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (arguments.out_dir / "speed.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
