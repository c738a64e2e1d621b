"""alpha-repeat with the examples' default settings: one-step FMLM from an FLM teacher, timed.

The task: each sequence is one of 26 letters repeated 8 times; a sample is valid when all its
letters agree, and the letters covered count the distinct letters among the valid samples. This
benchmark runs the two examples by their command line with their defaults (only the thread
count, seed and the size of the final report are given): ``python examples/flm.py --task
alpha-repeat``, then ``python examples/fmlm.py --teacher TEACHER --method v2`` (and ``v1`` for
reference), each as a subprocess; its CPU time is the child's (user + system,
`resource.RUSAGE_CHILDREN`), start-up and sampling included.

Target (the examples' defaults): one-step v2 valid rate >= 0.9 with all 26 letters among the
samples, teacher plus distillation <= 15 CPU-minutes. ``--trend-steps`` also distils v2 from
the same teacher at other ``--steps`` (the rest of the defaults unchanged), for the trend of
the one-step rate with the distillation budget.

Usage:
    python benchmarks/alpha_repeat.py                          # about 10 CPU-minutes
    python benchmarks/alpha_repeat.py --methods v2 --trend-steps 1000 2000
    python benchmarks/alpha_repeat.py --quick --out-dir /tmp/a # seconds, for tests

Writes ``<out-dir>/alpha_repeat.json`` and ``<out-dir>/alpha_repeat.md``.
"""

import argparse
import tempfile
from pathlib import Path
from typing import Any

from distillation import ExampleFailed, run_example
from harness import (
    describe_machine,
    load_average,
    machine_context,
    parse_flags,
    positive_int,
    print_verdicts,
    verdict,
    write_results,
)

LETTERS = 26
METHODS = ("v2", "v1")
SAMPLE_STEPS = (1, 2, 4, 8)
TARGET = {"one_step_valid_min": 0.9, "letters_min": LETTERS, "cpu_seconds_max": 15 * 60}
QUICK_SAMPLES = 16


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=positive_int, default=1024)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--trend-steps",
        nargs="*",
        type=positive_int,
        default=[],
        help="more v2 distillations from the same teacher at these --steps",
    )


def shared_flags(arguments: argparse.Namespace) -> list[str]:
    """Flags of every run: threads, seed, and the final report's samples and step counts."""
    flags = ["--threads", str(arguments.threads), "--seed", str(arguments.seed)]
    flags += ["--samples", str(arguments.samples), "--sample-steps", *map(str, SAMPLE_STEPS)]
    return flags + (["--smoke"] if arguments.quick else [])


def measures(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per step count: the valid rate and the letters covered."""
    return {
        n: {
            "valid_rate": cell["valid_rate"],
            "letters": round(cell["mode_coverage"] * LETTERS),
            "entropy": cell["entropy"],
        }
        for n, cell in steps.items()
    }


def distil(label: str, argv: list[str], json_path: Path, teacher_cpu: float) -> dict[str, Any]:
    """One fmlm.py run: its measures, CPU and wall time, the teacher's CPU time added."""
    try:
        run = run_example("fmlm.py", argv, json_path)
    except ExampleFailed as error:  # e.g. a non-finite loss: reported, the others go on
        return {"label": label, "argv": argv, "error": str(error)}
    result = run.pop("result")
    total = teacher_cpu + run["cpu_seconds"]
    return {"label": label, "steps": measures(result["steps"]), "total_cpu_seconds": total} | run


def default_distillation(distillations: list[dict[str, Any]]) -> dict[str, Any]:
    """The run the target is about: v2 with every default (an error entry if not run)."""
    runs = [entry for entry in distillations if entry["label"] == "FMLM v2"]
    return runs[0] if runs else {"label": "FMLM v2", "error": "not run (--methods)"}


def target_met(entry: dict[str, Any]) -> bool:
    """Does a distillation (from the default teacher) meet the alpha-repeat target?"""
    if "error" in entry:
        return False
    one_step = entry["steps"]["1"]
    return (
        one_step["valid_rate"] >= TARGET["one_step_valid_min"]
        and one_step["letters"] >= TARGET["letters_min"]
        and entry["total_cpu_seconds"] <= TARGET["cpu_seconds_max"]
    )


def cell(metrics: dict[str, Any] | None) -> str:
    return "" if metrics is None else f"{metrics['valid_rate']:.3f} / {metrics['letters']}"


def table_row(entry: dict[str, Any], total: str) -> str:
    if "error" in entry:
        return f"| {entry['label']} | error: {entry['error']} |"
    cells = " | ".join(cell(entry["steps"].get(str(n))) for n in SAMPLE_STEPS)
    return f"| {entry['label']} | {cells} | {entry['cpu_seconds']:.0f} | {total} |"


def markdown(report: dict[str, Any]) -> str:
    teacher = report["teacher"]
    lines = [
        f"{report['samples']} samples per cell from fixed noise (seed {report['seed']}), fp32, "
        f"argmax at the end; load average before {report['load_average_before']}, after: "
        f"{describe_machine(report['machine'])}.",
        "",
        f"Teacher: `python examples/flm.py {' '.join(teacher['argv'])}`; distillation: "
        "`python examples/fmlm.py --teacher TEACHER --method METHOD` with the same flags "
        "(and `--steps N` for the trend rows). Cells: valid rate / letters covered (of 26). "
        "CPU-s: the example's process; total: teacher plus distillation.",
        "",
        "| model | " + " | ".join(f"{n} step(s)" for n in SAMPLE_STEPS) + " | CPU-s | total |",
        "|---|" + "---|" * len(SAMPLE_STEPS) + "---|---|",
        table_row(teacher | {"label": "FLM teacher (Euler)"}, ""),
    ]
    for entry in report["distillations"]:
        total = f"{entry['total_cpu_seconds']:.0f}" if "total_cpu_seconds" in entry else ""
        lines.append(table_row(entry, total))
    v2 = default_distillation(report["distillations"])
    gap = ""
    if "error" not in v2:
        one_step = v2["steps"]["1"]
        short = TARGET["one_step_valid_min"] - one_step["valid_rate"]
        gap = (
            f" (one-step valid rate {one_step['valid_rate']:.3f}"
            + (f", {short:.3f} short" if short > 0 else "")
            + f", {one_step['letters']} letters, {v2['total_cpu_seconds'] / 60:.1f} CPU-minutes)"
        )
    lines += [
        "",
        f"Target: default v2 one-step valid rate >= {TARGET['one_step_valid_min']} with all "
        f"{LETTERS} letters, teacher + distillation <= {TARGET['cpu_seconds_max'] / 60:.0f} "
        f"CPU-minutes: **{verdict(report['verdict'])}**{gap}",
    ]
    return "\n".join(lines)


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    if arguments.quick:
        arguments.samples = QUICK_SAMPLES
    load_before = load_average()
    shared = shared_flags(arguments)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        checkpoint = work / "flm.pt"
        teacher_argv = ["--task", "alpha-repeat", *shared]
        teacher = run_example("flm.py", [*teacher_argv, "--out", str(checkpoint)], work / "t.json")
        teacher |= {"steps": measures(teacher.pop("result")["steps"]), "argv": teacher_argv}
        runs = [(f"FMLM {method}", ["--method", method]) for method in arguments.methods]
        runs += [(f"FMLM v2, --steps {n}", ["--method", "v2", "--steps", str(n)])
                 for n in arguments.trend_steps]  # fmt: skip
        distillations = []
        for i, (label, flags) in enumerate(runs):
            argv = ["--teacher", str(checkpoint), *flags, *shared]
            distillations.append(distil(label, argv, work / f"d{i}.json", teacher["cpu_seconds"]))
    default_v2 = default_distillation(distillations)
    report = {
        "benchmark": "alpha_repeat",
        "quick": arguments.quick,
        "samples": arguments.samples,
        "seed": arguments.seed,
        "precision": "fp32",
        "targets": TARGET,
        "load_average_before": load_before,
        "machine": machine_context(),
        "teacher": teacher,
        "distillations": distillations,
        "verdict": target_met(default_v2),
    }
    write_results(arguments.out_dir, "alpha_repeat", report, markdown(report))
    name = (
        f"alpha-repeat, default v2: one-step valid >= {TARGET['one_step_valid_min']}, "
        f"{LETTERS} letters, <= {TARGET['cpu_seconds_max'] / 60:.0f} CPU-minutes"
    )
    value = default_v2.get("steps", {}).get("1", {}).get("valid_rate")
    print_verdicts([{"target": name, "value": value, "pass": report["verdict"]}])


if __name__ == "__main__":
    main()
