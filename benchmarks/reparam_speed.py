"""Speed and accuracy of ``flowlm.TokenAccuracy`` against the reference's scipy spline lookup.

The reference code evaluates the decoding-accuracy clock kappa (model time t -> path time
gamma) with a scipy ``CubicSpline`` of gamma as a function of tau, built once from a dense
quadrature table and evaluated at every call on the host: ``t.cpu().numpy()``, spline, then
``torch.from_numpy(...).to(device, dtype)``. This script times both on a batch of times and
measures each one's largest error against an independent float64 solution (100-node
Gauss-Hermite quadrature with ``scipy.special.log_ndtr``, ``brentq`` per time).

It also times what a call is made of (``torch.searchsorted`` on float64 and float32 tables)
and two PROTOTYPE lookups that are not part of flowlm: a grid uniform in t, and a grid
uniform in logit(t) that needs no search (the proposal summarized after the table).

Usage:
    python benchmarks/reparam_speed.py                  # full run, about a minute
    python benchmarks/reparam_speed.py --quick          # seconds: few repeats, small subset
    python benchmarks/reparam_speed.py --out-dir results --threads 1 --repeats 41

Writes ``<out-dir>/reparam_speed.json`` and prints a markdown table.
"""

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq
from scipy.special import expit, log_ndtr
from timing import machine_context, time_interleaved
from torch import Tensor, nn

import flowlm

SPEEDUP_TARGET = 10.0
ERROR_TARGET = 1e-5
VOCAB_SIZES = (64, 30522, 50258)
DENSE_TABLE_SIZE = 16_385
HERMITE_NODES = 100
PROTOTYPE_KNOTS = 8193
PROTOTYPE_HALF_WIDTH = 37.0
UNIFORM_GRID_KNOTS = 8193
TABLE_DTYPES = (torch.float32, torch.float64)


@functools.cache
def hermite_rule() -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights w with E[f(Z)] ~ sum w f(z) for Z ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite.hermgauss(HERMITE_NODES)
    return nodes * np.sqrt(2.0), weights / np.sqrt(np.pi)


def quadrature_tau(gamma: np.ndarray, vocab_size: int) -> np.ndarray:
    """tau(gamma) = (V q - 1)/(V - 1), q = E[Phi(z + m)^(V-1)], m = gamma/(1 - gamma)."""
    nodes, weights = hermite_rule()
    inside = np.clip(gamma, 0.0, np.nextafter(1.0, 0.0))
    snr = inside / (1.0 - inside)
    q = np.exp((vocab_size - 1) * log_ndtr(nodes + snr[..., None])) @ weights
    tau = (vocab_size * q - 1.0) / (vocab_size - 1.0)
    return np.where(gamma <= 0, 0.0, np.where(gamma >= 1, 1.0, tau))


def dense_table(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tau, gamma) on a uniform gamma grid, cut to the strictly increasing part of tau.

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


class UniformGridLookup(nn.Module):
    """PROTOTYPE (not flowlm): linear interpolation on a grid uniform in t; no search.

    Cheap, but kappa is steep near t = 0 for large V and has a log-type singularity at t = 1,
    so a uniform grid is coarse exactly where kappa bends most.
    """

    start: Tensor
    slope: Tensor

    def __init__(self, vocab_size: int, knots: int) -> None:
        super().__init__()
        tau, gamma = dense_table(vocab_size)
        knot_gamma = np.interp(np.linspace(0.0, 1.0, knots), tau, gamma)
        self.cells = knots - 1
        self.register_buffer("start", torch.tensor(knot_gamma, dtype=torch.float32))
        self.register_buffer(
            "slope", torch.tensor(np.append(np.diff(knot_gamma), 0.0), dtype=torch.float32)
        )

    def forward(self, t: Tensor) -> Tensor:
        position = t * self.cells
        cell = position.long()
        return torch.addcmul(
            self.start.index_select(0, cell), position.frac(), self.slope.index_select(0, cell)
        )


class LogitGridLookup(nn.Module):
    """PROTOTYPE (not flowlm): piecewise-linear kappa on a grid uniform in u = logit(t).

    In u, kappa is smooth at both ends (near t = 0 it is about linear in t = sigmoid(u);
    near t = 1, 1 - tau decays like a Gaussian tail, so m = gamma/(1 - gamma) grows like the
    square root of u). The cell of a time is computed, not searched:
    ``position = (logit(t) + L) / h``, ``cell = floor(position)``,
    ``gamma = start[cell] + frac(position) * slope[cell]``: eight elementwise ops, no
    ``searchsorted``. L = 37 covers every float64 time below 1. The first knot holds 0 and a
    sentinel knot after the last holds 1, reached only by logit(1) = +inf, so kappa(0) = 0 and
    kappa(1) = 1 exactly. Tables are kept in float32 and float64, chosen by the input's dtype.

    The knots come from the dense quadrature table, held flat beyond its last unsaturated
    entry (float64 times with 1 - t below about 1e-15, where tau rounds to 1).

    logit has an infinite slope at t = 0 and t = 1, so when a gradient with respect to t is
    recorded, the times are first clamped into (0, 1) (no gradient flows at the clamped ends)
    and the endpoints are restored with ``where``: four ops more.
    """

    start_float32: Tensor
    slope_float32: Tensor
    start_float64: Tensor
    slope_float64: Tensor
    offset: Tensor

    def __init__(self, vocab_size: int, knots: int, half_width: float) -> None:
        super().__init__()
        tau, gamma = dense_table(vocab_size)
        knot_times = expit(np.linspace(-half_width, half_width, knots))
        knot_gamma = np.interp(knot_times, tau[:-1], gamma[:-1])
        knot_gamma[0] = 0.0
        start = np.append(knot_gamma, 1.0)
        slope = np.append(np.diff(knot_gamma), [0.0, 0.0])
        self.sentinel = knots
        self.cells_per_unit = (knots - 1) / (2.0 * half_width)
        self.register_buffer("offset", torch.tensor(half_width * self.cells_per_unit))
        self.lowest_time = float(expit(-half_width))
        self.highest_time = {dtype: 1.0 - torch.finfo(dtype).eps / 2.0 for dtype in TABLE_DTYPES}
        for dtype in TABLE_DTYPES:
            name = str(dtype).removeprefix("torch.")
            self.register_buffer(f"start_{name}", torch.tensor(start, dtype=dtype))
            self.register_buffer(f"slope_{name}", torch.tensor(slope, dtype=dtype))

    def forward(self, t: Tensor) -> Tensor:
        if t.requires_grad and torch.is_grad_enabled():
            return self.differentiable(t)
        position = torch.add(self.offset, torch.logit(t), alpha=self.cells_per_unit)
        return self.interpolate(position.clamp_(0, self.sentinel))

    def differentiable(self, t: Tensor) -> Tensor:
        u = torch.logit(t.clamp(self.lowest_time, self.highest_time[t.dtype]))
        gamma = self.interpolate(u * self.cells_per_unit + self.offset)
        return torch.where(t.round() == t, t, gamma)

    def interpolate(self, position: Tensor) -> Tensor:
        wide = position.dtype == torch.float64
        start = self.start_float64 if wide else self.start_float32
        slope = self.slope_float64 if wide else self.slope_float32
        cell = position.long()
        return torch.addcmul(
            start.index_select(0, cell), position.frac(), slope.index_select(0, cell)
        )


def max_error(kappa: Callable[[Tensor], Tensor], times: Tensor, exact: np.ndarray) -> float:
    gamma = kappa(times).double().numpy()
    return float(np.abs(gamma - exact).max())


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=4096, help="times per call")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed repeat")
    parser.add_argument("--exact-subset", type=int, default=4096, help="times solved by brentq")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.repeats, arguments.calls, arguments.exact_subset = 3, 2, 32
    return arguments


def measure_vocabulary(vocab_size: int, times: Tensor, arguments: argparse.Namespace) -> dict:
    library = flowlm.TokenAccuracy(vocab_size)
    spline = ScipySplineLookup(vocab_size)
    uniform = UniformGridLookup(vocab_size, UNIFORM_GRID_KNOTS)
    logit_grid = LogitGridLookup(vocab_size, PROTOTYPE_KNOTS, PROTOTYPE_HALF_WIDTH)
    times64 = times.double()
    tau_float64 = library.tau_table
    tau_float32 = library.tau_table.float()

    subset = times[: arguments.exact_subset]
    exact = exact_kappa(subset.double().numpy(), vocab_size)
    errors = {
        "library": max_error(library, subset, exact),
        "scipy_spline": max_error(spline, subset, exact),
        "prototype_uniform_grid": max_error(uniform, subset, exact),
        "prototype_logit_grid": max_error(logit_grid, subset, exact),
        "prototype_logit_grid_float64": max_error(logit_grid, subset.double(), exact),
    }
    candidates: dict[str, Callable[[], object]] = {
        "library": lambda: library(times),
        "scipy_spline": lambda: spline(times),
        "library_float64_input": lambda: library(times64),
        "searchsorted_float64_table": lambda: torch.searchsorted(tau_float64, times64),
        "searchsorted_float32_table": lambda: torch.searchsorted(tau_float32, times),
        "prototype_uniform_grid": lambda: uniform(times),
        "prototype_logit_grid": lambda: logit_grid(times),
        "prototype_logit_grid_float64": lambda: logit_grid(times64),
        "prototype_logit_grid_autograd_path": lambda: logit_grid.differentiable(times),
    }
    with torch.no_grad():
        timings = time_interleaved(
            candidates, arguments.repeats, arguments.calls, warmup=max(arguments.calls, 5)
        )
    scipy = timings["scipy_spline"]
    methods = {}
    for name, timing in timings.items():
        methods[name] = {
            "us_per_call": timing.summary(1e6),
            "speedup_vs_scipy": scipy.median / timing.median,
            "cpu_speedup_vs_scipy": scipy.cpu_median / timing.cpu_median,
            "max_abs_error": errors.get(name),
        }
    library_result = methods["library"]
    return {
        "vocab_size": vocab_size,
        "library_table_knots": int(library.tau_table.numel()),
        "exact_times": len(exact),
        "methods": methods,
        "library_speedup_pass": library_result["cpu_speedup_vs_scipy"] >= SPEEDUP_TARGET,
        "library_error_pass": library_result["max_abs_error"] <= ERROR_TARGET,
        "prototype_speedup_pass": methods["prototype_logit_grid"]["cpu_speedup_vs_scipy"]
        >= SPEEDUP_TARGET,
        "prototype_error_pass": methods["prototype_logit_grid"]["max_abs_error"] <= ERROR_TARGET,
    }


def timing_cell(method: dict) -> str:
    timing = method["us_per_call"]
    low, high = timing["wall_quartiles"]
    return f"{timing['wall_median']:.1f} [{low:.1f}, {high:.1f}] | {timing['cpu_median']:.1f}"


def pass_fail(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def markdown_table(report: dict) -> str:
    lines = [
        f"Batch {report['batch']} float32 times, {report['repeats']} interleaved repeats of "
        f"{report['calls_per_repeat']} calls; torch threads {report['machine']['torch_threads']}; "
        f"load average before {report['load_average_before']}, after "
        f"{report['machine']['load_average_1_5_15min']}.",
        f"Targets: >= {SPEEDUP_TARGET:g}x faster than scipy, max |dgamma| <= {ERROR_TARGET:g} "
        "against brentq on 100-node quadrature (float64). The speed verdict uses thread CPU "
        "time, which a shared machine's preemptions do not inflate; wall-clock is shown too.",
        "",
        "| V | method | wall us/call median [IQR] | CPU us/call | speedup vs scipy (wall, CPU) "
        "| max abs dgamma | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        for name, method in result["methods"].items():
            error = method["max_abs_error"]
            error_cell = "n/a" if error is None else f"{error:.2e}"
            target = ""
            if name == "library":
                target = (
                    f"speed {pass_fail(result['library_speedup_pass'])}, "
                    f"error {pass_fail(result['library_error_pass'])}"
                )
            elif name == "prototype_logit_grid":
                target = (
                    f"(prototype) speed {pass_fail(result['prototype_speedup_pass'])}, "
                    f"error {pass_fail(result['prototype_error_pass'])}"
                )
            lines.append(
                f"| {result['vocab_size']} | {name} | {timing_cell(method)} | "
                f"{method['speedup_vs_scipy']:.2f}x, {method['cpu_speedup_vs_scipy']:.2f}x | "
                f"{error_cell} | {target} |"
            )
    return "\n".join(lines)


def proposal_summary(report: dict) -> str:
    lines = ["Proposal (PROTOTYPE LogitGridLookup, not in flowlm), CPU time per call:"]
    for result in report["results"]:
        methods = result["methods"]
        prototype, library = methods["prototype_logit_grid"], methods["library"]
        lines.append(
            f"- V={result['vocab_size']}: {prototype['us_per_call']['cpu_median']:.1f} us "
            f"({prototype['cpu_speedup_vs_scipy']:.1f}x scipy, "
            f"{library['us_per_call']['cpu_median'] / prototype['us_per_call']['cpu_median']:.1f}x"
            f" flowlm), max |dgamma| {prototype['max_abs_error']:.1e}; autograd path "
            f"{methods['prototype_logit_grid_autograd_path']['us_per_call']['cpu_median']:.1f} us"
        )
    return "\n".join(lines)


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    load_before = [round(value, 2) for value in machine_context()["load_average_1_5_15min"]]
    generator = torch.Generator().manual_seed(arguments.seed)
    times = torch.rand(arguments.batch, generator=generator)
    results = [measure_vocabulary(vocab_size, times, arguments) for vocab_size in VOCAB_SIZES]
    report = {
        "benchmark": "reparam_speed",
        "batch": arguments.batch,
        "time_dtype": "float32",
        "repeats": arguments.repeats,
        "calls_per_repeat": arguments.calls,
        "quick": arguments.quick,
        "targets": {"speedup_vs_scipy_min": SPEEDUP_TARGET, "max_abs_error": ERROR_TARGET},
        "speed_verdict_measure": "thread CPU time (time.thread_time), single torch thread",
        "prototype": {
            "name": "LogitGridLookup (PROTOTYPE, not in flowlm)",
            "knots": PROTOTYPE_KNOTS,
            "logit_half_width": PROTOTYPE_HALF_WIDTH,
        },
        "load_average_before": load_before,
        "machine": machine_context(),
        "results": results,
    }
    arguments.out_dir.mkdir(parents=True, exist_ok=True)
    path = arguments.out_dir / "reparam_speed.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print()
    print(proposal_summary(report))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
