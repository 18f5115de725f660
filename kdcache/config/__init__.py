"""Settings that travel between the CLI, config files and the library, declared and checked once.

- :mod:`.checks`  :func:`~.checks.setting` declarations, type and range checks
- :mod:`.dump`    :class:`DumpConfig`: stage one
- :mod:`.train`   :class:`TrainConfig`, :class:`Hint`: stage two
"""

from .checks import AMP_CHOICES
from .dump import DumpConfig
from .train import Hint, TrainConfig

__all__ = ["DumpConfig", "TrainConfig", "Hint", "AMP_CHOICES"]
