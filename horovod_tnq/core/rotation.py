"""Randomized Hadamard rotation of buckets: the first step of the rotated scheme "tnq-rht".

Each bucket of ``bucket_size`` (a power of two) consecutive elements is multiplied by random
signs d and then by the Walsh-Hadamard matrix H (entries +-1, H H = n I, no 1/sqrt(n) factor:
the bucket's scale absorbs it). The coordinates of r = H (d * x) are sums of n terms with random
signs, close to N(0, ||x||^2) whatever the gradient's tails or outliers (DRIVE, Vargaftik et al.,
NeurIPS 2021; EDEN, ICML 2022), so one level table fitted to the Gaussian serves every gradient.
The inverse is x = d * H r / n; the decoder folds 1/n into each bucket's scale.

The signs come from the counter-based stream of rng.py (element i's sign is bit i % 32 of
random_words(i // 32): one hash per 32 signs), keyed by the sender's (seed, rank, tensor,
step): each rank rotates differently, so quantization errors are independent across ranks and
fall like 1/N in the average. The payload carries the key and step (payload.py), so any rank can
undo the rotation.

The last bucket of a tensor is padded with zeros to the full bucket size. Butterflies run in the
work dtype (float32 for float32 and narrower tensors) in a fixed order; each output of a stage is
one IEEE addition or subtraction, so the compiled kernel (native.c) produces the same bits.
"""

import numpy as np

from .rng import random_words

# A bucket must fit a core's cache during its butterflies; at least 8 elements, so that each
# bucket's codes start on a byte (and a scale per fewer elements would cost more than it buys).
MIN_BUCKET, MAX_BUCKET = 8, 1 << 16


def check_bucket_size(bucket_size):
    if not (isinstance(bucket_size, (int, np.integer)) and MIN_BUCKET <= bucket_size <= MAX_BUCKET
            and bucket_size & (bucket_size - 1) == 0):
        raise ValueError(f"the rotated scheme needs bucket_size a power of two in [{MIN_BUCKET}, "
                         f"{MAX_BUCKET}], got {bucket_size!r}")
    return int(bucket_size)


def padded_size(numel, bucket_size):
    """Elements after padding the last bucket to the full bucket size."""
    return -(-int(numel) // bucket_size) * bucket_size


def signs(n, key, step, dtype=np.float32):
    """n random signs (+1 or -1, as ``dtype``) for a key and a step: element i is negative
    where bit i % 32 of word i // 32 of the stream is set."""
    words = random_words(-(-n // 32), key, step).astype("<u4")
    negative = np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(bool)
    return np.where(negative, -1.0, 1.0).astype(dtype)


def hadamard(rows):
    """Unnormalised fast Walsh-Hadamard transform of each row, in place (rows: 2-D, C order,
    row length a power of two). Stage h pairs elements i and i + h (bit h of i clear) into
    (x[i] + x[i + h], x[i] - x[i + h]), for h = 1, 2, 4, ..."""
    count, n = rows.shape
    h = 1
    while h < n:
        pairs = rows.reshape(count, n // (2 * h), 2, h)
        first = pairs[:, :, 0, :].copy()
        pairs[:, :, 0, :] += pairs[:, :, 1, :]
        np.subtract(first, pairs[:, :, 1, :], out=pairs[:, :, 1, :])
        h *= 2
    return rows


def rotate(flat, bucket_size, key, step):
    """H (d * x) per bucket of ``flat`` (padded with zeros): rows of ``bucket_size``, in flat's
    dtype."""
    n = padded_size(flat.size, bucket_size)
    rows = np.zeros(n, dtype=flat.dtype)
    rows[: flat.size] = flat
    rows *= signs(n, key, step, flat.dtype)
    return hadamard(rows.reshape(-1, bucket_size))


def unrotate(rows, key, step):
    """d * H r for rows of rotated buckets whose scales already include 1/n: the flat values,
    padding included."""
    flat = hadamard(rows).reshape(-1)
    flat *= signs(flat.size, key, step, flat.dtype)
    return flat
