"""Shared fixtures."""

from collections.abc import Iterator

import jaxtyping
import pytest
import torch


@pytest.fixture(params=["jaxtyping", "flowlm"])
def checks(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the jaxtyping runtime checks on, then with them off.

    The suite runs with the jaxtyping pytest plugin, so shape errors surface as jaxtyping's
    ``TypeCheckError`` first; with the checks off, flowlm's own validation must still raise a
    clear error (that is what users without the import hook see).
    """
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", request.param == "flowlm")
    try:
        yield request.param
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread.

    The suite's tensors are tiny: on a shared 2-core machine, two threads per op mostly wait
    on each other (a 500-step Adam loop took 30 s with 2 threads under load, 0.5 s with 1).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
