"""The error a reduced tensor may have, for the worker scripts of both frameworks (numpy)."""

import numpy as np

from horovod_tnq import CompressorConfig, core
from horovod_tnq.protocol import choose_exchange, chunk_bounds


def quantizer_bound(x, bits, bucket_size):
    """Sum over elements of the Laplace error bound 27 gamma^2 / (s + c)^2 per bucket."""
    x = np.asarray(x, np.float64).reshape(-1)
    gammas = core.mean_abs_per_bucket(x, bucket_size)
    counts = np.full(gammas.size, bucket_size)
    counts[-1] = x.size - bucket_size * (gammas.size - 1)
    return float(core.laplace_error_bound(bits) * (gammas ** 2 * counts).sum())


def error_report(result, inputs, reduce_sum, bits, bucket_size=512, exchange="auto"):
    """The squared error of a reduced tensor against the true sum or mean, beside the error the
    quantizer promises: the Laplace bound for each rank's quantization, plus, when the
    reduce-scatter exchange ran, for the owners' second quantization of each chunk's sum."""
    stacked = np.stack([np.asarray(x, np.float64).reshape(-1) for x in inputs])
    n = len(inputs)
    truth = stacked.sum(0) if reduce_sum else stacked.mean(0)
    weight = 1.0 if reduce_sum else 1.0 / n
    bound = weight ** 2 * sum(quantizer_bound(x, bits, bucket_size) for x in stacked)
    config = CompressorConfig(bits=bits, bucket_size=bucket_size, exchange=exchange)
    kind = choose_exchange(config, truth.size, n)
    if kind == "reduce-scatter":
        total = stacked.sum(0)
        bound += weight ** 2 * sum(quantizer_bound(total[start:stop], bits, bucket_size)
                                   for start, stop in chunk_bounds(total.size, n, bucket_size))
    error = float(((np.asarray(result, np.float64).reshape(-1) - truth) ** 2).sum())
    return {"error": error, "bound": bound, "truth_norm2": float((truth ** 2).sum()),
            "exchange": kind}
