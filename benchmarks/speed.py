"""Sampling and training speed: one-step FMLM against FLM, MDLM and AR, and flowlm's overhead.

Every sampler makes ``batch`` sequences of ``length`` tokens over V = 63 ids with backbones of
one size: the DiT of FLM (one time input), of FMLM (two) and of MDLM (V + 1 ids on tokens),
and a causal transformer of the same width, depth and heads for AR. Weights are untrained (the
cost does not depend on them), dropout is off and sampling runs under ``torch.no_grad()``:

- FMLM, 1 step: ``rollout`` of the two-time denoiser map, then argmax;
- FLM, 8 and 32 steps: ``rollout`` of the Euler x-prediction map, then argmax;
- MDLM, 8 steps: ancestral sampling (``benchmarks/mdlm.py``);
- AR: token-by-token sampling with a KV cache (``length`` calls);

each in fp32 and under bf16 autocast. Sampler overhead: the FLM 8-step and FMLM 1-step
samplers against calling the same DiT as many times on inputs of the same shape (the samplers'
time includes the final argmax); because a 3 % difference of two noisy medians is hard to
resolve, flowlm's own cost is also measured alone, as the same 8-step rollout with a backbone
that returns zeros. Training: one step of the FLM loss and of the FMLM v2 loss (zero_grad,
loss, backward) against a bare forward and backward of the same network (fp32, train mode).
All candidates of a group are timed interleaved (`harness.time_interleaved`); medians over
repeats of wall-clock and thread CPU time, single torch thread by default. Verdicts use thread
CPU time, which other processes on a shared machine do not inflate.

Usage:
    python benchmarks/speed.py                  # batch 64, length 128: about 10 min on 2 cores
    python benchmarks/speed.py --quick          # seconds: tiny model, batch and length
    python benchmarks/speed.py --out-dir results --threads 1 --repeats 5

Writes ``<out-dir>/speed.json`` (rows of method, steps, precision, seconds_per_sample,
tokens_per_second, nfe; the overhead ratios; the training steps; targets; machine) and
``speed.md`` (the tables, also printed), and the overhead alone in ``sampler_overhead.json``
and ``sampler_overhead.md``.
"""

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from harness import (
    Sampler,
    Timing,
    describe_machine,
    flm_interpolant,
    flow_sampler,
    load_average,
    machine_context,
    parse_flags,
    positive_int,
    print_verdicts,
    time_interleaved,
    verdict,
    write_results,
)
from mdlm import MaskedDiffusion

import flowlm as fl
from flowlm import distill
from flowlm.backbones import CausalTransformer, DiT

VOCAB_SIZE = 63
"""The character vocabulary of the King James Bible corpus."""
MDLM_SPEEDUP_TARGET = 4.0
OVERHEAD_TARGET = 0.03
FMLM, FLM_8, FLM_32, MDLM, AR = "FMLM 1", "FLM 8", "FLM 32", "MDLM 8", "AR (KV cache)"
"""Candidate names: a method and its steps."""
BARE_8, BARE_TWO_TIME, LIBRARY_8 = "bare DiT x8", "bare two-time DiT x1", "FLM 8, zero backbone"
FLM_STEP, BARE_STEP = "flm_training_step", "bare_forward_backward"
FMLM_V2_STEP, BARE_TWO_TIME_STEP = "fmlm_v2_training_step", "bare_two_time_forward_backward"
PRECISIONS: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
    "fp32": contextlib.nullcontext,
    "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}
OVERHEAD_PAIRS = ((FLM_8, BARE_8), (FMLM, BARE_TWO_TIME))
"""(sampler, the bare backbone calls it is compared with)."""


@dataclass(frozen=True)
class Method:
    """A sampler timed at one number of steps."""

    name: str
    steps: int
    sampler: Sampler


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--depth", type=positive_int, default=4)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats")


def build_samplers(
    arguments: argparse.Namespace, generator: torch.Generator
) -> tuple[dict[str, Method], dict[str, Callable[[], object]], DiT]:
    """The timed methods, the loops they are compared with, and the FLM DiT."""
    batch, length, dim = arguments.batch, arguments.length, arguments.dim
    depth, heads = arguments.depth, arguments.heads

    def dit(vocab_size: int, two_time: bool) -> DiT:
        network = DiT(vocab_size, dim=dim, depth=depth, heads=heads, two_time=two_time, dropout=0.0)
        return network.eval()

    one_time, two_time = dit(VOCAB_SIZE, False), dit(VOCAB_SIZE, True)
    mdlm = MaskedDiffusion(dit(VOCAB_SIZE + 1, False), VOCAB_SIZE).eval()
    ar = CausalTransformer(VOCAB_SIZE, dim, depth, heads, max_len=length, dropout=0.0).eval()
    noise = torch.randn(batch, length, VOCAB_SIZE, generator=generator)
    path = flm_interpolant(VOCAB_SIZE)
    flm = flow_sampler(fl.XPredMap(fl.XPredictor(one_time), path), noise)
    fmlm = flow_sampler(fl.XPredMap(fl.XPredictor(two_time), path, two_time=True), noise)

    def zero_backbone(x_t: fl.State, t: fl.Time) -> fl.Logits:
        return torch.zeros_like(x_t)

    library_only = flow_sampler(fl.XPredMap(fl.XPredictor(zero_backbone), path), noise)

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

    @torch.no_grad()
    def bare_one_time() -> object:
        return [one_time(noise, t) for t in times]

    @torch.no_grad()
    def bare_two_time() -> object:
        return two_time(noise, times[0], torch.ones(batch))

    loops = {
        BARE_8: bare_one_time,
        BARE_TWO_TIME: bare_two_time,
        LIBRARY_8: lambda: library_only(8),
    }
    return methods, loops, one_time


def in_precision(precision: str, call: Callable[[], object]) -> Callable[[], object]:
    def call_in_precision() -> object:
        with PRECISIONS[precision]():
            return call()

    return call_in_precision


def label(name: str, precision: str) -> str:
    return f"{name} | {precision}"


def training_candidates(
    teacher: DiT, arguments: argparse.Namespace, generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    """One FLM step and one FMLM v2 step, each with a bare forward-backward of its network."""
    batch, length = arguments.batch, arguments.length
    student = DiT(
        VOCAB_SIZE, arguments.dim, arguments.depth, arguments.heads, two_time=True, dropout=0.0
    )
    distill.init_student(student, teacher)
    teacher.train()
    student.train()
    path = flm_interpolant(VOCAB_SIZE)
    teacher_predictor = fl.XPredictor(teacher)
    student_map = fl.XPredMap(fl.XPredictor(student), path, two_time=True)
    tokens = torch.randint(VOCAB_SIZE, (batch, length), generator=generator)
    x1 = fl.one_hot(tokens, VOCAB_SIZE)
    bare_state = torch.randn(batch, length, VOCAB_SIZE, generator=generator)
    bare_t, bare_s = torch.rand(batch, generator=generator), torch.ones(batch)

    def flm_step() -> None:
        teacher.zero_grad(set_to_none=True)
        t = fl.uniform_times(batch, generator=generator)
        x_t = path.sample(torch.randn(x1.shape, generator=generator), x1, t)
        fl.masked_mean(fl.cross_entropy(teacher_predictor.logits(x_t, t), tokens)).backward()

    def bare_step() -> None:
        teacher.zero_grad(set_to_none=True)
        teacher(bare_state, bare_t).sum().backward()

    def v2_step() -> None:
        student.zero_grad(set_to_none=True)
        pair = fl.time_pairs(batch, boundary_prob=0.1, min_gap=1e-3, generator=generator)
        x_t = path.sample(torch.randn(x1.shape, generator=generator), x1, pair.t)
        loss = distill.semigroup_kl_loss(student_map, teacher_predictor, x_t, pair.t, pair.s)
        fl.masked_mean(loss).backward()

    def bare_two_time_step() -> None:
        student.zero_grad(set_to_none=True)
        student(bare_state, bare_t, bare_s).sum().backward()

    return {
        FLM_STEP: flm_step,
        BARE_STEP: bare_step,
        FMLM_V2_STEP: v2_step,
        BARE_TWO_TIME_STEP: bare_two_time_step,
    }


def overhead(timings: dict[str, Timing], method: str, baseline: str) -> dict[str, float]:
    wrapped, bare = timings[method], timings[baseline]
    return {
        "wall_overhead": wrapped.median / bare.median - 1.0,
        "cpu_overhead": wrapped.cpu_median / bare.cpu_median - 1.0,
    }


def sampling_report(
    arguments: argparse.Namespace, generator: torch.Generator
) -> tuple[list[dict[str, object]], dict[str, Timing], DiT]:
    """Rows of every method in every precision, and all the sampling timings."""
    methods, loops, one_time = build_samplers(arguments, generator)
    nfe: dict[str, int] = {}

    def sample_once(name: str, method: Method) -> Callable[[], object]:
        def call() -> object:
            tokens, nfe[name] = method.sampler(method.steps)
            return tokens

        return call

    timings: dict[str, Timing] = {}
    for precision in PRECISIONS:  # one precision at a time, see time_interleaved
        candidates = {
            label(name, precision): in_precision(precision, sample_once(name, method))
            for name, method in methods.items()
        }
        candidates |= {
            label(name, precision): in_precision(precision, loop) for name, loop in loops.items()
        }
        timings |= time_interleaved(candidates, arguments.repeats)
    tokens = arguments.batch * arguments.length
    rows: list[dict[str, object]] = []
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
                    "seconds_per_batch": timing.summary(),
                }
            )
    return rows, timings, one_time


def overhead_ratios(timings: dict[str, Timing]) -> list[dict[str, object]]:
    return [
        {
            "sampler": sampler,
            "baseline": baseline,
            "precision": precision,
            **overhead(timings, label(sampler, precision), label(baseline, precision)),
        }
        for precision in PRECISIONS
        for sampler, baseline in OVERHEAD_PAIRS
    ]


def library_only(timings: dict[str, Timing]) -> list[dict[str, object]]:
    """flowlm's own cost per 8-step rollout, and its share of the bare backbone's 8 calls."""
    return [
        {
            "name": LIBRARY_8,
            "precision": precision,
            "seconds_per_rollout": timings[label(LIBRARY_8, precision)].summary(),
            "cpu_fraction_of_bare_backbone": timings[label(LIBRARY_8, precision)].cpu_median
            / timings[label(BARE_8, precision)].cpu_median,
        }
        for precision in PRECISIONS
    ]


def training_report(timings: dict[str, Timing]) -> list[dict[str, object]]:
    return [
        {
            "step": step,
            "baseline": baseline,
            "step_seconds": timings[step].summary(),
            "baseline_seconds": timings[baseline].summary(),
            "wall_ratio": timings[step].median / timings[baseline].median,
            "cpu_ratio": timings[step].cpu_median / timings[baseline].cpu_median,
        }
        for step, baseline in ((FLM_STEP, BARE_STEP), (FMLM_V2_STEP, BARE_TWO_TIME_STEP))
    ]


def cpu_per_sample(rows: list[dict[str, Any]], candidate: str, precision: str) -> float:
    """Thread CPU seconds per sample of one candidate in one precision."""
    return next(
        float(r["cpu_seconds_per_sample"])
        for r in rows
        if r["candidate"] == candidate and r["precision"] == precision
    )


def evaluate_targets(
    rows: list[dict[str, Any]], ratios: list[dict[str, Any]]
) -> list[dict[str, object]]:
    """The speed targets, per precision, on thread CPU seconds per sample."""
    targets: list[dict[str, object]] = []
    for precision in PRECISIONS:
        fmlm = cpu_per_sample(rows, FMLM, precision)
        mdlm = cpu_per_sample(rows, MDLM, precision)
        ar = cpu_per_sample(rows, AR, precision)
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
    for ratio in ratios:
        value = float(ratio["cpu_overhead"])
        targets.append(
            {
                "target": f"{ratio['sampler']} sampler overhead over {ratio['baseline']} "
                f"<= {OVERHEAD_TARGET:.0%} ({ratio['precision']})",
                "value": value,
                "threshold": OVERHEAD_TARGET,
                "pass": value <= OVERHEAD_TARGET,
            }
        )
    return targets


def setup_line(report: dict[str, Any]) -> str:
    setup = report["setup"]
    return (
        f"Batch {setup['batch']}, length {setup['length']}, V {setup['vocab']}; DiT and causal "
        f"transformer of width {setup['dim']}, depth {setup['depth']}, heads {setup['heads']} "
        f"(DiT {setup['dit_parameters']:,} parameters), untrained; {report['repeats']} "
        f"interleaved repeats, medians; load average before {report['load_average_before']}; "
        f"after: {describe_machine(report['machine'])}."
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        setup_line(report),
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
    lines += ["", overhead_table(report)]
    lines += [
        "",
        "| training step (fp32) | baseline | step s (CPU) | baseline s (CPU) | ratio wall | "
        "ratio CPU |",
        "|---|---|---|---|---|---|",
    ]
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
            f"{verdict(bool(target['pass']))} |"
        )
    return "\n".join(lines)


def overhead_table(report: dict[str, Any]) -> str:
    """The sampler overhead and flowlm's own cost (the table of ``sampler_overhead.md``)."""
    lines = [
        f"| sampler | bare backbone | precision | overhead wall | overhead CPU | "
        f"target <= {OVERHEAD_TARGET:.0%} |",
        "|---|---|---|---|---|---|",
    ]
    for ratio in report["overhead"]:
        lines.append(
            f"| {ratio['sampler']} | {ratio['baseline']} | {ratio['precision']} | "
            f"{ratio['wall_overhead']:+.2%} | {ratio['cpu_overhead']:+.2%} | "
            f"{verdict(ratio['cpu_overhead'] <= OVERHEAD_TARGET)} |"
        )
    lines += [
        "",
        "flowlm's own cost, measured alone (the FLM 8-step rollout with a backbone returning "
        "zeros):",
        "",
        "| rollout | CPU s per rollout | share of the bare backbone's 8 calls |",
        "|---|---|---|",
    ]
    for cost in report["library_only"]:
        lines.append(
            f"| {cost['name']} ({cost['precision']}) | "
            f"{cost['seconds_per_rollout']['cpu_median']:.4f} | "
            f"{cost['cpu_fraction_of_bare_backbone']:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    if arguments.quick:
        arguments.batch, arguments.length, arguments.dim = 2, 8, 16
        arguments.depth, arguments.heads, arguments.repeats = 1, 2, 2
    load_before = load_average()
    torch.manual_seed(arguments.seed)
    generator = torch.Generator().manual_seed(arguments.seed)
    rows, sampling, one_time = sampling_report(arguments, generator)
    training = time_interleaved(
        training_candidates(one_time, arguments, generator), arguments.repeats
    )
    ratios = overhead_ratios(sampling)
    report: dict[str, Any] = {
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
        "library_only": library_only(sampling),
        "training": training_report(training),
        "targets": evaluate_targets(rows, ratios),
    }
    write_results(arguments.out_dir, "speed", report, markdown(report))
    overhead_report = {
        key: report[key]
        for key in ("quick", "setup", "repeats", "load_average_before", "machine", "overhead")
    }
    overhead_report |= {
        "benchmark": "sampler_overhead",
        "library_only": report["library_only"],
        "overhead_max": OVERHEAD_TARGET,
    }
    overhead_markdown = f"{setup_line(report)}\n\n{overhead_table(report)}"
    write_results(arguments.out_dir, "sampler_overhead", overhead_report, overhead_markdown)
    print_verdicts(report["targets"])


if __name__ == "__main__":
    main()
