"""How ``--help`` names option values: ``--teacher SPEC``, ``--hint S=T[:LOSS][@WEIGHT]``."""

from __future__ import annotations

from typing import Any

import typer

__all__ = ["HelpCommand"]

# What an option's value looks like, for --help ("--teacher SPEC"): typer would print its type
# ("<str>", "<list[str]>"). Options not named here get one from their name (see _metavar).
_METAVARS = {
    "teacher": "SPEC", "dataset": "SPEC", "student": "SPEC", "eval_dataset": "SPEC", "online_teacher": "SPEC",
    "hidden": "MODULE", "output_key": "KEY", "mask_key": "KEY", "logits_dtype": "DTYPE", "hidden_dtype": "DTYPE",
    "topk": "K", "sample_k": "N", "sample_temperature": "T", "tail_samples": "N", "sample_draws": "HOW", "vocab_size": "V", "views": "K", "seed": "S",
    "batch_size": "N", "num_workers": "N", "device": "DEVICE", "amp": "MODE", "out": "PATH", "cache_root": "DIR",
    "block_rows": "N", "writer_threads": "N", "cache": "PATH", "eval_cache": "PATH", "temperature": "T",
    "alpha": "A", "hint": "S=T[:LOSS][@WEIGHT]", "epochs": "N", "lr": "LR", "optimizer": "NAME",
    "weight_decay": "WD", "in_memory": "WHEN", "view": "HOW", "replay": "N", "positions": "N",
    "path": "CACHE", "root": "ROOT", "runs": "RUN_DIR",
}


def _metavar(name: str) -> str:
    if name in _METAVARS:
        return _METAVARS[name]
    if name.endswith("_kwargs"):
        return "JSON"
    if name.endswith(("checkpoint", "config")):
        return "FILE"
    return name.rsplit("_", 1)[-1].upper()


class HelpCommand(typer.core.TyperCommand):
    """A command whose help names each option's value by what it is (``--teacher SPEC``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if param.metavar is None and not getattr(param, "is_flag", False) and param.name:
                param.metavar = _metavar(param.name)
        return params
