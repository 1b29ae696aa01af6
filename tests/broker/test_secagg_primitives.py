"""broker.secagg: Shamir sharing, key agreement and sealing, masks, quantisation, layout."""

from __future__ import annotations

import itertools
import math
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import broker.secagg
from broker.secagg import (
    PRIME,
    SHARE_BYTES,
    AgreementKey,
    SecAggError,
    agree,
    apply_mask,
    combine,
    dequantize,
    expand,
    flatten,
    open_sealed,
    quantize,
    scale_for,
    seal,
    split,
    unflatten,
)

SECRET = bytes(range(1, 33))


def _recovers(shares: dict[int, bytes], threshold: int, secret: bytes) -> bool:
    """Whether combine gives ``secret`` back (an error counts as not recovering it)."""
    try:
        return combine(shares, threshold) == secret
    except SecAggError:
        return False


def test_the_public_surface() -> None:
    assert sorted(broker.secagg.__all__) == [
        "AgreementKey",
        "MODULUS_BITS",
        "PRIME",
        "SHARE_BYTES",
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
    assert issubclass(SecAggError, ValueError)


# Shamir ----------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 6])
def test_any_threshold_shares_recover_the_secret(threshold: int) -> None:
    xs = [1, 2, 3, 17, 1000, 2**31]
    shares = split(SECRET, xs, threshold)

    assert sorted(shares) == sorted(xs)
    assert all(len(share) == SHARE_BYTES for share in shares.values())
    for k in range(threshold, len(xs) + 1):
        for subset in itertools.combinations(xs, k):
            assert combine({x: shares[x] for x in subset}, threshold) == SECRET


@pytest.mark.parametrize(
    "secret", [bytes(32), b"\xff" * 32, bytes(range(7, 39))], ids=["zeros", "ones", "mixed"]
)
def test_extreme_secrets_round_trip(secret: bytes) -> None:
    shares = split(secret, range(1, 8), 4)

    assert combine(shares, 4) == secret


@pytest.mark.parametrize("threshold", [2, 3, 5])
def test_fewer_than_threshold_shares_do_not_give_the_secret(threshold: int) -> None:
    xs = list(range(1, 8))
    shares = split(SECRET, xs, threshold)

    for subset in itertools.combinations(xs, threshold - 1):
        partial = {x: shares[x] for x in subset}
        with pytest.raises(SecAggError, match="threshold"):
            combine(partial, threshold)
        assert not _recovers(partial, threshold - 1, SECRET)


def test_combine_uses_exactly_the_threshold_smallest_points() -> None:
    shares = split(SECRET, [5, 1, 9, 3, 7], 3)
    garbage = (PRIME - 1).to_bytes(SHARE_BYTES, "big")

    # Points 1, 3, 5 are used; wrong (but well-formed) shares at 7 and 9 are ignored.
    assert combine({**shares, 7: garbage, 9: garbage}, 3) == SECRET
    # Insertion order does not matter.
    assert combine(dict(reversed(list(shares.items()))), 3) == SECRET
    # A wrong share among the three smallest does change the outcome.
    assert not _recovers({**shares, 3: garbage}, 3, SECRET)


def test_shares_are_random_but_threshold_one_is_the_secret_itself() -> None:
    assert split(SECRET, [1, 2, 3], 2) != split(SECRET, [1, 2, 3], 2)
    ones = split(SECRET, [1, 2, 3], 1)
    assert set(ones.values()) == {SECRET.rjust(SHARE_BYTES, b"\0")}


@pytest.mark.parametrize(
    ("secret", "xs", "threshold", "match"),
    [
        (SECRET[:31], [1, 2], 2, "32 bytes"),
        (SECRET + b"\0", [1, 2], 2, "32 bytes"),
        (SECRET, [0, 1], 1, "share point"),
        (SECRET, [-1, 1], 1, "share point"),
        (SECRET, [1, 2**31 + 1], 1, "share point"),
        (SECRET, [True, 2], 1, "share point"),
        (SECRET, [1, 2, 2], 2, "distinct"),
        (SECRET, [1, 2, 3], 0, "threshold"),
        (SECRET, [1, 2, 3], 4, "threshold"),
        (SECRET, [], 1, "threshold"),
    ],
)
def test_split_refuses_bad_inputs(secret: bytes, xs: list[int], threshold: int, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        split(secret, xs, threshold)


def test_combine_refuses_bad_shares() -> None:
    shares = split(SECRET, [1, 2, 3], 2)

    with pytest.raises(SecAggError, match="bytes"):
        combine({**shares, 2: shares[2][1:]}, 2)
    with pytest.raises(SecAggError, match="field"):
        combine({**shares, 2: PRIME.to_bytes(SHARE_BYTES, "big")}, 2)
    with pytest.raises(SecAggError, match="share point"):
        combine({0: shares[1], 2: shares[2]}, 2)
    with pytest.raises(SecAggError, match="threshold"):
        combine(shares, 0)
    with pytest.raises(SecAggError, match="threshold"):
        combine({}, 1)
    # Shares of two different secrets interpolate to garbage, almost surely > 32 bytes.
    other = split(bytes(32), [1, 2, 3], 2)
    with pytest.raises(SecAggError, match="32-byte"):
        combine({1: shares[1], 2: other[2]}, 2)


# Keys --------------------------------------------------------------------------------------


def test_agreement_is_symmetric_and_bound_to_its_context() -> None:
    a, b, c = AgreementKey.generate(), AgreementKey.generate(), AgreementKey.generate()

    ab = agree(a, b.public_bytes(), context=b"round-1/share")
    assert len(ab) == 32
    assert ab == agree(b, a.public_bytes(), context=b"round-1/share")
    assert ab != agree(a, b.public_bytes(), context=b"round-1/mask")
    assert ab != agree(a, b.public_bytes(), context=b"round-2/share")
    assert ab != agree(a, c.public_bytes(), context=b"round-1/share")


def test_keys_round_trip_through_raw_bytes() -> None:
    key = AgreementKey.generate()
    raw = key.private_bytes()
    again = AgreementKey.from_private_bytes(raw)

    assert len(raw) == 32 and len(key.public_bytes()) == 32
    assert again.public_bytes() == key.public_bytes()
    assert again.private_bytes() == raw
    assert raw.hex() not in repr(key)
    # A private key survives Shamir sharing, which is how dropped devices' keys are rebuilt.
    assert combine(split(raw, [1, 2, 3, 4], 3), 3) == raw


def test_malformed_keys_are_refused() -> None:
    key = AgreementKey.generate()

    with pytest.raises(SecAggError):
        AgreementKey.from_private_bytes(bytes(31))
    with pytest.raises(SecAggError, match="32 bytes"):
        agree(key, key.public_bytes()[:31], context=b"x")
    with pytest.raises(SecAggError, match="unusable"):
        agree(key, bytes(32), context=b"x")  # a low-order point: all-zero shared secret


def test_seal_round_trips_and_is_randomised() -> None:
    key = secrets.token_bytes(32)

    blob = seal(key, b"share bytes", aad=b"from d1 to d2")
    assert open_sealed(key, blob, aad=b"from d1 to d2") == b"share bytes"
    assert len(blob) == 12 + len(b"share bytes") + 16
    assert seal(key, b"share bytes", aad=b"a") != seal(key, b"share bytes", aad=b"a")
    assert open_sealed(key, seal(key, b"", aad=b""), aad=b"") == b""


def test_tampering_is_detected() -> None:
    key = secrets.token_bytes(32)
    blob = seal(key, b"share bytes", aad=b"from d1 to d2")

    for i in (0, 12, len(blob) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[i] ^= 1
        with pytest.raises(SecAggError, match="authenticate"):
            open_sealed(key, bytes(tampered), aad=b"from d1 to d2")
    with pytest.raises(SecAggError, match="authenticate"):
        open_sealed(key, blob, aad=b"from d1 to d3")
    with pytest.raises(SecAggError, match="authenticate"):
        open_sealed(secrets.token_bytes(32), blob, aad=b"from d1 to d2")
    with pytest.raises(SecAggError, match="short"):
        open_sealed(key, blob[:27], aad=b"from d1 to d2")
    with pytest.raises(SecAggError, match="32 bytes"):
        seal(key[:16], b"x", aad=b"")


# Masks -------------------------------------------------------------------------------------


def _ctr_by_hand(seed: bytes, count: int) -> np.ndarray:
    """The CTR keystream built from AES blocks of counters 0, 1, 2, ... (big-endian)."""
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = math.ceil(count * 4 / 16)
    counters = b"".join(i.to_bytes(16, "big") for i in range(blocks))
    stream = ecb.update(counters) + ecb.finalize()
    return np.frombuffer(stream[: 4 * count], dtype="<u4").astype(np.uint32)


def test_expand_is_the_aes_ctr_keystream() -> None:
    zero = expand(bytes(32), 4)
    # AES-256 of the zero block under the zero key, the first keystream block.
    assert bytes(zero.astype("<u4").tobytes()).hex() == "dc95c078a2408989ad48a21492842087"

    seed = bytes(range(32))
    mask = expand(seed, 1001)
    assert mask.dtype == np.uint32 and mask.shape == (1001,)
    np.testing.assert_array_equal(mask, _ctr_by_hand(seed, 1001))


def test_expand_is_deterministic_and_differs_per_seed() -> None:
    seed = secrets.token_bytes(32)

    np.testing.assert_array_equal(expand(seed, 100), expand(seed, 100))
    np.testing.assert_array_equal(expand(seed, 100)[:37], expand(seed, 37))
    assert not np.array_equal(expand(seed, 100), expand(secrets.token_bytes(32), 100))
    assert expand(seed, 0).shape == (0,)
    with pytest.raises(SecAggError, match="32 bytes"):
        expand(seed[:16], 10)
    with pytest.raises(SecAggError):
        expand(seed, -1)


@pytest.mark.parametrize("size", [0, 1, 7, 13, 1001])
@pytest.mark.parametrize("chunk", [1, 3, 8, 1 << 20])
@pytest.mark.parametrize("sign", [1, -1])
def test_apply_mask_in_chunks_equals_the_whole_mask(size: int, chunk: int, sign: int) -> None:
    rng = np.random.default_rng(size * chunk)
    seed = bytes(range(32, 64))
    acc = rng.integers(0, 2**32, size=size, dtype=np.uint32)
    expected = ((acc.astype(np.int64) + sign * expand(seed, size).astype(np.int64)) % 2**32).astype(
        np.uint32
    )

    apply_mask(acc, seed, sign, chunk=chunk)

    np.testing.assert_array_equal(acc, expected)


def test_adding_then_removing_a_mask_restores_the_vector() -> None:
    rng = np.random.default_rng(0)
    original = rng.integers(0, 2**32, size=12345, dtype=np.uint32)
    acc = original.copy()
    seed = secrets.token_bytes(32)

    apply_mask(acc, seed, 1, chunk=1000)
    assert not np.array_equal(acc, original)
    apply_mask(acc, seed, -1, chunk=8)
    np.testing.assert_array_equal(acc, original)


def test_apply_mask_refuses_bad_arguments() -> None:
    acc = np.zeros(8, dtype=np.uint32)
    seed = bytes(32)

    for sign in (0, 2, True):
        with pytest.raises(SecAggError, match="sign"):
            apply_mask(acc, seed, sign)
    with pytest.raises(SecAggError, match="chunk"):
        apply_mask(acc, seed, 1, chunk=0)
    with pytest.raises(SecAggError, match="uint32"):
        apply_mask(np.zeros(8, dtype=np.int32), seed, 1)
    with pytest.raises(SecAggError, match="uint32"):
        apply_mask(np.zeros((2, 4), dtype=np.uint32), seed, 1)
    with pytest.raises(SecAggError, match="uint32"):
        apply_mask(np.zeros(16, dtype=np.uint32)[::2], seed, 1)
    readonly = np.zeros(8, dtype=np.uint32)
    readonly.flags.writeable = False
    with pytest.raises(SecAggError, match="read-only"):
        apply_mask(readonly, seed, 1)
    with pytest.raises(SecAggError, match="32 bytes"):
        apply_mask(acc, seed[:31], 1)
    np.testing.assert_array_equal(acc, 0)


def test_pairwise_and_self_masks_cancel_in_the_sum() -> None:
    rng = np.random.default_rng(1)
    n, size = 3, 1000
    clip, weights = 1.0, [3.0, 1.0, 7.0]
    scale = scale_for(clip, sum(weights))
    updates = [rng.uniform(-clip, clip, size) for _ in range(n)]
    keys = [AgreementKey.generate() for _ in range(n)]
    self_seeds = [secrets.token_bytes(32) for _ in range(n)]

    masked, plain = [], []
    for i in range(n):
        q, _ = quantize(updates[i], clip=clip, weight=weights[i], scale=scale)
        plain.append(q.copy())
        for j in range(n):
            if j != i:
                seed = agree(keys[i], keys[j].public_bytes(), context=b"mask")
                apply_mask(q, seed, 1 if i < j else -1, chunk=64)
        apply_mask(q, self_seeds[i], 1)
        masked.append(q)

    assert not any(np.array_equal(m, p) for m, p in zip(masked, plain, strict=True))
    total = np.zeros(size, dtype=np.uint32)
    for m in masked:
        np.add(total, m, out=total)
    for seed in self_seeds:  # the service removes the self masks it reconstructed
        apply_mask(total, seed, -1)
    expected = np.zeros(size, dtype=np.uint32)
    for p in plain:
        np.add(expected, p, out=expected)
    np.testing.assert_array_equal(total, expected)
    weighted = sum(w * u for w, u in zip(weights, updates, strict=True))
    assert np.max(np.abs(dequantize(total, scale) - weighted)) <= n * 0.5 / scale


# Quantisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 100])
def test_quantised_sums_are_within_the_documented_bound(n: int) -> None:
    rng = np.random.default_rng(n)
    clip = 0.5
    weights = rng.uniform(1, 50, n)
    scale = scale_for(clip, float(weights.sum()))
    vectors = [rng.uniform(-clip, clip, 5000) for _ in range(n)]

    total = np.zeros(5000, dtype=np.uint32)
    for w, v in zip(weights, vectors, strict=True):
        q, clipped = quantize(v, clip=clip, weight=float(w), scale=scale)
        assert q.dtype == np.uint32 and clipped == 0
        np.add(total, q, out=total)
    exact = sum(w * v for w, v in zip(weights, vectors, strict=True))
    error = np.max(np.abs(dequantize(total, scale) - exact))

    assert error <= n * 0.5 / scale
    assert np.any(dequantize(total, scale) < 0)  # negative sums decode through the wrap


def test_negative_values_survive_the_uint32_wrap() -> None:
    q, clipped = quantize(np.array([-1.5, -0.25, 0.0, 0.25, 1.0]), clip=2, weight=1, scale=4)

    assert clipped == 0
    assert q.tolist() == [2**32 - 6, 2**32 - 1, 0, 1, 4]
    np.testing.assert_array_equal(dequantize(q, 4), [-1.5, -0.25, 0.0, 0.25, 1.0])


def test_clipping_is_counted_and_applied() -> None:
    values = np.array([-3.0, -2.0, 0.0, 1.0, 2.25, 5.0], dtype=np.float32)

    q, clipped = quantize(values, clip=2.0, weight=2.0, scale=8.0)

    assert clipped == 3  # exactly +-clip is not clipped
    np.testing.assert_array_equal(dequantize(q, 8.0), [-4.0, -4.0, 0.0, 2.0, 4.0, 4.0])


def test_quantize_refuses_bad_inputs() -> None:
    ok = np.zeros(3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(SecAggError, match="clip"):
            quantize(ok, clip=bad, weight=1, scale=1)
        with pytest.raises(SecAggError, match="weight"):
            quantize(ok, clip=1, weight=bad, scale=1)
        with pytest.raises(SecAggError, match="scale"):
            quantize(ok, clip=1, weight=1, scale=bad)
    for bad_value in (math.nan, math.inf, -math.inf):
        with pytest.raises(SecAggError, match="NaN"):
            quantize(np.array([0.0, bad_value]), clip=1, weight=1, scale=1)
    with pytest.raises(SecAggError, match="flat"):
        quantize(np.zeros((2, 2)), clip=1, weight=1, scale=1)
    with pytest.raises(SecAggError, match="2\\*\\*31"):
        quantize(ok, clip=1, weight=2, scale=2.0**30)
    with pytest.raises(SecAggError, match="uint32"):
        dequantize(np.zeros(3, dtype=np.int32), 1.0)


@pytest.mark.parametrize(("clip", "weight"), [(1.0, 1.0), (0.1, 1000.0), (3.0, 7.0), (1e-6, 1.0)])
def test_scale_is_the_largest_power_of_two_in_budget(clip: float, weight: float) -> None:
    budget = (2**31 - 1) / 2

    scale = scale_for(clip, weight)

    assert math.frexp(scale)[0] == 0.5  # a power of two
    assert clip * weight * scale <= budget < clip * weight * scale * 2


def test_scale_for_refuses_bad_inputs() -> None:
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(SecAggError):
            scale_for(bad, 1.0)
        with pytest.raises(SecAggError):
            scale_for(1.0, bad)
    with pytest.raises(SecAggError, match="precision"):
        scale_for(1e12, 1e12)


# Layout ------------------------------------------------------------------------------------


def test_flatten_orders_by_sorted_name_in_c_order() -> None:
    b = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensors = {
        "layer.weight": np.asfortranarray(b),  # Fortran memory, still flattened in C order
        "bias": np.array([10.0, 11.0], dtype=np.float32),
        "scalar": np.array(12.0, dtype=np.float32),
    }

    flat = flatten(tensors)

    assert flat.dtype == np.float32
    assert flat.tolist() == [10.0, 11.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 12.0]
    back = unflatten(flat, {name: t.shape for name, t in tensors.items()})
    assert list(back) == ["bias", "layer.weight", "scalar"]
    for name, tensor in tensors.items():
        assert back[name].shape == tensor.shape
        np.testing.assert_array_equal(back[name], tensor)


def test_layout_errors() -> None:
    with pytest.raises(SecAggError, match="no tensors"):
        flatten({})
    with pytest.raises(SecAggError, match="mixed"):
        flatten({"a": np.zeros(2, dtype=np.float32), "b": np.zeros(2, dtype=np.float64)})
    with pytest.raises(SecAggError, match="hold 5 values"):
        unflatten(np.zeros(6), {"a": (2, 2), "b": (1,)})
    with pytest.raises(SecAggError, match="flat"):
        unflatten(np.zeros((2, 3)), {"a": (6,)})
    with pytest.raises(SecAggError, match="negative"):
        unflatten(np.zeros(0), {"a": (-1, 0)})
