"""Who shares secrets with whom in a secure round: SecAgg+'s sparse neighbourhoods.

Bell et al. (2020) replace Bonawitz et al.'s complete graph with a random
k-regular one (a Harary graph on a random permutation of the devices; an odd
degree on an odd number of devices gives each device one neighbour more):
each device masks against and shares with ``k`` neighbours, so its work
grows with ``log n`` instead of ``n``. The graph is a function of the
round's seed and the devices that advertised keys, so a restarted
coordinator draws the same one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FAILURE = 1e-6
"""The chance a round may fail to unmask with no more than its expected dropouts."""


def degree_for(n: int, dropout: float, fraction: float, failure: float = FAILURE) -> int:
    """Return the neighbours each of ``n`` devices needs to survive ``dropout`` of them vanishing.

    A round unmasks when every neighbourhood (``degree + 1`` devices) keeps
    ``threshold_for(degree, fraction)`` members to the end. With each device
    vanishing independently with probability ``dropout``, the degree is the
    smallest, from about ``4 log2 n`` (Bell et al.'s O(log n), a floor that
    keeps a neighbourhood from being a handful of devices), whose chance that
    any of the ``n`` neighbourhoods falls short is at most ``failure``; or
    every other device, when no sparser graph is safe.
    """
    if n <= 1:
        return 0
    floor = min(n - 1, 4 * math.ceil(math.log2(n)))
    for degree in range(floor, n - 1):
        short = _short_chance(degree + 1, threshold_for(degree, fraction), 1.0 - dropout)
        if n * short <= failure:
            return degree
    return n - 1


def _short_chance(members: int, needed: int, stay: float) -> float:
    """Return the chance that fewer than ``needed`` of ``members`` stay (binomial tail)."""
    if stay >= 1.0:
        return 0.0
    if stay <= 0.0:
        return 1.0
    log_stay, log_go = math.log(stay), math.log1p(-stay)
    total = 0.0
    for kept in range(needed):
        total += math.exp(
            math.lgamma(members + 1)
            - math.lgamma(kept + 1)
            - math.lgamma(members - kept + 1)
            + kept * log_stay
            + (members - kept) * log_go
        )
    return total


def threshold_for(degree: int, fraction: float) -> int:
    """Return how many shares of a neighbourhood (``degree + 1`` devices) rebuild a secret.

    With ``fraction`` above one half this is a strict majority: a coordinator
    that told two halves of a neighbourhood different stories about who
    dropped still could not gather both a seed's and a key's shares.
    """
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
