"""The ``kdcache`` app: its commands registered, and :func:`main`, the console script."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from ..errors import speak_cli
from . import caches, figures
from .dump_teacher import dump_teacher_cmd
from .help import HelpCommand
from .output import run_app, user_errors
from .train_student import train_student_cmd

__all__ = ["app", "main"]

# Plain click help (rich_markup_mode=None): rich's markup would eat bracketed text such as
# "cuda[:N]" or "[@WEIGHT]", and its tables cut long option names at 80 columns. Nothing here
# imports torch at module level: `kdcache --help` stays fast.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"max_content_width": 100},
                  help="Offline knowledge distillation: dump the teacher once, train students from the cache.")

# what an interrupted command leaves (the others have nothing to resume)
INTERRUPTED = {"dump-teacher": "rerun the same command to resume: the finished blocks are kept"}
# name, short help, function: in the order `kdcache --help` lists them
COMMANDS = [
    ("dump-teacher", "Run the teacher once; cache its outputs.", dump_teacher_cmd),
    ("train-student", "Train a student from a cache.", train_student_cmd),
    *caches.COMMANDS,
    ("report", "Draw what a cache holds (PNGs + HTML).", figures.report_cmd),
    ("plot", "Draw training runs side by side.", figures.plot_cmd),
]
for name, short, function in COMMANDS:
    app.command(name, short_help=short, cls=HelpCommand)(user_errors(function, INTERRUPTED.get(name, "")))


def main(argv: Optional[list[str]] = None) -> None:
    """The ``kdcache`` command. A usage mistake (unknown option, missing or bad value) is one
    line on stderr naming the closest option, exit status 2."""
    speak_cli()  # error messages name flags (--overwrite), not arguments (overwrite=True)
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("RANK") or 0) > 0:
        sys.stdout = open(os.devnull, "w")  # under torchrun the results print once, from rank 0
    code = 1
    try:
        code = run_app(app, argv)
    finally:
        if "torch.distributed" in sys.modules:  # only a command that used it imported it
            from ..distributed import shutdown
            shutdown(clean=code == 0)
    sys.exit(code)


if __name__ == "__main__":
    main()
