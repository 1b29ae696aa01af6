"""The one error secure aggregation raises.

Its own module so that every ``broker.secagg`` module can import it without
importing the package's ``__init__`` (which imports them all).
"""

from __future__ import annotations


class SecAggError(ValueError):
    """Inputs that the secure-aggregation primitives refuse: bad shares, keys, seeds, sizes."""
