"""The ``kdcache`` command line: thin wrappers that parse, call the library and print.

- :mod:`.app`            the typer app, its commands, :func:`main`
- :mod:`.options`        options declared once (settings from the config dataclasses), ``--config`` TOML
- :mod:`.dump_teacher`   ``dump-teacher``
- :mod:`.train_student`  ``train-student``
- :mod:`.caches`         ``info``, ``ls``, ``verify``, ``import``, ``export``
- :mod:`.figures`        ``report``, ``plot``
- :mod:`.help`           how ``--help`` names option values
- :mod:`.output`         one-line errors and warnings, escaped output

Nothing here imports torch at module level: ``kdcache --help`` stays fast.
"""

from .app import app, main

__all__ = ["app", "main"]
