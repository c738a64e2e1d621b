"""A dispatch-mode tracker of the bytes held by tensors that operators create.

Every tensor an operator returns inside the context is counted once per storage until its
last Python reference dies (weakref finalizers), so ``peak`` is the largest number of bytes
that tensors created inside the context held at once, and ``allocations`` lists the size of
every new storage. Inputs made before the context are not counted.
"""

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocations: list[tuple[int, torch.dtype]] = []
        self._references: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._known: set[int] = set()

    def _release(self, pointer: int) -> None:
        self._references[pointer] -= 1
        if self._references[pointer] == 0:
            self.live -= self._sizes.pop(pointer)
            del self._references[pointer]

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        inputs, _ = tree_flatten((args, kwargs or {}))
        for value in inputs:
            if (
                isinstance(value, torch.Tensor)
                and value.untyped_storage().data_ptr() not in self._references
            ):
                self._known.add(value.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        outputs, _ = tree_flatten(out)
        for value in outputs:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in self._known and pointer not in self._references:
                continue  # an in-place result or a view of a tensor made outside
            if pointer not in self._references:
                self._references[pointer] = 0
                self._sizes[pointer] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                self.allocations.append((storage.nbytes(), value.dtype))
            self._references[pointer] += 1
            weakref.finalize(value, self._release, pointer)
        return out

    def big(self, unit: int) -> list[tuple[int, torch.dtype]]:
        """The allocations of at least ``unit`` bytes."""
        return [(size, dtype) for size, dtype in self.allocations if size >= unit]
