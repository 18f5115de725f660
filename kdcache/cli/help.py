"""How ``--help`` names option values: ``--teacher SPEC``, ``--hint S=T[:LOSS][@WEIGHT]``."""

from __future__ import annotations

from typing import Any

import typer

__all__ = ["HelpCommand"]

# What an option's value looks like in the help of the commands that are not built from declared
# options (info, ls, verify, import, export, report, plot): "--dataset SPEC", not typer's "<str>".
# Options not named here get one from their name (see _metavar); dump-teacher's and train-student's
# options declare their own (kdcache.cli.options).
_METAVARS = {"dataset": "SPEC", "out": "PATH", "vocab_size": "V", "topk": "K", "replay": "N", "positions": "N",
             "path": "CACHE", "root": "ROOT", "runs": "RUN_DIR"}


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
