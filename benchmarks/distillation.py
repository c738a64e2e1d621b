"""Distillation: one-step FMLM against 1- and 8-step FLM from the same teacher, per method.

For each task (alpha-repeat: one of 26 letters repeated 8 times, scored by the valid-sequence
rate; markov: an order-1 chain over 16 symbols, length 32, scored by the exact perplexity of
the samples under the chain), one FLM teacher is trained with ``examples/flm.py`` and distilled
with every method of ``examples/fmlm.py`` (v2, lagrangian, eulerian, self, regression, v1).
Both examples run as subprocesses through their command line (``python examples/flm.py ...
--json FILE`` and ``python examples/fmlm.py --teacher ... --json FILE``), with the flags in
`TEACHER_FLAGS`, `DISTILL_FLAGS` and `METHOD_FLAGS` on top of the examples' presets; their JSON
(``{"steps": {"<n>": {"nfe", "entropy", <task measures>, ...}}}``) fills the table.

Every model samples 1024 sequences at 1, 2, 4 and 8 steps from the same fixed noise, in fp32,
with an argmax at the end. Samplers: FLM, the Euler x-prediction map on a uniform model-time
grid (decoding-accuracy clock); FMLM, the two-time denoiser map on the same grid (1 NFE per
step); v1's stage-1 Taylor map, 2 NFE per step (teacher + correction).

Target (alpha-repeat): one-step FMLM valid rate >= 0.9 where one-step FLM is below 0.2,
with teacher plus distillation within 15 CPU-minutes (CPU time of the two processes,
sampling and start-up included) and no letter dropped (mode coverage 1 over the samples: a valid rate
bought by collapsing onto a few letters does not count). Each method is judged on its own.

Usage:
    python benchmarks/distillation.py                  # about an hour on one thread
    python benchmarks/distillation.py --quick --out-dir /tmp/d   # seconds, for tests

Writes ``<out-dir>/distillation.json`` and ``<out-dir>/distillation.md`` (a table per task).
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import (
    clock,
    describe_machine,
    load_average,
    machine_context,
    parse_flags,
    positive_int,
    print_verdicts,
    verdict,
    write_results,
)

from flowlm.data import MarkovChain

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHODS = ("v2", "lagrangian", "eulerian", "self", "regression", "v1")
"""The distillation methods of ``examples/fmlm.py --method``."""
MARKOV_CHAIN = {"vocab_size": 16, "order": 1, "seed": 0}
"""The chain of ``examples/flm.py --task markov``, for the data row's exact perplexity."""
TASKS = ("alpha-repeat", "markov")
QUALITY = {"alpha-repeat": ("valid_rate", "mode_coverage"), "markov": ("exact_ppl",)}
"""The task's measures shown in each cell, before the entropy."""
SAMPLE_STEPS = (1, 2, 4, 8)
TEACHER_FLAGS: dict[str, list[str]] = {
    "alpha-repeat": "--depth 4 --heads 4 --steps 3000 --lr 1e-3 --schedule cosine".split(),
    "markov": [],
}
"""On top of examples/flm.py's presets: alpha-repeat needs a stronger teacher than its preset
(here: 8-step valid rate 1.000, 2-step 0.767, about 100 CPU-s)."""
DISTILL_FLAGS: dict[str, list[str]] = {"alpha-repeat": [], "markov": []}
"""On top of examples/fmlm.py's presets (tuned there for alpha-repeat)."""
METHOD_FLAGS: dict[tuple[str, str], list[str]] = {
    ("alpha-repeat", "regression"): ["--boundary-prob", "1.0"],
}
"""On top of those, per (task, method): regression spends every example on the one-step jump."""
TARGET = {
    "fmlm_one_step_min": 0.9,
    "flm_one_step_max": 0.2,
    "cpu_seconds_max": 15 * 60,
    "fmlm_one_step_mode_coverage_min": 1.0,
}
"""alpha-repeat. The coverage bound (every letter among the samples) keeps a valid rate reached
by collapsing onto a few letters from counting."""
TARGET_NAME = (
    f"one-step valid rate >= {TARGET['fmlm_one_step_min']}, coverage >= "
    f"{TARGET['fmlm_one_step_mode_coverage_min']}, one-step FLM < {TARGET['flm_one_step_max']}, "
    f"<= {TARGET['cpu_seconds_max'] / 60:.0f} CPU-minutes"
)
QUICK_SAMPLES = 16


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=positive_int, default=1024)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--distill-flags",
        default="",
        help='more examples/fmlm.py flags for every distillation, e.g. "--steps 6000"',
    )


class ExampleFailed(RuntimeError):
    """An example exited with an error (e.g. a non-finite loss); the message is its last line."""


def run_example(script: str, argv: list[str], json_path: Path) -> dict[str, Any]:
    """Run ``python examples/<script> <argv> --json <json_path>``; its JSON, CPU and wall seconds.

    The CPU seconds are the child process's (user + system, `resource.RUSAGE_CHILDREN`). Its
    output goes to this process's stdout; its stderr is kept for the error of a failed run.
    """
    command = [sys.executable, str(EXAMPLES / script), *argv, "--json", str(json_path)]
    before, usage_before = load_average(), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = clock()
    print(f"$ python examples/{script} {' '.join(argv)}", flush=True)
    completed = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or [f"exit code {completed.returncode}"]
        print(completed.stderr, file=sys.stderr)
        raise ExampleFailed(lines[-1])
    return {
        "result": json.loads(json_path.read_text()),
        "cpu_seconds": (usage.ru_utime + usage.ru_stime)
        - (usage_before.ru_utime + usage_before.ru_stime),
        "wall_seconds": (clock() - started).wall,
        "load_average_before": before,
        "load_average_after": load_average(),
        "argv": argv,
    }


def shared_flags(arguments: argparse.Namespace) -> list[str]:
    """Flags of every run: threads, seed, samples and step counts of the final report."""
    flags = ["--threads", str(arguments.threads), "--seed", str(arguments.seed)]
    flags += ["--samples", str(arguments.samples), "--sample-steps", *map(str, SAMPLE_STEPS)]
    return flags + (["--smoke"] if arguments.quick else [])


def commands(task: str, arguments: argparse.Namespace) -> dict[str, Any]:
    """The command lines this benchmark runs in-process, for the report."""
    teacher_flags, distill_flags = settings(task, arguments)
    shared = shared_flags(arguments)
    return {
        "teacher": " ".join(["examples/flm.py --task", task, *shared, *teacher_flags]),
        "distillation": " ".join(
            ["examples/fmlm.py --teacher TEACHER --method METHOD", *shared, *distill_flags]
        ),
        "method_flags": {
            method: " ".join(method_flags(task, method, arguments.quick))
            for method in arguments.methods
            if method_flags(task, method, arguments.quick)
        },
    }


def settings(task: str, arguments: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The teacher's and the distillation's flags (only ``--distill-flags`` with ``--quick``)."""
    extra = arguments.distill_flags.split()
    if arguments.quick:
        return [], extra
    return TEACHER_FLAGS[task], DISTILL_FLAGS[task] + extra


def method_flags(task: str, method: str, quick: bool) -> list[str]:
    """Flags of one method on one task, on top of `settings` (none with ``--quick``)."""
    return [] if quick else METHOD_FLAGS.get((task, method), [])


def row(label: str, nfe_per_step: int, steps: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {"sampler": label, "nfe_per_step": nfe_per_step, "steps": steps}


def run_task(
    task: str, arguments: argparse.Namespace, work_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train the teacher, distil it with each method; the teacher's run and the table's rows."""
    shared = shared_flags(arguments)
    teacher_flags, distill_flags = settings(task, arguments)
    checkpoint = work_dir / f"{task}-flm.pt"
    teacher_argv = ["--task", task, *shared, *teacher_flags, "--out", str(checkpoint)]
    teacher = run_example("flm.py", teacher_argv, work_dir / f"{task}-flm.json")
    rows = [row("FLM teacher (Euler)", 1, teacher["result"]["steps"])]
    rows[0] |= {"cpu_seconds": teacher["cpu_seconds"], "wall_seconds": teacher["wall_seconds"]}
    for method in arguments.methods:
        argv = ["--teacher", str(checkpoint), "--method", method, *shared, *distill_flags]
        argv += method_flags(task, method, arguments.quick)
        try:
            distilled = run_example("fmlm.py", argv, work_dir / f"{task}-{method}.json")
        except ExampleFailed as error:  # e.g. a NaN loss: report, go on
            rows.append(row(f"FMLM {method}", 1, {}) | {"error": str(error), "argv": argv})
            continue
        result = distilled.pop("result")
        rows.append(row(f"FMLM {method}", 1, result["steps"]) | distilled)
        if "stage1_steps" in result:  # v1's stage-1 Taylor map, when the example reports it
            rows.append(row("v1 stage-1 Taylor map", 2, result["stage1_steps"]))
    return teacher, rows


def verdicts(teacher: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Per FMLM method: does it meet the alpha-repeat target?"""
    flm_one_step = teacher["result"]["steps"]["1"]["valid_rate"]
    outcome = {}
    for entry in rows:
        if not entry["sampler"].startswith("FMLM"):
            continue
        one_step = entry["steps"].get("1", {"valid_rate": 0.0, "mode_coverage": 0.0})
        cpu = teacher["cpu_seconds"] + entry.get("cpu_seconds", math.inf)
        outcome[entry["sampler"]] = (
            one_step["valid_rate"] >= TARGET["fmlm_one_step_min"]
            and one_step["mode_coverage"] >= TARGET["fmlm_one_step_mode_coverage_min"]
            and flm_one_step < TARGET["flm_one_step_max"]
            and cpu <= TARGET["cpu_seconds_max"]
        )
    return outcome


def cell(metrics: dict[str, float] | None, quality: tuple[str, ...]) -> str:
    if metrics is None:
        return ""
    values = " / ".join(f"{metrics[key]:.3f}" for key in quality)
    return f"{values} / {metrics['entropy']:.2f} (NFE {metrics['nfe']})"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['samples']} samples per cell from fixed noise (seed {report['seed']}), fp32; "
        f"load average before {report['load_average_before']}; after: "
        f"{describe_machine(report['machine'])}. Samplers: {report['sampler']}",
        "",
    ]
    for task, outcome in report["tasks"].items():
        quality = QUALITY[task]
        lines += [
            f"#### {task}",
            "",
            f"Cells: {' / '.join(quality)} / entropy (nats) of the samples. {outcome['reference']}",
            f"Teacher: `python {outcome['commands']['teacher']} --out TEACHER`; distillation: "
            f"`python {outcome['commands']['distillation']}`"
            + "".join(
                f", with `{flags}` for {method}"
                for method, flags in outcome["commands"]["method_flags"].items()
            )
            + " (CPU-s: CPU time of the example's process, sampling and start-up included).",
            "",
            "| sampler | NFE/step | "
            + " | ".join(f"{n} step(s)" for n in SAMPLE_STEPS)
            + " | CPU-s |",
            "|---|---|" + "---|" * len(SAMPLE_STEPS) + "---|",
        ]
        for entry in outcome["rows"]:
            cells = [cell(entry["steps"].get(str(n)), quality) for n in SAMPLE_STEPS]
            cost = f"{entry['cpu_seconds']:.0f}" if "cpu_seconds" in entry else ""
            if "error" in entry:
                cells[0] = f"error: {entry['error']}"
            lines.append(
                f"| {entry['sampler']} | {entry['nfe_per_step']} | "
                + " | ".join(cells)
                + f" | {cost} |"
            )
        if "verdicts" in outcome:
            lines += ["", _target_line(outcome)]
        lines.append("")
    return "\n".join(lines)


def _target_line(outcome: dict[str, Any]) -> str:
    passed = [name for name, ok in outcome["verdicts"].items() if ok]
    return (
        f"Target: one-step FMLM valid rate >= {TARGET['fmlm_one_step_min']} with mode coverage "
        f">= {TARGET['fmlm_one_step_mode_coverage_min']} where one-step FLM "
        f"< {TARGET['flm_one_step_max']}, teacher + distillation <= "
        f"{TARGET['cpu_seconds_max'] / 60:.0f} CPU-minutes: **{verdict(bool(passed))}**"
        + (f" ({', '.join(passed)})" if passed else "")
        + "; per method: "
        + ", ".join(f"{name} {verdict(ok)}" for name, ok in outcome["verdicts"].items())
    )


def reference(task: str) -> str:
    if task == "markov":
        chain = MarkovChain(**MARKOV_CHAIN)
        return f"Data: exact perplexity {math.exp(chain.entropy_rate()):.3f} (the entropy rate)."
    return "Data: valid rate 1, mode coverage 1 (all 26 letters), entropy 0."


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    if arguments.quick:
        arguments.samples = QUICK_SAMPLES
    load_before = load_average()
    tasks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for task in arguments.tasks:
            teacher, rows = run_task(task, arguments, Path(work_dir))
            tasks[task] = {
                "commands": commands(task, arguments),
                "teacher_cpu_seconds": teacher["cpu_seconds"],
                "reference": reference(task),
                "rows": rows,
            }
            if task == "alpha-repeat":
                tasks[task]["verdicts"] = verdicts(teacher, rows)
    report = {
        "benchmark": "distillation",
        "quick": arguments.quick,
        "samples": arguments.samples,
        "seed": arguments.seed,
        "precision": "fp32",
        "sampler": (
            "FLM: Euler x-prediction map on a uniform model-time grid (decoding-accuracy clock); "
            "FMLM: two-time denoiser map on the same grid, 1 NFE per step; v1 stage 1: "
            "Taylor map, 2 NFE per step; argmax at the end."
        ),
        "targets": TARGET,
        "load_average_before": load_before,
        "machine": machine_context(),
        "tasks": tasks,
    }
    write_results(arguments.out_dir, "distillation", report, markdown(report))
    if "alpha-repeat" in tasks:
        print_verdicts(
            [
                {"target": f"{name}: {TARGET_NAME}", "value": None, "pass": passed}
                for name, passed in tasks["alpha-repeat"]["verdicts"].items()
            ]
        )


if __name__ == "__main__":
    main()
