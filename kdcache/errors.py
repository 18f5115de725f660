"""The one exception type for user mistakes."""

__all__ = ["KdcacheError"]


class KdcacheError(Exception):
    """A mistake the user can fix: bad spec, mismatched cache, unwritable path...

    The CLI prints ``str(err)`` as one line and exits with status 2. Anything else raised
    inside kdcache is a bug and keeps its traceback.
    """
