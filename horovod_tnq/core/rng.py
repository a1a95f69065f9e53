"""Counter-based random numbers for stochastic rounding.

Element i of a tensor gets a uniform draw that depends only on (key, step, i), never on how many
draws were made before, so the noise is reproducible per (seed, rank, tensor, step), independent
of thread counts and chunking, and simple to re-implement bit for bit elsewhere (native.c does,
element by element). The key is fixed per tensor and computed once in Python; the step is a
separate 32-bit input.
The mixer is the "lowbias32" integer hash (C. Wellons, hash-prospector).
"""

import zlib

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN32 = np.uint32(0x9E3779B9)


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_key(seed, rank, name):
    """A 64-bit key for one tensor's draws; every ingredient changes the whole stream."""
    key = _splitmix64(int(seed) & _MASK64)
    for part in (int(rank), zlib.crc32(str(name).encode("utf-8"))):
        key = _splitmix64(key ^ (part & _MASK64))
    return key


def key_words(key):
    """The key as the two uint32 words the noise generator uses: (low, high)."""
    return key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF


def _lowbias32(x):
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def random_words(n, key, step=0):
    """n uint32 words for a 64-bit key and a step number: element i's word depends only on
    (key, step, i). Schemes that need more than one draw per element use derived keys
    (``derived_key``)."""
    lo, hi = (np.uint32(word) for word in key_words(key))
    with np.errstate(over="ignore"):
        step_word = _lowbias32(np.array([int(step) & 0xFFFFFFFF], dtype=np.uint32) ^ hi)
        x = np.arange(n, dtype=np.uint32)
        x *= _GOLDEN32
        x ^= lo
        x = _lowbias32(x)
        x ^= step_word
        return _lowbias32(x)


def derived_key(key, index):
    """A key for the ``index``-th extra stream of a tensor, independent of ``key``'s own."""
    return _splitmix64((int(key) ^ _splitmix64(int(index) + 1)) & _MASK64)


def uniform_noise(n, key, step=0):
    """n float32 draws in [0, 1), multiples of 2**-24, for a 64-bit key and a step number."""
    x = random_words(n, key, step)
    x >>= np.uint32(8)
    noise = x.astype(np.float32)
    noise *= np.float32(2.0 ** -24)
    return noise
