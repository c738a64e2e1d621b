"""Speed and accuracy of ``flowlm.TokenAccuracy`` against the reference's scipy spline lookup.

The reference code evaluates the decoding-accuracy clock kappa (model time t -> path time
gamma) with a scipy ``CubicSpline`` of gamma as a function of tau, built once from a dense
quadrature table and evaluated at every call on the host: ``t.cpu().numpy()``, spline, then
``torch.from_numpy(...).to(device, dtype)``. This script times both on a batch of times and
measures each one's largest error against an independent float64 solution (100-node
Gauss-Hermite quadrature with ``scipy.special.log_ndtr``, ``brentq`` per time). The baseline's
table and the exact solution are computed here with numpy and scipy, not with flowlm.

The library's ``inverse`` (gamma -> t) and ``derivative`` (dgamma/dt) are timed too, as
informational rows without a target; their errors are measured against the same exact
solution (|dt| at the exact gamma, and the relative error of kappa' = 1 / tau'(gamma)).

Usage:
    python benchmarks/reparam_speed.py                  # full run, about a minute
    python benchmarks/reparam_speed.py --quick          # seconds: few repeats, small subset
    python benchmarks/reparam_speed.py --out-dir results --threads 1 --repeats 41

Writes ``<out-dir>/reparam_speed.json`` and ``<out-dir>/reparam_speed.md`` (the markdown
table, also printed).
"""

import argparse
import functools
from collections.abc import Callable

import numpy as np
import torch
from harness import (
    describe_machine,
    load_average,
    machine_context,
    parse_flags,
    positive_int,
    print_verdicts,
    time_interleaved,
    verdict,
    write_results,
)
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq
from scipy.special import log_ndtr
from torch import Tensor

import flowlm

SPEEDUP_TARGET = 10.0
ERROR_TARGET = 1e-5
VOCAB_SIZES = (64, 30522, 50258)
DENSE_TABLE_SIZE = 16_385
HERMITE_NODES = 100
LOG_SQRT_TWO_PI = 0.5 * np.log(2.0 * np.pi)

ABS_GAMMA = "max abs dgamma"
ABS_TIME = "max abs dt, exact float64 gamma in"
REL_RATE = "max rel. error of kappa'"
TARGET_ROW = "library"


@functools.cache
def hermite_rule() -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights w with E[f(Z)] ~ sum w f(z) for Z ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite.hermgauss(HERMITE_NODES)
    return nodes * np.sqrt(2.0), weights / np.sqrt(np.pi)


def snr_and_shifted_nodes(gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m = gamma / (1 - gamma) (gamma kept below 1) and the quadrature arguments z + m."""
    nodes, _ = hermite_rule()
    inside = np.clip(gamma, 0.0, np.nextafter(1.0, 0.0))
    snr = inside / (1.0 - inside)
    return inside, nodes + snr[..., None]


def quadrature_tau(gamma: np.ndarray, vocab_size: int) -> np.ndarray:
    """tau(gamma) = (V q - 1)/(V - 1), q = E[Phi(z + m)^(V-1)], m = gamma/(1 - gamma)."""
    _, weights = hermite_rule()
    _, shifted = snr_and_shifted_nodes(gamma)
    q = np.exp((vocab_size - 1) * log_ndtr(shifted)) @ weights
    tau = (vocab_size * q - 1.0) / (vocab_size - 1.0)
    return np.where(gamma <= 0, 0.0, np.where(gamma >= 1, 1.0, tau))


def quadrature_tau_rate(gamma: np.ndarray, vocab_size: int) -> np.ndarray:
    """dtau/dgamma = V E[Phi(z + m)^(V-2) phi(z + m)] dm/dgamma, dm/dgamma = 1/(1 - gamma)^2."""
    _, weights = hermite_rule()
    inside, shifted = snr_and_shifted_nodes(gamma)
    log_density = -0.5 * shifted**2 - LOG_SQRT_TWO_PI
    dq_dm = np.exp((vocab_size - 2) * log_ndtr(shifted) + log_density) @ weights
    return vocab_size * dq_dm / (1.0 - inside) ** 2


def dense_table(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tau, gamma) on the baseline's own uniform gamma grid, cut to where tau strictly rises.

    Interior entries outside (0, 1) (quadrature round-off near gamma = 0 for large V, float64
    saturation near gamma = 1) and entries that do not exceed all earlier ones are dropped.
    """
    gamma = np.linspace(0.0, 1.0, DENSE_TABLE_SIZE)
    tau = quadrature_tau(gamma, vocab_size)
    keep = (tau > 0) & (tau < 1)
    keep[0] = keep[-1] = True
    running_max = np.maximum.accumulate(np.where(keep, tau, -1.0))
    keep[1:] &= tau[1:] > running_max[:-1]
    return tau[keep], gamma[keep]


def exact_kappa(times: np.ndarray, vocab_size: int) -> np.ndarray:
    """kappa(t) in float64: the root gamma of tau(gamma) = t by brentq, one time at a time."""

    def tau_minus(gamma: float, target: float) -> float:
        return float(quadrature_tau(np.asarray(gamma), vocab_size)) - target

    roots = [
        brentq(tau_minus, 0.0, 1.0, args=(float(t),), xtol=1e-15, rtol=4 * np.finfo(float).eps)
        for t in times
    ]
    return np.asarray(roots, dtype=np.float64)


class ScipySplineLookup:
    """The reference's way: a CubicSpline gamma(tau) evaluated on the host at every call."""

    def __init__(self, vocab_size: int) -> None:
        tau, gamma = dense_table(vocab_size)
        self.spline = CubicSpline(tau, gamma)

    def __call__(self, t: Tensor) -> Tensor:
        gamma = self.spline(t.cpu().numpy())
        return torch.from_numpy(gamma).to(t.device, t.dtype)


def max_abs_error(values: Tensor, exact: np.ndarray) -> float:
    return float(np.abs(values.double().numpy() - exact).max())


def max_relative_error(values: Tensor, exact: np.ndarray) -> float:
    return float(np.abs(values.double().numpy() / exact - 1.0).max())


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, default=4096, help="times per call")
    parser.add_argument("--repeats", type=positive_int, default=41)
    parser.add_argument("--calls", type=positive_int, default=50, help="calls per timed repeat")
    parser.add_argument(
        "--exact-subset", type=positive_int, default=4096, help="times solved by brentq"
    )


def measure_vocabulary(vocab_size: int, times: Tensor, arguments: argparse.Namespace) -> dict:
    library = flowlm.TokenAccuracy(vocab_size)
    spline = ScipySplineLookup(vocab_size)
    times64 = times.double()
    with torch.no_grad():
        gammas = library(times)

    subset = times[: arguments.exact_subset]
    exact = exact_kappa(subset.double().numpy(), vocab_size)
    exact_rate = 1.0 / quadrature_tau_rate(exact, vocab_size)
    with torch.no_grad():
        errors = {
            "library": (max_abs_error(library(subset), exact), ABS_GAMMA),
            "scipy_spline": (max_abs_error(spline(subset), exact), ABS_GAMMA),
            "library_float64_input": (max_abs_error(library(subset.double()), exact), ABS_GAMMA),
            "library_inverse": (
                max_abs_error(library.inverse(torch.from_numpy(exact)), subset.double().numpy()),
                ABS_TIME,
            ),
            "library_derivative": (
                max_relative_error(library.derivative(subset), exact_rate),
                REL_RATE,
            ),
        }
    candidates: dict[str, Callable[[], object]] = {
        "library": lambda: library(times),
        "scipy_spline": lambda: spline(times),
        "library_float64_input": lambda: library(times64),
        "library_inverse": lambda: library.inverse(gammas),
        "library_derivative": lambda: library.derivative(times),
    }
    with torch.no_grad():
        timings = time_interleaved(
            candidates, arguments.repeats, arguments.calls, warmup=max(arguments.calls, 5)
        )
    scipy = timings["scipy_spline"]
    methods = {}
    for name, timing in timings.items():
        error, measure = errors[name]
        methods[name] = {
            "us_per_call": timing.summary(1e6),
            "speedup_vs_scipy": scipy.median / timing.median,
            "cpu_speedup_vs_scipy": scipy.cpu_median / timing.cpu_median,
            "error": error,
            "error_measure": measure,
        }
    library_result = methods[TARGET_ROW]
    return {
        "vocab_size": vocab_size,
        "library_knots": {
            "gamma_grid": library.tau_table.last_knot + 1,
            "logit_grid": library.kappa_table.last_knot + 1,
        },
        "scipy_spline_knots": int(spline.spline.x.size),
        "exact_times": len(exact),
        "methods": methods,
        "library_speedup_pass": library_result["cpu_speedup_vs_scipy"] >= SPEEDUP_TARGET,
        "library_error_pass": library_result["error"] <= ERROR_TARGET,
    }


def timing_cell(method: dict) -> str:
    timing = method["us_per_call"]
    low, high = timing["wall_quartiles"]
    return f"{timing['wall_median']:.1f} [{low:.1f}, {high:.1f}] | {timing['cpu_median']:.1f}"


def markdown_table(report: dict) -> str:
    first = report["results"][0]
    lines = [
        f"Batch {report['batch']} float32 times, {report['repeats']} interleaved repeats of "
        f"{report['calls_per_repeat']} calls; load average (1, 5, 15 min) before "
        f"{report['load_average_before']}; after: {describe_machine(report['machine'])}.",
        f"Library tables: tau on {first['library_knots']['gamma_grid']} gamma knots, "
        f"kappa on {first['library_knots']['logit_grid']} logit(t) knots; scipy spline on "
        f"its own {DENSE_TABLE_SIZE}-point gamma grid. Errors against brentq on "
        f"{HERMITE_NODES}-node quadrature (float64), {first['exact_times']} times per V.",
        f"Targets (row `{TARGET_ROW}`): >= {SPEEDUP_TARGET:g}x faster than scipy in CPU time, "
        f"{ABS_GAMMA} <= {ERROR_TARGET:g}. Thread CPU time is not inflated by a shared "
        "machine's preemptions; wall-clock is shown too. Other rows are informational.",
        "",
        "| V | method | wall us/call median [IQR] | CPU us/call | speedup vs scipy (wall, CPU) "
        "| error | error measure | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        for name, method in result["methods"].items():
            target = ""
            if name == TARGET_ROW:
                target = (
                    f"speed {verdict(result['library_speedup_pass'])}, "
                    f"error {verdict(result['library_error_pass'])}"
                )
            lines.append(
                f"| {result['vocab_size']} | {name} | {timing_cell(method)} | "
                f"{method['speedup_vs_scipy']:.2f}x, {method['cpu_speedup_vs_scipy']:.2f}x | "
                f"{method['error']:.2e} | {method['error_measure']} | {target} |"
            )
    return "\n".join(lines)


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    if arguments.quick:
        arguments.repeats, arguments.calls, arguments.exact_subset = 3, 2, 32
    load_before = load_average()
    generator = torch.Generator().manual_seed(arguments.seed)
    times = torch.rand(arguments.batch, generator=generator)
    results = [measure_vocabulary(vocab_size, times, arguments) for vocab_size in VOCAB_SIZES]
    machine = machine_context()
    report = {
        "benchmark": "reparam_speed",
        "batch": arguments.batch,
        "time_dtype": "float32",
        "repeats": arguments.repeats,
        "calls_per_repeat": arguments.calls,
        "quick": arguments.quick,
        "targets": {"speedup_vs_scipy_min": SPEEDUP_TARGET, "max_abs_error": ERROR_TARGET},
        "target_row": TARGET_ROW,
        "speed_verdict_measure": "thread CPU time (time.thread_time), single torch thread",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine,
        "results": results,
    }
    write_results(arguments.out_dir, "reparam_speed", report, markdown_table(report))
    print_verdicts(
        [
            {"target": f"V {result['vocab_size']}: {name}", "value": value, "pass": passed}
            for result in results
            for name, value, passed in (
                (
                    f">= {SPEEDUP_TARGET:g}x faster than scipy (CPU)",
                    result["methods"][TARGET_ROW]["cpu_speedup_vs_scipy"],
                    result["library_speedup_pass"],
                ),
                (
                    f"{ABS_GAMMA} <= {ERROR_TARGET:g}",
                    result["methods"][TARGET_ROW]["error"],
                    result["library_error_pass"],
                ),
            )
        ]
    )


if __name__ == "__main__":
    main()
