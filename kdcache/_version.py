"""kdcache's version: read by the package, recorded in every cache it writes, and by pyproject."""

__version__ = "0.1.0"
