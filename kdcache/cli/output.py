"""How the command line reports what went wrong: usage mistakes and kdcache's warnings, one
line each on stderr (``kdcache: error: ...``, ``kdcache: warning: ...``)."""

from __future__ import annotations

import contextlib
import difflib
import functools
import warnings
from typing import Any, Callable, Iterator, Optional

import typer

from ..errors import KdcacheError

__all__ = ["run_app", "usage_line", "warnings_as_lines", "echo", "user_errors"]


def _click_exceptions() -> Any:
    try:
        from typer._click import exceptions  # typer >= 0.25 carries its own click
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions
    return exceptions


def usage_line(err: Any) -> str:
    """One line for a usage mistake: what was wrong, the closest option, where to look."""
    message = " ".join(err.format_message().split()).rstrip(".")
    possibilities = list(getattr(err, "possibilities", None) or [])
    if possibilities:  # click's "(Possible options: ...)": the closest one, as a question
        best = difflib.get_close_matches(str(err.option_name), possibilities, n=1, cutoff=0)[0]
        message = f"{err.message.rstrip('.')} (did you mean {best}?)"
    where = err.ctx.command_path if err.ctx is not None else "kdcache"
    return f"kdcache: error: {message[:1].lower()}{message[1:]}; see '{where} --help'"


def run_app(app: typer.Typer, argv: Optional[list[str]] = None) -> int:
    """Run ``app`` on ``argv``; its exit status. Usage mistakes are one line and status 2; a
    bare ``kdcache`` prints the help."""
    exceptions = _click_exceptions()
    try:
        code = app(args=argv, prog_name="kdcache", standalone_mode=False)
    except getattr(exceptions, "NoArgsIsHelpError", ()) as err:
        typer.echo(err.format_message())
        return 0
    except exceptions.UsageError as err:
        typer.echo(usage_line(err), err=True)
        return 2
    except exceptions.ClickException as err:
        typer.echo(f"kdcache: error: {' '.join(err.format_message().split())}", err=True)
        return int(err.exit_code)
    except typer.Abort:
        return 1
    return code if isinstance(code, int) else 0


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """kdcache's own warnings as one ``kdcache: warning: ...`` line on stderr, when they happen."""
    from ..errors import KdcacheWarning

    shown = warnings.showwarning

    def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, KdcacheWarning):
            typer.echo(f"kdcache: warning: {message}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def echo(text: str, err: bool = False) -> None:
    """Print one or more lines with control characters escaped: text from a cache's metadata or
    from files must not reach the terminal raw (escape sequences, carriage returns)."""
    typer.echo("\n".join(_printable(line) for line in str(text).split("\n")), err=err)


def _printable(line: str) -> str:
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


def user_errors(fn: Callable[..., Any], interrupted: str = "") -> Callable[..., Any]:
    """Print a KdcacheError as one line and exit 2; Ctrl-C exits 130 without a traceback, with
    what is true of the command's work: the interrupt's own message when it carries one (a
    training run says which epoch its directory holds), else ``interrupted``."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdcacheError as err:
            echo(f"kdcache: error: {err}", err=True)
            raise typer.Exit(getattr(err, "exit_code", 2)) from None
        except KeyboardInterrupt as err:
            said = str(err) or interrupted
            echo(f"kdcache: interrupted{'; ' + said if said else ''}", err=True)
            raise typer.Exit(130) from None
    return wrapper
