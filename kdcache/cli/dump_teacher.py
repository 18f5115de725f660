"""``kdcache dump-teacher``: load the teacher and the transfer set from their specs, dump, print
the cache's path."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..config.dump import DumpConfig
from ..errors import KdcacheError
from .options import HFOptions, Option, command, config_option, hf_options, kwargs_of, merge_config, text
from .output import echo, warnings_as_lines

__all__ = ["dump_teacher_cmd", "OPTIONS"]

_HF = hf_options("teacher", ", e.g. AutoModelForCausalLM", " (as stored)", " with the teacher's tokenizer", "")
DEVICE_MAP = Option("device_map", str, "hf:PATH teacher larger than one GPU: spread it over the GPUs, the CPU and disk "
                    "with accelerate: auto, balanced, or a JSON object {module: GPU index, 'cpu' or 'disk'} "
                    "(one process).", metavar="MAP")

# the options in the order --help shows them; a string is a DumpConfig setting, declared there
OPTIONS: list[Option | str] = [
    Option("teacher", str, "Teacher spec: pkg.module:attr or path/file.py:attr (callables are called).",
           metavar="SPEC"),
    Option("dataset", str, "Transfer-set spec, same forms; items (inputs, label), {..., 'label'} or inputs.",
           metavar="SPEC"),
    Option("teacher_kwargs", str, "JSON object of keyword arguments for the teacher callable.", metavar="JSON"),
    Option("dataset_kwargs", str, "JSON object of keyword arguments for the dataset callable.", metavar="JSON"),
    Option("checkpoint", Path, "State dict (or kdcache student.pt) to load into the teacher.", metavar="FILE"),
    "hidden", "output_key", "logits_dtype", "hidden_dtype", "topk", "sample_k", "sample_temperature", "tail_samples",
    "sample_draws", "head", "head_dtype", "vocab_size", "mask_key", "layout", "views", "seed", "batch_size",
    "num_workers", "device", "amp",
    Option("out", str, "Cache directory or s3://bucket/prefix URL to write (default: CACHE_ROOT/<fingerprint>).",
           metavar="PATH"),
    "cache_root", "overwrite", "repair", "block_rows", "allow_nonfinite", "writer_threads",
    *_HF[:2], DEVICE_MAP, *_HF[2:],
    Option("tokenizer", str, "Tokenizer directory for --text-column.", shown="the hf: teacher's", metavar="DIR"),
    config_option(),
    "progress",
]


def _dump_teacher(flags: dict[str, Any]) -> None:
    from ..dump import dump_teacher

    values = merge_config(flags)
    t_kwargs, d_kwargs = kwargs_of(values, "teacher_kwargs"), kwargs_of(values, "dataset_kwargs")
    teacher_spec, dataset_spec = text(values, "teacher"), text(values, "dataset")
    if not teacher_spec or not dataset_spec:
        raise KdcacheError("--teacher and --dataset are required (as flags or in --config)")
    ckpt, out_path = text(values, "checkpoint"), text(values, "out")
    hf = HFOptions.pop_from(values)
    device_map = values.pop("device_map", None)
    settings = DumpConfig.from_mapping(values)

    tokenizer = hf.tokenizer_for(teacher_spec, "teacher")
    # weights a device map offloads to disk (those not in safetensors files) live here until the dump ends
    with (tempfile.TemporaryDirectory(prefix="kdcache-offload-") if device_map is not None else nullcontext()
          as offload, warnings_as_lines()):
        model = (_placed_teacher(teacher_spec, t_kwargs, ckpt, hf, device_map, offload) if device_map is not None
                 else hf.model(teacher_spec, t_kwargs, ckpt, "teacher"))
        data = hf.dataset(dataset_spec, d_kwargs, tokenizer)
        cache = dump_teacher(model, data, out_path, config=settings, tokenizer=tokenizer,
                             teacher_info={"spec": teacher_spec, "kwargs": t_kwargs,
                                           "checkpoint": str(ckpt) if ckpt else None},
                             dataset_info={"spec": dataset_spec, "kwargs": d_kwargs})
    echo(cache.path)


def _placed_teacher(spec: str, kwargs: dict[str, Any], checkpoint: str | None, hf: HFOptions, device_map: Any,
                    offload: str) -> Any:
    """An hf: teacher loaded by its device map (weights offloaded to disk kept in ``offload``)."""
    from ..models.hf import is_hf_spec, load_pretrained

    if not is_hf_spec(spec) or kwargs or checkpoint:
        raise KdcacheError("--device-map loads an hf:PATH teacher as it is saved (no --teacher-kwargs, no "
                           "--checkpoint: save the weights into its directory)")
    if not isinstance(device_map, str):
        raise KdcacheError(f"--device-map must be a string (auto, balanced or JSON), got {device_map!r:.60}")
    return load_pretrained(spec, hf_class=hf.hf_class, dtype=hf.hf_dtype, device_map=device_map, offload_folder=offload)


dump_teacher_cmd = command(DumpConfig, OPTIONS, _dump_teacher,
                           "Run the teacher once over the dataset and cache its logits and chosen hidden states.")
