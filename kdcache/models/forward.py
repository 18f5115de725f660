"""Running a model on a batch: the device, autocast, the call by input structure, and the
output picked out of what the model returns."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..errors import KdcacheError, option

__all__ = ["resolve_device", "resolve_amp", "autocast", "move_inputs", "call_model", "select_output", "AMP_DTYPES"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when present, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"{option('device', str(device))} was asked for but no CUDA device is visible; use "
                           f"{option('device', 'cpu')}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KdcacheError(f"{option('device', str(device))} was asked for but this machine has "
                           f"{torch.cuda.device_count()} CUDA devices; use {option('device', 'cuda:0')} or another")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KdcacheError(f"{option('device', str(device))} was asked for but this machine has no MPS device (or "
                           f"torch was built without it); use {option('device', 'cpu')}")
    return dev


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``none`` elsewhere; other values as given."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp not in AMP_DTYPES:
        raise KdcacheError(f"{option('amp')} must be auto, bf16, fp16 or none, got {amp!r}")
    return amp


def autocast(amp: str, device: torch.device) -> AbstractContextManager[Any]:
    """A fresh autocast context for a resolved ``amp`` (``nullcontext`` for ``none``)."""
    dtype = AMP_DTYPES[resolve_amp(amp, device)]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def move_inputs(inputs: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move a tensor / tuple / dict of tensors to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    if isinstance(inputs, dict):
        return {k: move_inputs(v, device, non_blocking) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_inputs(v, device, non_blocking) for v in inputs)
    return inputs


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def select_output(output: Any, key: str | None, role: str = "teacher") -> torch.Tensor:
    """The logits tensor out of a tensor, tuple, dict or object with ``.logits`` (``key`` picks
    another output); errors name the ``role`` (teacher or student) whose output it is."""
    if key is not None:
        if isinstance(output, (tuple, list)):
            if not key.lstrip("-").isdigit() or not -len(output) <= int(key) < len(output):
                raise KdcacheError(f"{option('output_key', key)}: the {role} returns a tuple of {len(output)}; use an index")
            picked = output[int(key)]
        elif isinstance(output, dict) or hasattr(output, "keys"):
            if key not in output:
                raise KdcacheError(f"{option('output_key', key)} not in the {role}'s output keys {list(output.keys())}")
            picked = output[key]
        elif hasattr(output, key):
            picked = getattr(output, key)
        else:
            raise KdcacheError(f"{option('output_key', key)}: the {role} returns a {type(output).__name__} without it")
    elif isinstance(output, torch.Tensor):
        picked = output
    elif hasattr(output, "logits") and isinstance(getattr(output, "logits"), torch.Tensor):
        picked = output.logits
    elif isinstance(output, dict):
        if "logits" not in output:
            raise KdcacheError(f"the {role} returns a dict without 'logits' (keys {list(output)}); choose one with {option('output_key')}")
        picked = output["logits"]
    elif isinstance(output, (tuple, list)) and output:
        picked = output[0]
    else:
        raise KdcacheError(f"the {role} returns a {type(output).__name__}; return a tensor, tuple, dict or .logits")
    if not isinstance(picked, torch.Tensor):
        raise KdcacheError(f"the selected {role} output is a {type(picked).__name__}, not a tensor; "
                           f"choose another with {option('output_key')}")
    return picked
