"""Seeded pseudo-random permutations and draws computed elementwise, in O(1) memory.

The loaders index data by position (document i of an epoch, sample g of the global sequence) and
must map positions to items without a table as long as the data: `Permutation` is a bijection of
[0, n) evaluated on any array of positions, and `uniform` a counter-based draw per position, so a
position's item is the same wherever and whenever it is computed (any rank, worker or resume).
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a good 64-bit mixing function."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_int(z: int) -> int:
    """_mix on one Python int (numpy on one element costs ~10x: a loader of tiny documents makes a key per epoch)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, tags, indices)."""
    z = 0
    for p in parts:
        z = _mix_int(z ^ (p & _M64))
    return z


def uniform(seed_key: int, positions: np.ndarray) -> np.ndarray:
    """(n,) float64 in [0, 1): a counter-based draw per position (the same wherever it is computed)."""
    z = _mix(np.asarray(positions, dtype=np.uint64) ^ np.uint64(seed_key))
    return (_mix(z ^ np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Permutation:
    """A seeded bijection of [0, n), evaluated elementwise with O(1) memory.

    A 4-round balanced Feistel network on the smallest even-bit domain 2^(2h) >= n, restricted to
    [0, n) by cycle walking (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002): an
    output >= n is encrypted again until it falls in range. The domain is < 4n, so few walks.
    """

    def __init__(self, n: int, seed_key: int) -> None:
        assert n >= 1
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(mix_key(seed_key, r)) for r in range(4)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def _encrypt_int(self, x: int) -> int:
        """_encrypt on one Python int (the same bits)."""
        h, mask = self.half, int(self.mask)
        left, right = x >> h, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix_int(right ^ int(k)) & mask)
        return (left << h) | right

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.uint64)
        if x.size <= 16:  # per element in Python: numpy's per-call cost dominates a source of a few documents
            out_int = []
            for v in x.reshape(-1).tolist():
                v = self._encrypt_int(v)
                while v >= self.n:
                    v = self._encrypt_int(v)
                out_int.append(v)
            return np.array(out_int, dtype=np.int64).reshape(x.shape)
        out = self._encrypt(x)
        bad = out >= np.uint64(self.n)
        while bad.any():
            out[bad] = self._encrypt(out[bad])
            bad = out >= np.uint64(self.n)
        return out.astype(np.int64)


