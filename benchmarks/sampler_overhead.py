"""What flowlm's sampling loop and FLM loss cost on top of the bare backbone.

Sampling: ``rollout(XPredMap(XPredictor(dit), LinearInterpolant(TokenAccuracy(V))), noise,
time_grid(n))`` against calling the same DiT n times on inputs of the same shapes, both under
``torch.no_grad()`` in eval mode, in fp32 and under bf16 autocast. Training: one FLM step
(stratified times, x_t from the path, logits, per-token cross-entropy, masked mean, backward)
against a bare DiT forward and backward of ``logits.sum()`` on the same shapes, in train mode.
All candidates are timed interleaved (medians over repeats, wall-clock and thread CPU time).
Because a 3 % difference of two noisy medians is hard to resolve, flowlm's own cost is also
measured alone: the same rollout with a backbone that returns zeros.

Usage:
    python benchmarks/sampler_overhead.py               # full run, several minutes on 2 cores
    python benchmarks/sampler_overhead.py --quick       # seconds: tiny model and batch
    python benchmarks/sampler_overhead.py --out-dir results --threads 1 --repeats 7

Writes ``<out-dir>/sampler_overhead.json`` and ``<out-dir>/sampler_overhead.md`` (the markdown
table, also printed).
"""

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from timing import Timing, machine_context, time_interleaved

import flowlm
from flowlm.backbones import DiT

OVERHEAD_TARGET = 0.03


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per candidate")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.batch, arguments.length, arguments.dim = 2, 8, 16
        arguments.depth, arguments.heads, arguments.steps, arguments.repeats = 1, 2, 2, 2
    return arguments


def autocast_bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def sampling_candidates(
    dit: DiT, arguments: argparse.Namespace, generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    vocab_size, batch = arguments.vocab, arguments.batch
    interpolant = flowlm.LinearInterpolant(reparam=flowlm.TokenAccuracy(vocab_size))
    flow_map = flowlm.XPredMap(flowlm.XPredictor(dit), interpolant)
    grid = flowlm.time_grid(arguments.steps)
    noise = torch.randn(batch, arguments.length, vocab_size, generator=generator)
    step_times = [torch.full((batch,), float(time)) for time in grid[:-1]]

    def sample() -> torch.Tensor:
        trajectory = flowlm.rollout(flow_map, noise, grid)
        if trajectory.nfe != arguments.steps:
            raise RuntimeError(f"rollout made {trajectory.nfe} calls, not {arguments.steps}")
        return trajectory.x

    def call_backbone() -> torch.Tensor:
        with torch.no_grad():
            for time in step_times:
                logits = dit(noise, time)
        return logits

    def sample_bf16() -> torch.Tensor:
        with autocast_bf16():
            return sample()

    def call_backbone_bf16() -> torch.Tensor:
        with autocast_bf16():
            return call_backbone()

    return {
        "rollout_fp32": sample,
        "bare_backbone_fp32": call_backbone,
        "rollout_bf16_autocast": sample_bf16,
        "bare_backbone_bf16_autocast": call_backbone_bf16,
    }


def zero_backbone(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_t)


def library_only_candidates(
    arguments: argparse.Namespace, generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    """The same rollout with a backbone that returns zeros: flowlm's own cost, measured alone."""
    vocab_size = arguments.vocab
    interpolant = flowlm.LinearInterpolant(reparam=flowlm.TokenAccuracy(vocab_size))
    flow_map = flowlm.XPredMap(flowlm.XPredictor(zero_backbone), interpolant)
    grid = flowlm.time_grid(arguments.steps)
    noise = torch.randn(arguments.batch, arguments.length, vocab_size, generator=generator)

    def sample() -> torch.Tensor:
        return flowlm.rollout(flow_map, noise, grid).x

    def sample_bf16() -> torch.Tensor:
        with autocast_bf16():
            return sample()

    return {"library_only_fp32": sample, "library_only_bf16_autocast": sample_bf16}


def training_candidates(
    dit: DiT, arguments: argparse.Namespace, generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    vocab_size, batch = arguments.vocab, arguments.batch
    interpolant = flowlm.LinearInterpolant(reparam=flowlm.TokenAccuracy(vocab_size))
    predictor = flowlm.XPredictor(dit)
    tokens = torch.randint(vocab_size, (batch, arguments.length), generator=generator)
    mask = torch.ones(batch, arguments.length, dtype=torch.bool)
    bare_state = torch.randn(batch, arguments.length, vocab_size, generator=generator)
    bare_time = torch.rand(batch, generator=generator)

    def flm_step() -> None:
        dit.zero_grad(set_to_none=True)
        t = flowlm.uniform_times(batch, generator=generator)
        x1 = flowlm.one_hot(tokens, vocab_size)
        x0 = torch.randn(x1.shape, generator=generator)
        x_t = interpolant.sample(x0, x1, t)
        loss = flowlm.masked_mean(flowlm.cross_entropy(predictor.logits(x_t, t), tokens), mask)
        loss.backward()

    def bare_step() -> None:
        dit.zero_grad(set_to_none=True)
        dit(bare_state, bare_time).sum().backward()

    return {"flm_training_step": flm_step, "bare_forward_backward": bare_step}


def overhead(timings: dict[str, Timing], method: str, baseline: str) -> dict[str, float]:
    wrapped, bare = timings[method], timings[baseline]
    return {
        "wall_overhead": wrapped.median / bare.median - 1.0,
        "cpu_overhead": wrapped.cpu_median / bare.cpu_median - 1.0,
    }


def pass_fail(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def markdown_table(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"DiT dim {setup['dim']}, depth {setup['depth']}, heads {setup['heads']}: "
        f"{setup['parameters']:,} parameters; batch {setup['batch']}, length {setup['length']}, "
        f"V {setup['vocab']}, {setup['steps']} steps; {report['repeats']} interleaved repeats; "
        f"torch threads {report['machine']['torch_threads']}; load average before "
        f"{report['load_average_before']}, after {report['machine']['load_average_1_5_15min']}.",
        f"Target: sampling overhead <= {OVERHEAD_TARGET:.0%} (verdict on thread CPU time, which "
        "a shared machine's preemptions do not inflate; wall-clock shown too).",
        "",
        "| comparison | flowlm s (wall, CPU) | bare s (wall, CPU) | overhead wall | "
        "overhead CPU | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        method, bare = row["method_seconds"], row["baseline_seconds"]
        target = pass_fail(row["pass"]) if row["pass"] is not None else "(no target)"
        lines.append(
            f"| {row['name']} | {method['wall_median']:.3f}, {method['cpu_median']:.3f} | "
            f"{bare['wall_median']:.3f}, {bare['cpu_median']:.3f} | "
            f"{row['wall_overhead']:+.2%} | {row['cpu_overhead']:+.2%} | {target} |"
        )
    lines += [
        "",
        "flowlm's own cost, measured alone (the same rollout with a backbone returning zeros):",
        "",
        "| rollout | CPU s per rollout | share of the bare backbone's calls |",
        "|---|---|---|",
    ]
    for cost in report["library_only"]:
        lines.append(
            f"| {cost['name']} | {cost['seconds_per_rollout']['cpu_median']:.4f} | "
            f"{cost['cpu_fraction_of_bare_backbone']:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    load_before = [round(value, 2) for value in machine_context()["load_average_1_5_15min"]]
    torch.manual_seed(arguments.seed)
    generator = torch.Generator().manual_seed(arguments.seed)
    dit = DiT(arguments.vocab, dim=arguments.dim, depth=arguments.depth, heads=arguments.heads)
    parameters = sum(parameter.numel() for parameter in dit.parameters())

    dit.eval()
    sampling = time_interleaved(
        sampling_candidates(dit, arguments, generator), arguments.repeats, calls=1, warmup=1
    )
    library_only = time_interleaved(
        library_only_candidates(arguments, generator), arguments.repeats, calls=5, warmup=2
    )
    dit.train()
    training = time_interleaved(
        training_candidates(dit, arguments, generator), arguments.repeats, calls=1, warmup=1
    )

    comparisons = [
        ("sampling fp32", sampling, "rollout_fp32", "bare_backbone_fp32", True),
        (
            "sampling bf16 autocast",
            sampling,
            "rollout_bf16_autocast",
            "bare_backbone_bf16_autocast",
            True,
        ),
        ("training step fp32", training, "flm_training_step", "bare_forward_backward", False),
    ]
    rows = []
    for name, timings, method, baseline, has_target in comparisons:
        ratios = overhead(timings, method, baseline)
        rows.append(
            {
                "name": name,
                "method": method,
                "baseline": baseline,
                "method_seconds": timings[method].summary(1.0),
                "baseline_seconds": timings[baseline].summary(1.0),
                **ratios,
                "pass": ratios["cpu_overhead"] <= OVERHEAD_TARGET if has_target else None,
            }
        )
    library_costs = [
        {
            "name": name,
            "seconds_per_rollout": library_only[name].summary(1.0),
            "cpu_fraction_of_bare_backbone": library_only[name].cpu_median
            / sampling[baseline].cpu_median,
        }
        for name, baseline in (
            ("library_only_fp32", "bare_backbone_fp32"),
            ("library_only_bf16_autocast", "bare_backbone_bf16_autocast"),
        )
    ]
    report = {
        "benchmark": "sampler_overhead",
        "quick": arguments.quick,
        "setup": {
            "dim": arguments.dim,
            "depth": arguments.depth,
            "heads": arguments.heads,
            "parameters": parameters,
            "batch": arguments.batch,
            "length": arguments.length,
            "vocab": arguments.vocab,
            "steps": arguments.steps,
        },
        "repeats": arguments.repeats,
        "targets": {"sampling_overhead_max": OVERHEAD_TARGET},
        "speed_verdict_measure": "thread CPU time (time.thread_time), single torch thread",
        "load_average_before": load_before,
        "machine": machine_context(),
        "rows": rows,
        "library_only": library_costs,
    }
    arguments.out_dir.mkdir(parents=True, exist_ok=True)
    path = arguments.out_dir / "sampler_overhead.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
