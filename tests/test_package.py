"""The package surface: star import, documented exports, a complete __all__, live shape checks."""

import importlib
import inspect
import types
import typing

import pytest
import torch
from jaxtyping import AbstractArray, TypeCheckError

import flowlm

pytestmark = pytest.mark.usefixtures("one_thread")

CORE_MODULES = [
    "flowlm._types",
    "flowlm.reparam",
    "flowlm.interpolants",
    "flowlm.heads",
    "flowlm.solvers",
    "flowlm.times",
    "flowlm.embeddings",
    "flowlm.protocols",
    "flowlm.network_calls",
    "flowlm",
]


def is_shape_alias(obj: object) -> bool:
    """A jaxtyping array type, or a union of them (``Time`` is per example or per token)."""
    if isinstance(obj, types.UnionType):
        return all(is_shape_alias(member) for member in typing.get_args(obj))
    return isinstance(obj, type) and issubclass(obj, AbstractArray)


def test_star_import():
    namespace: dict[str, object] = {}
    exec("from flowlm import *", namespace)
    exported = {name for name in namespace if name != "__builtins__"}
    assert exported == set(flowlm.__all__)


def test_all_has_no_duplicates_and_is_sorted():
    assert len(flowlm.__all__) == len(set(flowlm.__all__))
    assert flowlm.__all__ == sorted(flowlm.__all__)


@pytest.mark.parametrize("name", flowlm.__all__)
def test_every_export_exists_and_is_documented(name: str):
    obj = getattr(flowlm, name)
    if is_shape_alias(obj):
        return  # jaxtyping aliases carry no docstring of their own (see flowlm._types)
    doc = obj.__doc__
    assert doc is not None, f"{name} has no docstring"
    # dataclasses and NamedTuples invent a "Name(field, ...)" docstring when none is written
    assert doc.strip(), f"{name} has an empty docstring"
    assert not doc.startswith(f"{name}("), f"{name} has only an auto-generated docstring"


def public_definitions(module: types.ModuleType) -> set[str]:
    names = set()
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__:
            names.add(name)
        elif is_shape_alias(obj) and module.__name__ == "flowlm._types":
            names.add(name)
    return names


@pytest.mark.parametrize("module_name", CORE_MODULES)
def test_all_is_complete(module_name: str):
    module = importlib.import_module(module_name)
    missing = public_definitions(module) - set(flowlm.__all__)
    assert not missing, f"{module_name} defines public names not in flowlm.__all__: {missing}"


def test_exports_are_the_objects_of_their_modules():
    assert flowlm.TokenAccuracy is importlib.import_module("flowlm.reparam").TokenAccuracy
    assert flowlm.rollout is importlib.import_module("flowlm.solvers").rollout


def test_shape_alias_check_detects_aliases():
    assert is_shape_alias(flowlm.State)
    assert is_shape_alias(flowlm.Time)
    assert is_shape_alias(flowlm.TokenTime)
    assert not is_shape_alias(flowlm.TokenAccuracy)
    assert not is_shape_alias(int | str)


@pytest.mark.parametrize("times", [torch.rand(2), torch.rand(2, 3)])
def test_time_alias_accepts_per_example_and_per_token_times(times: torch.Tensor):
    x = torch.randn(2, 3, 4)
    assert flowlm.LinearInterpolant().sample(x, x, times).shape == x.shape


def test_distill_has_a_complete_all():
    import flowlm.distill as distill

    defined = {
        name
        for name, obj in vars(distill).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == distill.__name__
    }
    assert defined <= set(distill.__all__)
    assert all(hasattr(distill, name) for name in distill.__all__)


def test_runtime_shape_checks_are_on():
    x0 = torch.randn(2, 3, 4)
    with pytest.raises((TypeCheckError, ValueError)):
        flowlm.LinearInterpolant().sample(x0, x0, torch.rand(3))
    with pytest.raises((TypeCheckError, ValueError)):
        flowlm.masked_mean(torch.rand(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_jaxtyping_plugin_is_active():
    # Only jaxtyping can reject this: flowlm's own checks do not look at a mask's dtype.
    with pytest.raises(TypeCheckError):
        flowlm.masked_mean(torch.rand(2, 3), torch.ones(2, 3))
