"""GPU cost of the codec's Triton kernels (horovod_tnq.gpu): encode and decode-of-8 time for
"tnq-rht" and "tnq" against a device-to-device copy of the same float32 tensor and torch's
float16 cast, measured in the same process (CUDA events, warm-up, median of repeats).

    python -m benchmarks.gpu_speed [--elements 1048576 16777216 100000000] [--bits 2 4 8]

Each time is also given as a fraction of the copy's memory roofline: (bytes the operation must
read + write) / time, over the copy's (2 * 4 bytes per element) / time. Encode moves the float32
tensor in and its payload out; "decode 8" reads eight ranks' payloads and writes the float32
sum. A fraction near 1 means the kernel runs at the copy's bandwidth.

Encode times include the codec's one small read-back (whether a rare path is needed), decode
times the read-back of the payloads' headers: what a training step pays.

Before timing, each configuration's payloads and decoded sum are compared byte for byte with
the core's (native.c where built, else numpy) at sizes up to --check-max elements, so a fast
wrong kernel cannot pass unnoticed. Without CUDA the script says so and exits 0.
"""

import argparse
import statistics
import sys
import time

import numpy as np

BUCKET = 512


def cuda_time(function, repeats, warmup):
    """Median milliseconds of ``function`` over ``repeats`` runs, after ``warmup`` runs."""
    import torch
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_exact(x, scheme, bits, payloads, total, factor):
    """The GPU's payloads and sum against the core's, byte for byte."""
    from horovod_tnq.core import codec
    host = x.cpu().numpy()
    expected = [codec.encode(host, scheme=scheme, bits=bits, bucket_size=BUCKET, key=key)
                for key in range(1, len(payloads) + 1)]
    for key, (got, want) in enumerate(zip(payloads, expected), 1):
        if got.cpu().numpy().tobytes() != want.tobytes():
            raise SystemExit(f"MISMATCH: {scheme} {bits} bits, {x.numel()} elements, key {key}: "
                             "GPU payload differs from the core's")
    want, _ = codec.decode_sum(np.concatenate(expected), codec.read_header(expected[0]), factor,
                               out_dtype=np.float32)
    if total.cpu().numpy().tobytes() != want.tobytes():
        raise SystemExit(f"MISMATCH: {scheme} {bits} bits, {x.numel()} elements: GPU decode_sum "
                         "differs from the core's")


def measure_size(n, args, device):
    """Print the copy, the float16 cast and every (scheme, bits) row for n elements."""
    import torch

    from horovod_tnq import gpu
    from horovod_tnq.core import codec
    generator = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(n, device=device, generator=generator)
    dst = torch.empty_like(x)
    copy_ms = cuda_time(lambda: dst.copy_(x), args.repeats, args.warmup)
    copy_rate = 8.0 * n / copy_ms / 1e6  # GB/s
    half_ms = cuda_time(lambda: x.to(torch.float16), args.repeats, args.warmup)
    dst = None
    print(f"\n{n} elements: copy {copy_ms:.3f} ms ({copy_rate:.0f} GB/s), float16 cast "
          f"{half_ms:.3f} ms ({6.0 * n / half_ms / 1e6 / copy_rate:.2f} of copy)")
    print(f"{'scheme':8} {'bits':>4} {'elements':>10} | {'encode ms':>9} {'GB/s':>7} "
          f"{'of copy':>7} | {'decode8 ms':>10} {'GB/s':>7} {'of copy':>7}")
    out = torch.empty(n, dtype=torch.float32, device=device)
    for scheme in args.schemes:
        for bits in args.bits:
            settings = dict(scheme=scheme, bits=bits, bucket_size=BUCKET)
            payloads = [gpu.encode(x, key=key, **settings) for key in range(1, 9)]
            buf = torch.cat(payloads)
            expect = codec.PayloadHeader.describe(scheme, bits, "float32", n, BUCKET, (n,))
            total, _ = gpu.decode_sum(buf, expect, 1 / 8, out=out)
            checked = ""
            if n <= args.check_max:
                started = time.perf_counter()
                check_exact(x, scheme, bits, payloads, total, 1 / 8)
                checked = f"  (exact; checked in {time.perf_counter() - started:.1f} s)"
            size = payloads[0].numel()
            payloads = None
            encode_ms = cuda_time(lambda: gpu.encode(x, key=1, **settings), args.repeats,
                                  args.warmup)
            decode_ms = cuda_time(lambda: gpu.decode_sum(buf, expect, 1 / 8, out=out),
                                  args.repeats, args.warmup)
            encode_rate = (4.0 * n + size) / encode_ms / 1e6
            decode_rate = (8.0 * size + 4.0 * n) / decode_ms / 1e6
            print(f"{scheme:8} {bits:>4} {n:>10} | {encode_ms:>9.3f} {encode_rate:>7.0f} "
                  f"{encode_rate / copy_rate:>7.2f} | {decode_ms:>10.3f} {decode_rate:>7.0f} "
                  f"{decode_rate / copy_rate:>7.2f}{checked}")
            sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, nargs="+", default=[1 << 20, 1 << 24, 10 ** 8])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--schemes", nargs="+", default=["tnq-rht", "tnq"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--check-max", type=int, default=None,
                        help="compare with the core up to this many elements (0: never; "
                        "default 16M with native.c built, else 1M: numpy is slower)")
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("gpu_speed: torch is not installed; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("gpu_speed: no CUDA device here; the GPU codec is measured on a machine with one "
              "(scripts/gpu_check.sh)")
        return 0
    from horovod_tnq import gpu
    if not gpu.available():
        print("gpu_speed: triton is not installed; nothing to measure")
        return 0

    if args.check_max is None:
        from horovod_tnq.core import native
        args.check_max = 1 << 24 if native.LIBRARY is not None else 1 << 20
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; bucket size {BUCKET}; median of "
          f"{args.repeats} after {args.warmup} warm-up runs")
    for n in args.elements:
        measure_size(n, args, device)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
