"""Models and tokenizers from a local Hugging Face directory: the ``hf:PATH`` specs.

Everything is loaded with ``local_files_only=True`` and ``trust_remote_code=False``: kdcache
never makes a network call for a model and never runs code that a checkpoint names. The model
class is the one the checkpoint's ``config.json`` names (``architectures``, looked up in
``transformers`` only), or ``hf_class`` (an Auto class such as ``AutoModelForCausalLM``).
``transformers`` is imported only when an ``hf:`` spec is used (the ``kdcache[hf]`` extra).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KdcacheError, option
from ..format.meta import TokenizerInfo
from .placement import device_map_value

__all__ = ["HF_PREFIX", "HF_DTYPES", "is_hf_spec", "offline", "hf_directory", "load_pretrained", "load_tokenizer",
           "tokenizer_info", "check_tokenizer"]

HF_PREFIX = "hf:"
HF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def is_hf_spec(spec: Any) -> bool:
    """True for ``hf:PATH``."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def offline() -> None:
    """Put the Hugging Face libraries in offline mode for this process (the CLI calls it before
    importing them): a hub lookup fails at once instead of reaching the network. Their own
    progress bars and advisory logs are turned off unless the environment asks for them: the
    CLI prints its own progress and one-line errors."""
    for name in _OFFLINE:
        os.environ[name] = "1"
    for name, value in _QUIET.items():
        os.environ.setdefault(name, value)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: its constant was read at import time
        constants.HF_HUB_OFFLINE = True


def _transformers() -> Any:
    try:
        import transformers  # noqa: PLC0415
    except ImportError:
        raise KdcacheError("hf: models need transformers: pip install 'kdcache[hf]'") from None
    return transformers


def hf_directory(spec: str | Path, role: str = "teacher") -> Path:
    """The local directory an ``hf:PATH`` spec (or a plain path) names; one line when it is not
    a Hugging Face model directory."""
    raw = str(spec)[len(HF_PREFIX):] if is_hf_spec(spec) else str(spec)
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise KdcacheError(f"{role} {HF_PREFIX}{raw}: no such directory (kdcache loads Hugging Face models from a local "
                           "directory only; save one with save_pretrained)")
    if not (path / "config.json").is_file():
        raise KdcacheError(f"{role} {HF_PREFIX}{raw}: not a Hugging Face model directory (no config.json)")
    return path


def _model_class(transformers: Any, config: Any, hf_class: str | None, where: str) -> Any:
    base = transformers.PreTrainedModel
    if hf_class is not None:
        cls = getattr(transformers, hf_class, None) if hf_class.isidentifier() else None
        if cls is None or not (isinstance(cls, type) and hasattr(cls, "from_pretrained")) or \
                not (hf_class.startswith("AutoModel") or issubclass(cls, base)):
            raise KdcacheError(f"--hf-class {hf_class!r} is not a transformers model class; use e.g. AutoModel, "
                               "AutoModelForCausalLM or AutoModelForSequenceClassification")
        return cls
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, base):
            return cls
    return transformers.AutoModel


def load_pretrained(spec: str | Path, *, hf_class: str | None = None, dtype: str | None = None,
                    role: str = "teacher", device_map: str | dict[str, Any] | None = None,
                    max_memory: dict[int | str, int | str] | None = None,
                    offload_folder: str | Path | None = None) -> nn.Module:
    """The model saved in a local directory (``hf:PATH`` or a path), in eval-ready float32 by
    default (``dtype``: float32, float16, bfloat16 or auto = as stored).

    ``device_map`` (``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or a dict / JSON
    object of module name -> GPU index, ``cuda:N``, ``cpu`` or ``disk``) loads a model larger than
    one GPU with accelerate's big-model loading: its layers spread over the GPUs, then the CPU,
    then disk, within ``max_memory`` (device -> bytes or ``"10GiB"``; accelerate's default: what is
    free). Weights offloaded to disk that are not already in safetensors files are written to
    ``offload_folder`` (default: a temporary directory removed with the model). Hand the model to
    :func:`kdcache.dump_teacher` as it is: it is not moved, and its weights digest (so its cache)
    is that of the same model loaded whole.

    Raises:
        KdcacheError: the directory is missing or not a model directory, the class is not a
            transformers model class, the device map is not one, or the weights cannot be loaded.
    """
    path = hf_directory(spec, role)
    dtype = dtype or "float32"
    if dtype not in HF_DTYPES:
        raise KdcacheError(f"--hf-dtype must be one of {', '.join(HF_DTYPES)}, got {dtype!r}")
    placing: dict[str, Any] = {}
    if device_map is not None:
        placing = {"device_map": device_map_value(device_map), "max_memory": max_memory,
                   "offload_folder": str(offload_folder or tempfile.mkdtemp(prefix="kdcache-offload-"))}
    elif max_memory is not None or offload_folder is not None:
        raise KdcacheError("max_memory and offload_folder place a model by its device_map: give device_map too")
    made = placing.get("offload_folder") if placing and offload_folder is None else None  # kdcache's to remove
    try:
        model = _from_pretrained(path, hf_class, HF_DTYPES[dtype], role, placing)
    except BaseException:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise
    if made and any(Path(made).iterdir()):
        weakref.finalize(model, shutil.rmtree, made, True)  # offloaded weights: gone with the model
    elif made:
        os.rmdir(made)  # nothing was offloaded there
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no key/value cache: one forward per batch, never generation
    return model


def _from_pretrained(path: Path, hf_class: str | None, dtype: Any, role: str, placing: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    where = f"{role} {HF_PREFIX}{path}"
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        cls = _model_class(transformers, config, hf_class, where)
        return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, dtype=dtype, **placing)
    except KdcacheError:
        raise
    except ImportError as err:  # a device map needs accelerate
        raise KdcacheError(f"{where} cannot be loaded with a device map: {str(err).splitlines()[0]}; pip install "
                           "'kdcache[hf]'") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise KdcacheError(f"{where} cannot be loaded: {str(err).splitlines()[0]}") from None


def load_tokenizer(spec: str | Path, *, role: str = "teacher", required: bool = False) -> Any:
    """The tokenizer saved beside a model (``hf:PATH``), or None when the directory has none
    (an error when ``required``)."""
    path = hf_directory(spec, role) if is_hf_spec(spec) else Path(spec)
    if not path.is_dir():
        raise KdcacheError(f"tokenizer {path}: no such directory")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        if required:
            raise KdcacheError(f"{role} {path} has no tokenizer (tokenizer.json or vocab files); save one beside the "
                               f"model with tokenizer.save_pretrained, or pass {option('tokenizer')} DIR")
        return None
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KdcacheError(f"tokenizer in {path} cannot be loaded: {str(err).splitlines()[0]}") from None


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """Size and sha256 of the token -> id map (added tokens included) of a tokenizer."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        h.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return TokenizerInfo(size=len(vocab), digest=h.hexdigest()[:32])


def check_tokenizer(recorded: TokenizerInfo | None, tokenizer: Any, *, allow: bool = False,
                    flag: str = "--allow-vocab-mismatch") -> None:
    """Refuse a student tokenizer whose vocabulary differs from the teacher's recorded one.

    Nothing to compare (no record, or no student tokenizer) passes: the logits' width is still
    checked against the teacher's real or padded vocabulary when training starts. Padded output
    layers are not a mismatch: only the token -> id map is compared.
    """
    if recorded is None or tokenizer is None or allow:
        return
    own = tokenizer_info(tokenizer)
    if own != recorded:
        raise KdcacheError(f"the student's tokenizer ({own.size} tokens, vocabulary {own.digest[:12]}) is not the "
                           f"teacher's ({recorded.size} tokens, vocabulary {recorded.digest[:12]}): the same ids would "
                           f"mean other tokens; use the teacher's tokenizer, or pass {flag} if this is deliberate")
