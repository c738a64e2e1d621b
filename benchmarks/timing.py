"""Interleaved wall-clock timing and machine context shared by the speed benchmarks.

Not a script: ``reparam_speed.py`` and ``sampler_overhead.py`` import it (run them from any
directory; Python puts ``benchmarks/`` on the path).
"""

import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate, one sample per repeat.

    ``wall`` is elapsed time; ``cpu`` is the CPU time of the calling thread, which does not
    count time the thread spent descheduled on a loaded machine (it equals the work done
    only when torch runs single-threaded, as these benchmarks do by default).
    """

    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def summary(self, scale: float) -> dict[str, object]:
        """Medians and interquartile ranges, multiplied by ``scale`` (e.g. 1e6 for us)."""
        return {
            "wall_median": self.median * scale,
            "wall_quartiles": [value * scale for value in quartiles(self.wall)],
            "cpu_median": self.cpu_median * scale,
            "cpu_quartiles": [value * scale for value in quartiles(self.cpu)],
        }


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, calls: int, warmup: int
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, interleaved so all share the machine's noise.

    Each candidate is first called ``warmup`` times. Then, for every repeat, each candidate
    runs ``calls`` times back to back and records the mean seconds per call; the order of the
    candidates is shuffled (seeded) from one repeat to the next, so none always runs first or
    after the same other one (heavy bfloat16 work, for one, can slow what follows it).
    """
    for run in candidates.values():
        for _ in range(warmup):
            run()
    names = list(candidates)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            run = candidates[name]
            wall_start, cpu_start = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                run()
            cpu[name].append((time.thread_time() - cpu_start) / calls)
            wall[name].append((time.perf_counter() - wall_start) / calls)
    return {name: Timing(wall[name], cpu[name]) for name in names}


def machine_context() -> dict[str, object]:
    """What the figures depend on: load average, torch threads and versions."""
    return {
        "load_average_1_5_15min": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }
