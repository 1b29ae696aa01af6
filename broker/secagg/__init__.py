"""Cryptographic primitives of secure aggregation (SecAgg+), shared by devices and the service.

Following Bonawitz et al. 2017 and Bell et al. 2020:

- ``shamir``: t-of-n secret sharing of 32-byte seeds and private keys.
- ``keys``: X25519 key agreement with HKDF, and AES-256-GCM sealing of shares.
- ``masks``: pseudo-random masks mod 2**32, fixed-point quantisation, and the
  flattening order of named tensors.
"""

from broker.secagg.errors import SecAggError
from broker.secagg.keys import AgreementKey, agree, open_sealed, seal
from broker.secagg.masks import (
    MODULUS_BITS,
    apply_mask,
    dequantize,
    expand,
    flatten,
    quantize,
    scale_for,
    unflatten,
)
from broker.secagg.shamir import PRIME, SHARE_BYTES, combine, split

__all__ = [
    "MODULUS_BITS",
    "PRIME",
    "SHARE_BYTES",
    "AgreementKey",
    "SecAggError",
    "agree",
    "apply_mask",
    "combine",
    "dequantize",
    "expand",
    "flatten",
    "open_sealed",
    "quantize",
    "scale_for",
    "seal",
    "split",
    "unflatten",
]
