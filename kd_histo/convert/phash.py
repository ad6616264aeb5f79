"""Groups near-duplicate tiles by a flip/rotation-invariant perceptual hash (``--group_by=phash``).

Sets such as LC25000 were made by flipping and rotating a few hundred originals; a split by file
leaks near-copies of one original into train and test. Each image gets a 64-bit DCT hash (pHash:
32x32 grayscale, low 8x8 DCT coefficients above their median) for each of the 8 flips/90-degree
rotations; two images are linked when some transform of one is within ``max_distance`` bits of the
other, and linked images form one pseudo-slide (connected components).

It removes only part of the leakage: small-angle rotations and crops of one original can still
hash far apart. This module does not read labels or choose splits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash_variants(rgb: np.ndarray) -> np.ndarray:
    """The 8 pHashes (uint64) of an image under the dihedral group (flips, 90-degree turns)."""
    gray = np.asarray(Image.fromarray(rgb).convert("L").resize((32, 32), Image.BOX), np.float64)
    out = np.zeros(8, np.uint64)
    for k in range(8):
        g = np.rot90(gray, k % 4)
        if k >= 4:
            g = g[:, ::-1]
        coef = (_DCT32 @ g @ _DCT32.T)[:8, :8].ravel()
        bits = coef > np.median(coef[1:])  # DC term excluded from the threshold, as in pHash
        out[k] = np.packbits(bits).view(">u8")[0]
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of broadcastable uint64 arrays."""
    x = np.bitwise_xor(a, b)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def group_by_hash(hashes: np.ndarray, max_distance: int = 8, chunk: int = 128) -> np.ndarray:
    """Connected components of "some variant within ``max_distance`` bits".

    Args:
      hashes: uint64 [N, 8] from :func:`phash_variants`.
      max_distance: link threshold in bits (of 64).
      chunk: rows compared at once (memory ~ chunk * N * 64 bytes).

    Returns:
      int64 [N] group index per image; groups are numbered by their first member, so the result
      depends only on the input order.
    """
    n = len(hashes)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    base = hashes[:, 0]
    for start in range(0, n, chunk):
        rows = hashes[start : start + chunk]  # [c, 8]
        d = hamming(rows[:, None, :], base[None, :, None]).min(-1)  # [c, N]
        for r, j in zip(*np.nonzero(d <= max_distance)):
            a, b = find(start + r), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n)])
    _, first = np.unique(roots, return_index=True)
    order = {root: k for k, root in enumerate(roots[np.sort(first)])}
    return np.array([order[r] for r in roots], np.int64)
