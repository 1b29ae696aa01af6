"""Who shares secrets with whom in a secure round: SecAgg+'s sparse neighbourhoods.

Bell et al. (2020) replace Bonawitz et al.'s complete graph with a random
k-regular one (a Harary graph on a random permutation of the devices):
each device masks against and shares with ``k`` neighbours, so its work
grows with ``log n`` instead of ``n``. The graph is a function of the
round's seed and the devices that advertised keys, so a restarted
coordinator draws the same one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def default_degree(n: int) -> int:
    """Return the neighbours each device gets by default in a round of ``n`` devices.

    About ``4 log2 n`` (Bell et al.'s O(log n), with room for dropouts), so
    every other device when ``n`` is at most 20.
    """
    return max(0, min(n - 1, 4 * math.ceil(math.log2(max(n, 2)))))


def threshold_for(degree: int, fraction: float) -> int:
    """Return how many shares of a neighbourhood (``degree + 1`` devices) rebuild a secret."""
    return max(2, min(degree + 1, math.ceil(fraction * (degree + 1))))


def neighbourhoods(
    devices: Sequence[str], degree: int, seed: Sequence[int]
) -> dict[str, tuple[str, ...]]:
    """Return each device's neighbours (sorted, not itself) in a random ``degree``-regular graph.

    The devices are placed on a ring in a random order (``seed``); each is
    joined to the ``degree // 2`` nearest on either side, and, for an odd
    degree, to the one opposite. A ``degree`` of ``n - 1`` or more joins every
    pair.
    """
    ordered = sorted(devices)
    n = len(ordered)
    if degree >= n - 1:
        return {d: tuple(x for x in ordered if x != d) for d in ordered}
    ring = [ordered[i] for i in np.random.default_rng(list(seed)).permutation(n)]
    links: dict[str, set[str]] = {d: set() for d in ordered}
    for i, device in enumerate(ring):
        offsets = list(range(1, degree // 2 + 1))
        if degree % 2:
            offsets.append(n // 2)
        for step in offsets:
            other = ring[(i + step) % n]
            if other != device:
                links[device].add(other)
                links[other].add(device)
    return {d: tuple(sorted(links[d])) for d in ordered}
