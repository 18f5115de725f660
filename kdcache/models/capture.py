"""Capture module outputs by dotted name with forward hooks."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from ..errors import KdcacheError

__all__ = ["HiddenCapture", "check_module_names"]


def _split(name: str) -> tuple[str, int | None]:
    """``"layer3#0"`` -> (``"layer3"``, 0): take element 0 of a module that returns a tuple."""
    if "#" in name:
        module, _, index = name.partition("#")
        if not index.isdigit():
            raise KdcacheError(f"hidden name {name!r}: the part after '#' must be a tuple index, e.g. {module}#0")
        return module, int(index)
    return name, None


def check_module_names(model: nn.Module, names: list[str] | tuple[str, ...], *, role: str = "teacher") -> None:
    """Fail before any work when a name is not a submodule, listing the close matches."""
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        module, _ = _split(name)
        if module not in known:
            close = difflib.get_close_matches(module, known, n=5, cutoff=0.5) or known[:8]
            raise KdcacheError(f"{role} has no module {module!r}; close names: {', '.join(close)}")


def _store_output(store: dict[str, Any], name: str, index: int | None, output: Any) -> None:
    if index is not None:
        if not isinstance(output, (tuple, list)) or index >= len(output):
            raise KdcacheError(f"hidden {name!r}: the module's output has no element {index}")
        output = output[index]
    if not isinstance(output, torch.Tensor):
        kind = type(output).__name__
        hint = f"; pick element 0 with '{name}#0'" if isinstance(output, (tuple, list)) else ""
        raise KdcacheError(f"hidden module {name!r} returns a {kind}, not a tensor{hint}")
    store[name] = output


class _Hook:
    """A picklable forward hook that stores one module's output under its name."""

    def __init__(self, store: dict[str, Any], name: str, index: int | None) -> None:
        self.store, self.name, self.index = store, name, index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        _store_output(self.store, self.name, self.index, output)


class HiddenCapture:
    """Context manager that records the outputs of named submodules on every forward.

    ``outputs[name]`` holds the latest output of ``model.get_submodule(name)`` (a tensor as
    the module returned it, on its device, with its autograd graph). A name ``"mod#i"`` takes
    element ``i`` of a module that returns a tuple.
    """

    def __init__(self, model: nn.Module, names: list[str] | tuple[str, ...], *, role: str = "teacher") -> None:
        check_module_names(model, names, role=role)
        self.model, self.names = model, tuple(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "HiddenCapture":
        for name in self.names:
            module, index = _split(name)
            hook = _Hook(self.outputs, name, index)
            self._handles.append(self.model.get_submodule(module).register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self) -> dict[str, torch.Tensor]:
        """Return the captured outputs of the last forward and forget them."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise KdcacheError(f"module {missing[0]!r} was not called in the forward pass; pick one that runs")
        out = {n: self.outputs[n] for n in self.names}
        self.outputs.clear()
        return out
