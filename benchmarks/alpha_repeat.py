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

Screening (``--screen N``): v2 distilled for N steps from one teacher (``--teacher PATH``, trained
there with ``--teacher-flags`` on top of the preset unless it exists), once per ``--levers``
entry (extra ``fmlm.py`` flags, one quoted string each; ``""``, the default, is the preset), so
each lever is compared with the preset at the same steps. The runs are merged into
``<out-dir>/alpha_repeat_screen.json`` (by the examples' alpha-repeat presets in effect, teacher
flags, steps and lever; two screens may run at once) and tabulated in
``alpha_repeat_screen.md``, with each lever's one-step change from the preset; the default
run's table repeats it.

Usage:
    python benchmarks/alpha_repeat.py                          # v2 about 12 CPU-minutes, v1 more
    python benchmarks/alpha_repeat.py --methods v2 --trend-steps 1000 2000
    python benchmarks/alpha_repeat.py --quick --out-dir /tmp/a # seconds, for tests
    python benchmarks/alpha_repeat.py --screen 1500 --teacher /tmp/t.pt \
        --levers "" "--pair-sampling sorted-uniform" "--ema-decay 0.995"

Writes ``<out-dir>/alpha_repeat.json`` and ``<out-dir>/alpha_repeat.md``.
"""

import argparse
import fcntl
import importlib.util
import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, cast

from distillation import EXAMPLES, ExampleFailed, run_example
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
SCREEN = "alpha_repeat_screen"


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
    parser.add_argument(
        "--screen", type=positive_int, help="screen --levers at this many distillation steps"
    )
    parser.add_argument(
        "--levers", nargs="+", default=[""], help='extra fmlm.py flags per run ("": the preset)'
    )
    parser.add_argument("--teacher", type=Path, help="--screen: the teacher checkpoint")
    parser.add_argument(
        "--teacher-flags", default="", help="--screen: extra flm.py flags of a new --teacher"
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


def example_presets() -> dict[str, dict[str, Any]]:
    """The alpha-repeat presets of examples/flm.py and examples/fmlm.py as they stand now."""
    presets = {}
    for script in ("flm", "fmlm"):
        spec = importlib.util.spec_from_file_location(script, EXAMPLES / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        presets[f"{script}.py"] = module.PRESETS["alpha-repeat"]
    return presets


def teacher_key(entry: dict[str, Any]) -> str:
    return json.dumps([entry["presets"]["flm.py"], entry["teacher_flags"]])


def screen_key(entry: dict[str, Any]) -> str:
    return json.dumps(
        [entry["presets"], entry["teacher_flags"], entry["screen_steps"], entry["lever"]]
    )


def merge_screen(out_dir: Path, record: dict[str, Any], kind: str) -> None:
    """Add a run (``kind``: "teachers" or "runs") to the screen's JSON, the folder locked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{SCREEN}.json"
    folder = os.open(out_dir, os.O_RDONLY)  # locked: two screens may merge at once
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        screen = json.loads(path.read_text()) if path.exists() else {"teachers": {}, "runs": {}}
        key = teacher_key(record) if kind == "teachers" else screen_key(record)
        screen[kind][key] = record
        screen["machine"] = machine_context()
        write_results(out_dir, SCREEN, screen, screen_markdown(screen))
    finally:
        os.close(folder)  # and unlocked


def flags_cell(flags: str) -> str:
    return f"`{flags}`" if flags else "(preset)"


def screen_markdown(screen: dict[str, Any]) -> str:
    """The screening table: each lever's cells and its one-step change from the preset."""
    lines = [
        "The levers screened (`benchmarks/alpha_repeat.py --screen N`): `python examples/fmlm.py --teacher "
        "TEACHER --method v2 --steps N LEVER` with the default run's flags, TEACHER from "
        "`python examples/flm.py --task alpha-repeat TEACHER FLAGS`. Cells: valid rate / letters "
        "covered; Δ1: the one-step valid rate minus the preset's (empty lever) at the same "
        "teacher and N. CPU-s: the distillation's process, at the load average shown "
        "(1 min, before and after).",
        "",
        "| presets | teacher flags | N | lever | "
        + " | ".join(f"{n} step(s)" for n in SAMPLE_STEPS)
        + " | Δ1 | CPU-s | load |",
        "|---|---|---|---|" + "---|" * len(SAMPLE_STEPS) + "---|---|---|",
    ]
    runs = cast(dict[str, dict[str, Any]], screen["runs"])
    teachers = cast(dict[str, dict[str, Any]], screen["teachers"])
    entries = [*runs.values(), *teachers.values()]
    presets = list(dict.fromkeys(json.dumps(entry["presets"]) for entry in entries))
    best: tuple[float, str] = (-1.0, "")
    for entry in runs.values():
        head = f"| P{presets.index(json.dumps(entry['presets'])) + 1} | "
        head += f"{flags_cell(entry['teacher_flags'])} | {entry['screen_steps']} | "
        head += f"{flags_cell(entry['lever'])} |"
        if "error" in entry:
            lines.append(f"{head} error: {entry['error']} |")
            continue
        preset = runs.get(screen_key(entry | {"lever": ""}), {})
        one_step = entry["steps"]["1"]["valid_rate"]
        delta = ""
        if "steps" in preset and entry["lever"]:
            change = one_step - preset["steps"]["1"]["valid_rate"]
            delta = f"{change:+.3f}"
            where = f"P{presets.index(json.dumps(entry['presets'])) + 1}, teacher "
            where += f"{flags_cell(entry['teacher_flags'])}, N = {entry['screen_steps']}"
            best = max(best, (change, f"{flags_cell(entry['lever'])} ({where})"))
        cells = " | ".join(cell(entry["steps"].get(str(n))) for n in SAMPLE_STEPS)
        load = f"{entry['load_average_before'][0]:.1f}, {entry['load_average_after'][0]:.1f}"
        lines.append(f"{head} {cells} | {delta} | {entry['cpu_seconds']:.0f} | {load} |")
    if best[1]:
        lines += ["", f"Largest one-step gain over the preset: {best[1]} ({best[0]:+.3f})."]
    lines += ["", "The presets in effect (`PRESETS['alpha-repeat']` of each example):", ""]
    lines += [f"- P{i + 1}: `{text}`" for i, text in enumerate(presets)]
    if teachers:
        lines += ["", "| presets | teacher flags | " + " | ".join(f"{n} step(s)" for n in
                  SAMPLE_STEPS) + " | CPU-s |", "|---|---|" + "---|" * len(SAMPLE_STEPS) + "---|"]  # fmt: skip
        for teacher in teachers.values():
            cells = " | ".join(cell(teacher["steps"].get(str(n))) for n in SAMPLE_STEPS)
            head = f"| P{presets.index(json.dumps(teacher['presets'])) + 1} | "
            head += f"{flags_cell(teacher['teacher_flags'])} |"
            lines.append(f"{head} {cells} | {teacher['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def screen(arguments: argparse.Namespace, shared: list[str]) -> None:
    """Distil v2 for ``--screen`` steps from ``--teacher`` with each lever; merge the runs."""
    if arguments.teacher is None:
        raise SystemExit("error: --screen needs --teacher PATH (trained there if missing)")
    checkpoint, teacher_flags = arguments.teacher, arguments.teacher_flags
    presets = example_presets()  # what "(preset)" means for these runs
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if not checkpoint.exists():
            argv = ["--task", "alpha-repeat", *shlex.split(teacher_flags), *shared]
            teacher = run_example("flm.py", [*argv, "--out", str(checkpoint)], work / "t.json")
            teacher |= {"steps": measures(teacher.pop("result")["steps"]), "argv": argv}
            labels = {"teacher_flags": teacher_flags, "presets": presets}
            merge_screen(arguments.out_dir, teacher | labels, "teachers")
        for i, lever in enumerate(arguments.levers):
            flags = ["--method", "v2", "--steps", str(arguments.screen), *shlex.split(lever)]
            argv = ["--teacher", str(checkpoint), *flags, *shared]
            run = distil(lever, argv, work / f"d{i}.json", 0.0)
            run.pop("total_cpu_seconds", None)  # the teacher's CPU is in the teachers' table
            labels = {"teacher_flags": teacher_flags, "screen_steps": arguments.screen}
            labels |= {"presets": presets}
            merge_screen(arguments.out_dir, run | labels | {"lever": lever}, "runs")


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    if arguments.quick:
        arguments.samples = QUICK_SAMPLES
    load_before = load_average()
    shared = shared_flags(arguments)
    if arguments.screen is not None:
        return screen(arguments, shared)
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
    table = markdown(report)
    screened = arguments.out_dir / f"{SCREEN}.json"
    if screened.exists():  # the levers screened so far, beside the defaults' result
        table += "\n\n**Screening.** " + screen_markdown(json.loads(screened.read_text()))
    write_results(arguments.out_dir, "alpha_repeat", report, table)
    name = (
        f"alpha-repeat, default v2: one-step valid >= {TARGET['one_step_valid_min']}, "
        f"{LETTERS} letters, <= {TARGET['cpu_seconds_max'] / 60:.0f} CPU-minutes"
    )
    value = default_v2.get("steps", {}).get("1", {}).get("valid_rate")
    print_verdicts([{"target": name, "value": value, "pass": report["verdict"]}])


if __name__ == "__main__":
    main()
