"""Built-in examples usable by spec, e.g. ``kdcache.examples.digits:teacher``."""
