"""Shamir secret sharing of 32-byte secrets over GF(2**521 - 1).

A secret is read as a big-endian integer, which is below 2**256 and so an
element of the field. A share is the value of a random polynomial of degree
``threshold - 1`` at a public point ``x``; it travels as ``SHARE_BYTES``
big-endian bytes. Any ``threshold`` shares give the secret back; fewer reveal
nothing about it.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence

from broker.secagg.errors import SecAggError

PRIME: int = 2**521 - 1
"""A Mersenne prime, comfortably above every 32-byte secret."""
SHARE_BYTES = 66
"""The fixed length of a share: ceil(521 / 8) bytes, big-endian."""
SECRET_BYTES = 32
MAX_X = 2**31
"""Evaluation points are 1..MAX_X: never 0, which is where the secret sits."""


def _check_x(x: int) -> None:
    # bool is an int; a share "at True" is surely a bug.
    if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_X:
        raise SecAggError(f"share point {x!r} is not an integer in 1..{MAX_X}")


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Share a 32-byte secret so that any ``threshold`` of the shares recover it.

    Parameters
    ----------
    secret
        Exactly 32 bytes.
    xs
        Distinct share points in 1..2**31, one per holder.
    threshold
        How many shares reconstruct the secret, 1..len(xs).

    Returns
    -------
    dict[int, bytes]
        Each point's share, ``SHARE_BYTES`` big-endian bytes.
    """
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    for x in xs:
        _check_x(x)
    if len(set(xs)) != len(xs):
        raise SecAggError("share points are not distinct")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} is not in 1..{len(xs)}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner, highest degree first
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares.

    Exactly ``threshold`` shares are used, those with the smallest points, so
    the result does not depend on the mapping's order. Every share given is
    checked, used or not.

    Parameters
    ----------
    shares
        Share point -> share, as ``split`` returned them.
    threshold
        The threshold the secret was split with.

    Returns
    -------
    bytes
        The 32-byte secret.
    """
    if threshold < 1:
        raise SecAggError(f"threshold {threshold} is below 1")
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot meet threshold {threshold}")
    ys: dict[int, int] = {}
    for x, share in shares.items():
        _check_x(x)
        if len(share) != SHARE_BYTES:
            raise SecAggError(f"share at {x} is {len(share)} bytes, not {SHARE_BYTES}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise SecAggError(f"share at {x} is not an element of the field")
        ys[x] = y
    points = tuple(sorted(ys)[:threshold])
    secret = sum(
        ys[x] * weight for x, weight in zip(points, _lagrange_at_zero(points), strict=True)
    )
    secret %= PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        # Too few genuine shares, or shares of different secrets.
        raise SecAggError("the shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    """Return the Lagrange weights that evaluate the polynomial through ``points`` at 0.

    ``w_i = prod_{j != i} x_j / (x_j - x_i)``. The products of the small
    differences are exact integers (reduced once), and one modular inverse
    serves every point (Montgomery's batch inversion): the coordinator
    rebuilds a secret per device of a round, often from the same points.
    """
    product = 1
    for x in points:
        product *= x
    product %= PRIME
    # w_i = product / (x_i * d_i), with d_i = prod_{j != i} (x_j - x_i).
    divisors = []
    for i in points:
        d = i
        for j in points:
            if j != i:
                d *= j - i
        divisors.append(d % PRIME)
    prefix = [1]
    for d in divisors:
        prefix.append(prefix[-1] * d % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    weights = [0] * len(points)
    for k in range(len(points) - 1, -1, -1):
        weights[k] = product * inverse * prefix[k] % PRIME  # product / divisors[k]
        inverse = inverse * divisors[k] % PRIME
    return tuple(weights)
