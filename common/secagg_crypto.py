"""Secure aggregation's cryptography and arithmetic, with no Flower messages: shared by client/ and server/.

Flower's sound primitives are used for what they do well, and their import paths are pinned HERE only:
ECDH key pairs on P-384 and their PEM encoding (flwr.supercore.primitives.asymmetric), ECDH + HKDF-SHA256
into a Fernet key and Fernet's authenticated encryption (flwr.common.secure_aggregation.crypto.
symmetric_encryption), Shamir sharing over GF(2^128) (flwr.common.secure_aggregation.crypto.shamir).
Flower's mask generator (`pseudo_rand_gen`) is NOT used: it folds the 32-byte seed into 32 bits for numpy's
RandomState, so different seeds can give the same masks. Masks here are AES-256-CTR key streams.

All vectors live in Z_{2^bits}, held as uint64 (bits <= 62, so a sum of two never overflows before the mod).
"""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

MIN_BITS, MAX_BITS = 8, 62
_CURVE = ec.SECP384R1()  # the curve flwr's generate_key_pairs uses
_SCALAR_BYTES = 48


class SecAggError(ValueError):
    """A protocol step that cannot go on: a bad reply, a failed decryption, too few survivors (one line)."""


# --- keys, agreement, authenticated encryption -------------------------------------------------------------

def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh ECDH key pair as (private PEM, public PEM)."""
    private, public = generate_key_pairs()
    return private_key_to_bytes(private), public_key_to_bytes(public)


def agree(private_pem: bytes, peer_public_pem: bytes) -> bytes:
    """ECDH then HKDF-SHA256: a 32-byte key (Fernet's url-safe base64 form) both ends derive alike."""
    try:
        return generate_shared_key(bytes_to_private_key(private_pem), bytes_to_public_key(peer_public_pem))
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"key agreement failed: {exc}") from None


def is_public_key(pem: object) -> bool:
    try:
        bytes_to_public_key(pem)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return False
    return True


def public_of(private_pem: bytes) -> bytes:
    """The public key (PEM) of a private key, to check a key rebuilt from shares against the one announced."""
    return public_key_to_bytes(bytes_to_private_key(private_pem).public_key())


def same_public_key(a: bytes, b: bytes) -> bool:
    return public_key_to_bytes(bytes_to_public_key(a)) == public_key_to_bytes(bytes_to_public_key(b))


def mask_seed(shared_key: bytes) -> bytes:
    """The 32 raw bytes behind an agreed key, used as the AES key of a pairwise mask."""
    return base64.urlsafe_b64decode(shared_key)


def seal(key: bytes, payload: dict) -> bytes:
    """Authenticated encryption (Fernet: AES-128-CBC + HMAC-SHA256) of a JSON payload."""
    return encrypt(key, json.dumps(payload, sort_keys=True).encode())


def open_sealed(key: bytes, token: bytes) -> dict:
    try:
        return json.loads(decrypt(key, token))
    except (InvalidToken, ValueError, TypeError):
        raise SecAggError("a share did not decrypt: it was altered or not sealed for this node") from None


# --- secret sharing ----------------------------------------------------------------------------------------

def split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir shares: any `threshold` of the `num` rebuild the secret, fewer reveal nothing about it."""
    return create_shares(secret, threshold, num)


def join_shares(shares: list[bytes]) -> bytes:
    try:
        return combine_shares(shares)
    except (ValueError, IndexError):
        raise SecAggError("shares did not combine into a secret") from None


def private_scalar(private_pem: bytes) -> bytes:
    """A private key as its 48-byte scalar: what is Shamir-shared (4 AES blocks instead of a ~300-byte PEM)."""
    value = bytes_to_private_key(private_pem).private_numbers().private_value
    return value.to_bytes(_SCALAR_BYTES, "big")


def private_from_scalar(scalar: bytes) -> bytes:
    key = ec.derive_private_key(int.from_bytes(scalar, "big"), _CURVE)
    return private_key_to_bytes(key)


# --- masks -------------------------------------------------------------------------------------------------

def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` values uniform in Z_{2^bits}: the AES-256-CTR key stream of `seed` (32 bytes, or hashed to 32).
    A cryptographic PRG, so a mask is indistinguishable from uniform to whoever lacks the seed."""
    key = seed if len(seed) == 32 else hashlib.sha256(seed).digest()
    width = 4 if bits <= 32 else 8  # half the key stream when 32 bits suffice
    stream = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * (width * length))
    return np.frombuffer(stream, dtype=f"<u{width}").astype(np.uint64) & np.uint64((1 << bits) - 1)


def modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def add_mod(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return (a + b) & modulus_mask(bits)


def sub_mod(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    # uint64 wraps modulo 2^64, a multiple of 2^bits, so the low bits are right.
    return (a - b) & modulus_mask(bits)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> Z_{2^bits} (two's complement in the low bits)."""
    return np.asarray(values, dtype=np.int64).astype(np.uint64) & modulus_mask(bits)


def from_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Z_{2^bits} -> signed integers in [-2^(bits-1), 2^(bits-1))."""
    v = np.asarray(values, dtype=np.uint64).astype(np.int64)
    half = 1 << (bits - 1)
    return np.where(v >= half, v - (1 << bits), v)


def pair_sign(me: int, peer: int) -> int:
    """+1 for the lower id of a pair, -1 for the higher: the two masks of a pair cancel in the sum."""
    return 1 if me < peer else -1


def masked_input(values: np.ndarray, bits: int, self_seed: bytes, pair_seeds: dict[int, bytes], me: int) -> np.ndarray:
    """y = x + PRG(b) + sum_j sign(me, j) PRG(s_{me,j})  (mod 2^bits)."""
    out = add_mod(np.asarray(values, dtype=np.uint64), prg(self_seed, len(values), bits), bits)
    for peer, seed in pair_seeds.items():
        mask = prg(seed, len(values), bits)
        out = add_mod(out, mask, bits) if pair_sign(me, peer) > 0 else sub_mod(out, mask, bits)
    return out


def unmask(masked: dict[int, np.ndarray], bits: int, self_seeds: dict[int, bytes],
           orphan_pairs: dict[tuple[int, int], bytes]) -> np.ndarray:
    """The sum of the survivors' inputs from their masked vectors.

    self_seeds: each survivor's self-mask seed (rebuilt from shares); orphan_pairs: (survivor, dropped) ->
    the seed of the pairwise mask the survivor added for a neighbour that dropped after the shares went out."""
    if not masked:
        raise SecAggError("no masked input to unmask")
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=np.uint64)
    for node, y in masked.items():
        total = add_mod(total, y, bits)
        total = sub_mod(total, prg(self_seeds[node], length, bits), bits)
    for (alive, dropped), seed in orphan_pairs.items():
        mask = prg(seed, length, bits)
        total = sub_mod(total, mask, bits) if pair_sign(alive, dropped) > 0 else add_mod(total, mask, bits)
    return total


# --- neighbour graph ---------------------------------------------------------------------------------------

def neighbour_graph(nodes: list[int], shares: int, seed: int) -> dict[int, list[int]]:
    """SecAgg+'s sparse graph: a ring over a seeded permutation, each node linked to the (shares-1)//2 nearest
    on each side (so each node's secrets go to `shares` holders counting itself, rounded down to odd).
    shares = 0 or >= len(nodes): the complete graph (plain SecAgg)."""
    n = len(nodes)
    if shares <= 0 or shares >= n:
        return {a: [b for b in nodes if b != a] for a in nodes}
    order = [nodes[i] for i in np.random.default_rng(seed).permutation(n)]
    half = max(1, (shares - 1) // 2)
    graph: dict[int, set[int]] = {a: set() for a in nodes}
    for pos, a in enumerate(order):
        for step in range(1, half + 1):
            b = order[(pos + step) % n]
            graph[a].add(b)
            graph[b].add(a)
    return {a: sorted(graph[a]) for a in nodes}


# --- quantization (plain SecAgg: no DP) --------------------------------------------------------------------

def quantize(values: np.ndarray, clip_range: float, scale: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Clip each coordinate to [-clip_range, clip_range], scale, round stochastically (unbiased), map into
    Z_{2^bits}. The server picks `scale` so that the sum of every sampled client cannot wrap around."""
    x = np.clip(np.asarray(values, dtype=np.float64), -clip_range, clip_range) * scale
    floor = np.floor(x)
    return to_ring(floor + (rng.random(x.shape) < (x - floor)), bits)


def plain_scale(clip_range: float, bits: int, max_clients: int) -> float:
    """The largest scale at which `max_clients` clipped, quantized values sum without wrapping."""
    limit = (1 << (bits - 1)) - 1
    return (limit // max_clients - 1) / clip_range
