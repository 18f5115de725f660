"""``kdcache dump-teacher``: load the teacher and the transfer set from their specs, dump, print
the cache's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.dump import DumpConfig
from ..errors import KdcacheError
from .options import HFOptions, Option, command, config_option, hf_options, kwargs_of, merge_config, text
from .output import echo, warnings_as_lines

__all__ = ["dump_teacher_cmd", "OPTIONS"]

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
    "sample_draws", "vocab_size", "mask_key", "layout", "views", "seed", "batch_size", "num_workers", "device", "amp",
    Option("out", str, "Cache directory or s3://bucket/prefix URL to write (default: CACHE_ROOT/<fingerprint>).",
           metavar="PATH"),
    "cache_root", "overwrite", "repair", "block_rows", "allow_nonfinite", "writer_threads",
    *hf_options("teacher", ", e.g. AutoModelForCausalLM", " (as stored)", " with the teacher's tokenizer", ""),
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
    settings = DumpConfig.from_mapping(values)

    tokenizer = hf.tokenizer_for(teacher_spec, "teacher")
    model = hf.model(teacher_spec, t_kwargs, ckpt, "teacher")
    data = hf.dataset(dataset_spec, d_kwargs, tokenizer)
    with warnings_as_lines():
        cache = dump_teacher(model, data, out_path, config=settings, tokenizer=tokenizer,
                             teacher_info={"spec": teacher_spec, "kwargs": t_kwargs,
                                           "checkpoint": str(ckpt) if ckpt else None},
                             dataset_info={"spec": dataset_spec, "kwargs": d_kwargs})
    echo(cache.path)


dump_teacher_cmd = command(DumpConfig, OPTIONS, _dump_teacher,
                           "Run the teacher once over the dataset and cache its logits and chosen hidden states.")
