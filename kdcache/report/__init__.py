"""Pictures of a cache and of training runs (matplotlib, the ``kdcache[plot]`` extra).

- :mod:`.stats`   what a cache's stored outputs say, as numbers (no matplotlib)
- :mod:`.canvas`  off-screen matplotlib figures
- :mod:`.cache`   ``kdcache report``: a cache's figures and one HTML page
- :mod:`.runs`    ``kdcache plot``: runs side by side from their ``metrics.jsonl``
"""

from .cache import CacheReport, ReportFigure, write_report
from .runs import RunsFigure, plot_runs, read_metrics
from .stats import CacheStats, cache_stats

__all__ = ["CacheStats", "cache_stats", "CacheReport", "ReportFigure", "write_report", "RunsFigure", "plot_runs",
           "read_metrics"]
