"""Resolve ``pkg.module:attr`` or ``path/to/file.py:attr`` specs into objects; ``hf:PATH`` models and
``hf-disk:``/``parquet:``/``jsonl:`` datasets go to :mod:`kdcache.models.hf` and :mod:`kdcache.data.hf`."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import hf as hfdata
from .data.hf import is_data_spec
from .errors import KdcacheError
from .models.hf import is_hf_spec, load_pretrained

__all__ = ["resolve_spec", "load_model", "load_dataset", "parse_kwargs"]


def parse_kwargs(text: str | None, what: str) -> dict[str, Any]:
    """Parse a ``--*-kwargs`` JSON object; ``None`` or empty gives ``{}``."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise KdcacheError(f"{what} is not valid JSON ({err.msg} at char {err.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise KdcacheError(f"{what} must be a JSON object like '{{\"width\": 64}}', got {text!r}")
    return value


def _import_target(target: str, spec: str) -> Any:
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise KdcacheError(f"spec {spec!r}: file {target} does not exist")
        name = "kdcache_spec_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise KdcacheError(f"spec {spec!r}: cannot load {target} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise KdcacheError(f"spec {spec!r}: importing {target} failed: {type(err).__name__}: {err}") from None
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        raise KdcacheError(f"spec {spec!r}: module {err.name!r} not found; check the spelling or install it") from None
    except Exception as err:
        raise KdcacheError(f"spec {spec!r}: importing {target} failed: {type(err).__name__}: {err}") from None


def resolve_spec(spec: str, kwargs: dict[str, Any] | None = None, *, keep: tuple[type, ...] = ()) -> Any:
    """Import the object a spec names; call it (with ``kwargs``) when it is callable.

    Objects that are instances of ``keep`` (e.g. an ``nn.Module``, which is callable too) are
    returned as they are.
    """
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise KdcacheError(f"spec {spec!r} must look like 'pkg.module:attr' or 'path/to/file.py:attr'")
    target, attr = spec.rsplit(":", 1)
    module = _import_target(target, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = own_names(obj)
            close = difflib.get_close_matches(part, names, n=1)
            raise KdcacheError(f"spec {spec!r}: {target} has no attribute {attr!r}"
                               + (f"; did you mean {close[0]!r}?" if close else "")
                               + f" (it defines: {', '.join(names[:16]) or 'nothing public'})")
        obj = getattr(obj, part)
    if kwargs and (isinstance(obj, keep) or not callable(obj)):
        raise KdcacheError(f"spec {spec!r} names an object, not a callable: it takes no kwargs")
    if callable(obj) and not isinstance(obj, keep):
        try:
            obj = obj(**(kwargs or {}))
        except TypeError as err:
            raise KdcacheError(f"spec {spec!r}: calling it failed: {err}") from None
    return obj


def own_names(obj: Any) -> list[str]:
    """The public names a module (or class) defines itself: its ``__all__`` when it has one;
    else its public attributes less modules and the classes and functions it imported."""
    declared = getattr(obj, "__all__", None)
    if isinstance(declared, (list, tuple)) and all(isinstance(n, str) for n in declared):
        return list(declared)
    home = getattr(obj, "__name__", None) if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    names = []
    for name in dir(obj):
        value = getattr(obj, name, None)
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if (inspect.isclass(value) or inspect.isroutine(value)) and getattr(value, "__module__", home) != home:
            continue  # imported from elsewhere (Path, lru_cache, nn.Linear...)
        names.append(name)
    return names


def _load_failure(err: Exception) -> str:
    """torch.load's reason in a few words: its own message runs to several lines and suggests
    ``weights_only=False``, which would run code from the file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = found.group(1) if found else (lines[0] if lines else type(err).__name__)
    return reason.split(". ")[0].rstrip(".")[:160]


def load_model(spec: str, kwargs: dict[str, Any] | None = None, checkpoint: str | Path | None = None,
               *, role: str = "teacher", hf_class: str | None = None, hf_dtype: str | None = None) -> nn.Module:
    """Build a model from a spec (``hf:PATH``: a local Hugging Face directory, loaded with
    ``hf_class``/``hf_dtype``) and optionally load a state dict into it."""
    if is_hf_spec(spec):
        if kwargs:
            raise KdcacheError(f"{role} {spec}: a Hugging Face model takes --hf-class/--hf-dtype, not --{role}-kwargs")
        model = load_pretrained(spec, hf_class=hf_class, dtype=hf_dtype, role=role)
    elif hf_class is not None or hf_dtype is not None:
        raise KdcacheError(f"--hf-class/--hf-dtype apply to hf:PATH models; {role} {spec!r} is not one")
    else:
        model = resolve_spec(spec, kwargs, keep=(nn.Module,))
    if not isinstance(model, nn.Module):
        raise KdcacheError(f"{role} spec {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, role=role)
    return model


def load_checkpoint(model: nn.Module, checkpoint: str | Path, *, role: str = "teacher") -> None:
    """Load a state dict (or a kdcache ``student.pt``) into ``model``; one clear line on mismatch."""
    path = Path(checkpoint)
    if not path.is_file():
        raise KdcacheError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise KdcacheError(f"checkpoint {path} cannot be read as a state dict ({_load_failure(err)}); save one with "
                           "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KdcacheError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KdcacheError(f"checkpoint {path} does not fit the {role}: missing keys {missing[:5]}, "
                           f"unexpected keys {unexpected[:5]}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise KdcacheError(f"checkpoint {path} does not fit the {role}: {k} has shape {tuple(state[k].shape)}, "
                           f"the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state)


def load_dataset(spec: str, kwargs: dict[str, Any] | None = None, *, tokenizer: Any = None,
                 text_column: str | None = None, max_length: int | None = None) -> Any:
    """Build a dataset (anything with ``__len__`` and ``__getitem__``) from a spec.

    ``hf-disk:PATH[:SPLIT]``, ``parquet:FILE`` and ``jsonl:FILE`` are read with 🤗 datasets, as is a
    spec giving a ``datasets.Dataset``; ``text_column`` is tokenized with ``tokenizer`` and token
    rows are padded to ``max_length`` (:func:`kdcache.data.hf.prepare`).
    """
    if is_data_spec(spec):
        if kwargs:
            raise KdcacheError(f"dataset {spec}: a {spec.split(':')[0]}: dataset takes no --dataset-kwargs")
        dataset = hfdata.load(spec, tokenizer=tokenizer, text_column=text_column, max_length=max_length)
    else:
        dataset = resolve_spec(spec, kwargs, keep=(torch.utils.data.Dataset,))
        if hfdata.is_hf_dataset(dataset):
            dataset = hfdata.prepare(dataset, tokenizer, text_column=text_column, max_length=max_length)
        elif text_column is not None or max_length is not None:
            raise KdcacheError(f"--text-column/--max-length apply to Hugging Face datasets; {spec!r} gave a "
                               f"{type(dataset).__name__}")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise KdcacheError(f"dataset spec {spec!r} gave a {type(dataset).__name__}, which has no __len__/__getitem__")
    if len(dataset) == 0:
        raise KdcacheError(f"dataset spec {spec!r} gave an empty dataset")
    return dataset
