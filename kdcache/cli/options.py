"""A command's options, each declared once.

A stage's settings are declared on their config dataclass (:func:`kdcache.config.checks.setting`):
field, keyword argument, TOML key, default and help in one place. An option of the command line
alone (a spec, a path, how Hugging Face loads a model) is an :class:`Option` here. A command lists
its options in the order ``--help`` shows them, naming settings by field: :func:`command` turns
the list into the typer parameters of one function, so a flag, its help and its default cannot
drift apart, and a setting with help that a command does not list is an error at import.

Typer parameters are made with a default of None (a flag not given), so that ``--config``
TOML keys fill what the flags leave out and the dataclass default applies last.
"""

from __future__ import annotations

import functools
import inspect
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

from ..errors import KdcacheError

__all__ = ["Option", "command", "config_option", "hf_options", "merge_config", "text", "kwargs_of", "HFOptions",
           "TEXT_COLUMN", "MAX_LENGTH", "TOKENIZER", "read_dataset"]


@dataclass(frozen=True)
class Option:
    """One command-line option: ``name`` (its parameter and TOML key), ``kind`` (the value's
    type), ``help`` (a sentence ending in "."), ``shown`` (the default shown as ``[shown]``),
    ``metavar``, ``switch`` (a bool's flag declaration), ``default`` (None: not given) and
    ``setting`` (the config field it fills, when it is one)."""

    name: str
    kind: Any
    help: str
    shown: Any = None
    metavar: str | None = None
    switch: str | None = None
    default: Any = None
    setting: str | None = None

    @property
    def help_line(self) -> str:
        return self.help if self.shown is None else f"{self.help[:-1]} [{self.shown}]."

    def parameter(self) -> inspect.Parameter:
        declared = [self.switch] if self.switch else []
        info = typer.Option(self.default, *declared, help=self.help_line, metavar=self.metavar,
                            show_default=self.default is not None)
        kind = Optional[self.kind] if self.default is None else self.kind
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)


def _cli_kind(annotation: Any) -> Any:
    """The type a flag parses for a settings field: ``X | None`` -> X; ``tuple[X, ...]`` -> a
    repeatable string option (its items are checked by the settings)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return list[str]
    return args[0] if args and type(None) in typing.get_args(annotation) else annotation


@functools.lru_cache(maxsize=None)
def _settings_options(settings: type) -> dict[str, Option]:
    """The options a settings dataclass declares (fields with help), by field name."""
    hints = typing.get_type_hints(settings)
    out = {}
    for f in fields(settings):
        declared = f.metadata
        if declared.get("help"):
            out[f.name] = Option(declared["flag"] or f.name, _cli_kind(hints[f.name]), declared["help"],
                                 declared["shown"], declared["metavar"], declared["switch"], setting=f.name)
    return out


def _resolved(settings: type, layout: Sequence[Option | str]) -> list[Option]:
    declared = _settings_options(settings)
    named = [item for item in layout if isinstance(item, str)]
    unplaced = sorted(set(declared) - set(named))
    unknown = sorted(set(named) - set(declared))
    if unplaced or unknown:
        raise RuntimeError(f"{settings.__name__}: settings with help not placed on the command line {unplaced}, "
                           f"names that are no such setting {unknown}")
    return [declared[item] if isinstance(item, str) else item for item in layout]


def command(settings: type, layout: Sequence[Option | str], body: Callable[[dict[str, Any]], None],
            doc: str) -> Callable[..., None]:
    """A typer command function whose parameters are ``layout``'s options (a string names a field of
    ``settings``), in that order; it calls ``body`` with ``{option name: value or None}``."""
    options = _resolved(settings, layout)

    def run(**values: Any) -> None:
        body(values)

    run.__signature__ = inspect.Signature([o.parameter() for o in options])  # type: ignore[attr-defined]
    run.__doc__ = doc
    run.__name__ = body.__name__
    run.options = options  # type: ignore[attr-defined]
    return run


def config_option() -> Option:
    return Option("config", Path, "TOML file with any of these options as keys (flags override).", metavar="FILE")


def hf_options(role: str, class_help: str, dtype_help: str, text_help: str, length_help: str) -> list[Option]:
    """``--hf-class``, ``--hf-dtype``, ``--text-column`` and ``--max-length`` of a command that
    loads the ``role`` (teacher or student)."""
    return [Option("hf_class", str, f"hf:PATH {role}: transformers class to load it with{class_help}.",
                   shown="the config's", metavar="CLASS"),
            Option("hf_dtype", str, f"hf:PATH {role}: float32, float16, bfloat16 or auto{dtype_help}.",
                   shown="float32", metavar="DTYPE"),
            Option("text_column", str, f"Hugging Face dataset: tokenize this text column{text_help}.",
                   metavar="COLUMN"),
            Option("max_length", int, f"Hugging Face dataset: truncate and pad token rows to this length{length_help}.",
                   metavar="LENGTH")]


def _load_config(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as err:
        raise KdcacheError(f"cannot read --config {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise KdcacheError(f"--config {path} is not valid TOML: {err}") from None
    return {k.replace("-", "_"): v for k, v in values.items()}


def merge_config(flags: dict[str, Any]) -> dict[str, Any]:
    """The ``--config`` file's keys, overridden by the flags given (those not None)."""
    config = flags.pop("config", None)
    given = {k: v for k, v in flags.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)}
    return {**_load_config(config), **given}


def text(values: dict[str, Any], key: str) -> str | None:
    """Pop a spec or path setting: a string (a flag's path too), or None when not given."""
    raw = values.pop(key, None)
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, Path):
        return str(raw)
    raise KdcacheError(f"--{key.replace('_', '-')} must be a string, got {raw!r:.60}")


def kwargs_of(values: dict[str, Any], key: str) -> dict[str, Any]:
    """Pop a ``*_kwargs`` setting: a TOML table, or a JSON object given as a flag."""
    from ..spec import parse_kwargs

    raw = values.pop(key, None)
    flag = f"--{key.replace('_', '-')}"
    if raw is None or isinstance(raw, dict):
        return raw or {}
    if not isinstance(raw, str):
        raise KdcacheError(f"{flag} must be a JSON object (or a TOML table), got {raw!r:.60}")
    return parse_kwargs(raw, flag)


class HFOptions:
    """The Hugging Face loading options of a command (``--hf-class``, ``--hf-dtype``,
    ``--text-column``, ``--max-length``, ``--tokenizer``): how specs become models and datasets."""

    KEYS = ("hf_class", "hf_dtype", "text_column", "max_length", "tokenizer")  # popped before the settings

    def __init__(self, values: dict[str, Any]) -> None:
        self.hf_class, self.hf_dtype = values.get("hf_class"), values.get("hf_dtype")
        self.text_column, self.max_length = values.get("text_column"), values.get("max_length")
        self.tokenizer = values.get("tokenizer")

    @classmethod
    def pop_from(cls, values: dict[str, Any]) -> "HFOptions":
        return cls({k: values.pop(k) for k in cls.KEYS if k in values})

    def tokenizer_for(self, spec: str, role: str) -> Any:
        """The tokenizer in ``--tokenizer`` or beside an hf: model (None when there is none).
        Every Hugging Face load of the command happens offline, after this."""
        from ..models.hf import is_hf_spec, load_tokenizer, offline

        offline()
        source = self.tokenizer or (spec if is_hf_spec(spec) else None)
        return load_tokenizer(source, role=role, required=self.tokenizer is not None) if source else None

    def model(self, spec: str, kwargs: dict[str, Any], checkpoint: Any, role: str) -> Any:
        from ..spec import load_model

        return load_model(spec, kwargs, checkpoint, role=role, hf_class=self.hf_class, hf_dtype=self.hf_dtype)

    def dataset(self, spec: str, kwargs: dict[str, Any], tokenizer: Any) -> Any:
        from ..spec import load_dataset

        return load_dataset(spec, kwargs, tokenizer=tokenizer, text_column=self.text_column, max_length=self.max_length)


# --text-column, --max-length and --tokenizer of the commands that read a cache's dataset again
# (verify --replay, report, export): the rows must be tokenized as they were at dump time
TEXT_COLUMN = typer.Option(None, help="Hugging Face dataset: tokenize this text column (as at dump time).",
                           metavar="COLUMN")
MAX_LENGTH = typer.Option(None, help="Hugging Face dataset: truncate and pad token rows to this length (as at dump "
                                     "time).", metavar="LENGTH")
TOKENIZER = typer.Option(None, help="Tokenizer directory for --text-column (the teacher's).", metavar="DIR")


def read_dataset(spec: str, kwargs: Optional[str], text_column: Optional[str], max_length: Optional[int],
                 tokenizer: Optional[str]) -> Any:
    """The dataset a cache was dumped from, named again on the command line (its spec, its
    ``--dataset-kwargs`` JSON, and how its text was tokenized)."""
    from ..models.hf import load_tokenizer, offline
    from ..spec import load_dataset, parse_kwargs

    offline()
    tok = load_tokenizer(tokenizer, required=True) if tokenizer else None
    return load_dataset(spec, parse_kwargs(kwargs, "--dataset-kwargs"), tokenizer=tok, text_column=text_column,
                        max_length=max_length)
