"""Counting network evaluations (NFE) where they happen.

Whatever calls a network records it with `record_network_call` (`XPredictor` does for its
backbone, `TaylorMap` for its correction); `count_network_calls` opens a counter that sees
every call recorded inside it, however deeply the flow maps that make them are nested.
`rollout` counts this way, so a sampler's NFE is measured, never assumed.
"""

from collections.abc import Generator
from contextlib import contextmanager
from contextvars import ContextVar


class NetworkCalls:
    """A running count of network calls, filled by `record_network_call`.

    Attributes:
        count: calls recorded so far.
    """

    def __init__(self) -> None:
        self.count = 0


_OPEN_COUNTERS: ContextVar[tuple[NetworkCalls, ...]] = ContextVar(
    "flowlm_network_calls", default=()
)


@contextmanager
def count_network_calls() -> Generator[NetworkCalls]:
    """Count the network calls recorded while the context is open (nested counters all count).

    Examples:
        >>> import torch
        >>> from flowlm import XPredictor
        >>> predictor = XPredictor(lambda x, t: x)
        >>> with count_network_calls() as calls:
        ...     _ = predictor(torch.zeros(1, 2, 3), torch.zeros(1))
        ...     _ = predictor(torch.zeros(1, 2, 3), torch.ones(1))
        >>> calls.count
        2
    """
    counter = NetworkCalls()
    token = _OPEN_COUNTERS.set((*_OPEN_COUNTERS.get(), counter))
    try:
        yield counter
    finally:
        _OPEN_COUNTERS.reset(token)


def record_network_call() -> None:
    """Add one call to every open counter (a host integer: no device work, no sync).

    Call it from a custom flow map that evaluates a network without an `XPredictor`.

    Examples:
        >>> with count_network_calls() as calls:
        ...     record_network_call()
        >>> calls.count
        1
    """
    for counter in _OPEN_COUNTERS.get():
        counter.count += 1
