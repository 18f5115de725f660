"""Where a teacher's weights live: on one device, or spread by accelerate's big-model loading over
the GPUs, the CPU and disk (a "dispatched" model), and how to read them back from there.

A dispatched model (``from_pretrained(device_map=...)``, ``accelerate.dispatch_model``) moves its
inputs and activations between its parts by itself: it is never moved with ``.to(device)``, its
inputs go to the device of its first part, and its offloaded weights (``meta`` tensors in its state
dict, the real ones in accelerate's hooks) are read one module at a time when they are digested.
``accelerate`` is imported only for such a model.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import torch
from torch import nn

from ..errors import KdcacheError, option

__all__ = ["DEVICE_MAPS", "device_map_value", "is_dispatched", "input_device", "place", "offloaded_weights"]

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's own placements
_DEVICE = re.compile(r"cpu|disk|cuda(:\d{1,3})?")
_MAX_ENTRIES = 100_000
_PLACES = "a GPU index, 'cuda:N', 'cpu' or 'disk'"


def device_map_value(value: str | dict[str, Any]) -> str | dict[str, int | str]:
    """A device map as given (a flag, a TOML value or a Python argument), checked: one of
    ``DEVICE_MAPS``, or a JSON object / dict of module name -> a GPU index, ``cuda:N``, ``cpu``
    or ``disk`` (the module's weights there, ``""`` naming the whole model)."""
    what = f"{option('device_map')} must be {', '.join(DEVICE_MAPS)} or a JSON object {{module: device}}"
    if isinstance(value, str):
        if value in DEVICE_MAPS:
            return value
        try:
            value = json.loads(value)
        except ValueError:
            raise KdcacheError(f"{what}, got {value!r:.60}") from None
    if not isinstance(value, dict) or not value or len(value) > _MAX_ENTRIES:
        raise KdcacheError(f"{what} with 1 to {_MAX_ENTRIES} entries, got {str(value)[:60]!r}")
    checked: dict[str, int | str] = {}
    for name, place in value.items():
        fine_name = isinstance(name, str) and len(name) <= 1000 and (name == "" or all(
            part.isidentifier() or part.isdigit() for part in name.split(".")))
        fine_place = (isinstance(place, int) and not isinstance(place, bool) and 0 <= place < 1024) or (
            isinstance(place, str) and _DEVICE.fullmatch(place) is not None)
        if not fine_name or not fine_place:
            raise KdcacheError(f"{option('device_map')}: entry {str(name)[:60]!r}: {str(place)[:30]!r} is not a module "
                               f"name mapped to {_PLACES}")
        checked[name] = place
    return checked


def is_dispatched(model: nn.Module) -> bool:
    """True for a model accelerate spread over devices (``hf_device_map`` with more than one
    place, or any part offloaded to the CPU or disk)."""
    placed = getattr(model, "hf_device_map", None)
    if not isinstance(placed, dict) or not placed:
        return False
    return len({str(v) for v in placed.values()}) > 1 or any(str(v) in ("cpu", "disk") for v in placed.values())


def input_device(model: nn.Module) -> torch.device:
    """Where a dispatched model takes its inputs: the first GPU of its map, else the CPU (its
    hooks move activations from part to part)."""
    for place in model.hf_device_map.values():
        if isinstance(place, int) or (isinstance(place, str) and place.startswith("cuda")):
            return torch.device(f"cuda:{place}" if isinstance(place, int) else place)
        if isinstance(place, torch.device) and place.type == "cuda":
            return place
    return torch.device("cpu")


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in eval mode on ``device``; a dispatched model stays where accelerate put it."""
    return model.eval() if is_dispatched(model) else model.to(device).eval()


def offloaded_weights(model: nn.Module) -> Callable[[str], torch.Tensor]:
    """``name -> tensor``: a state-dict entry the model holds on the meta device (offloaded by
    accelerate to the CPU or disk) read back on the host, through its module's hook, one module's
    weights in memory at a time."""
    modules = dict(model.named_modules())

    def read(name: str) -> torch.Tensor:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        try:
            from accelerate.utils import align_module_device
        except ImportError:
            raise KdcacheError("the teacher's weights are offloaded (meta tensors) but accelerate is not installed: "
                               "pip install 'kdcache[hf]'") from None
        if module is None:
            raise KdcacheError(f"the teacher's state entry {name!r} is on the meta device and no module holds it: load "
                               "the teacher with its weights")
        with align_module_device(module, torch.device("cpu")):
            tensor = getattr(module, leaf, None)
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                raise KdcacheError(f"the teacher's state entry {name!r} is on the meta device and not offloaded by "
                                   "accelerate: load the teacher with its weights")
            return tensor.detach()  # the hook puts a new meta tensor back in the module: this one stays whole
    return read
