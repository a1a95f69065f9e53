"""What Horovod's response cache saves the stock optimizer with TNQCompressor: step time with the
cache on (Horovod's default) and off (HOROVOD_CACHE_CAPACITY=0, which hvd.join() needs with
horovod_tnq, docs/limits.md).

    python -m benchmarks.response_cache [--workers 2] [--layers 48] [--steps 60] [--repeats 3]

Runs real horovodrun workers on this machine (Gloo over loopback): an MLP of --layers 128x128
linear layers (two tensors each, so a step negotiates many small collectives, where the cache
matters most), hvd.DistributedOptimizer with TNQCompressor(), the same batch every step. The
cache on and off alternate --repeats times; each run prints rank 0's median step time over the
timed steps, then the medians' ratio. Nothing is asserted: the machine's load moves the times.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from benchmarks.launcher import horovodrun_command, run_ranks, worker_env


def worker(out_dir, layers, steps, warmup):
    import horovod.torch as hvd
    import torch

    from horovod_tnq.torch import TNQCompressor

    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[module for _ in range(layers)
                                  for module in (torch.nn.Linear(128, 128), torch.nn.ReLU())])
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                         named_parameters=model.named_parameters(),
                                         compression=TNQCompressor())
    x = torch.randn(32, 128)
    seconds = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump({"median_ms": 1000 * statistics.median(seconds[warmup:])}, f)


def measure(args, cache):
    with tempfile.TemporaryDirectory() as out_dir:
        program = ["-m", "benchmarks.response_cache", "--worker", out_dir, "--layers",
                   str(args.layers), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command = horovodrun_command(args.workers, None, program)
        env = worker_env(None if cache else {"HOROVOD_CACHE_CAPACITY": "0"})
        return run_ranks(command, args.workers, out_dir, env, args.timeout)[0]["median_ms"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker", metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.layers, args.steps, args.warmup)
    runs = {True: [], False: []}
    for _ in range(args.repeats):
        for cache in (True, False):
            runs[cache].append(measure(args, cache))
            print(f"{args.workers} workers, cache {'on ' if cache else 'off'}: "
                  f"{runs[cache][-1]:.1f} ms a step", flush=True)
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    print(f"medians: cache on {on:.1f} ms, off {off:.1f} ms; off / on = {off / on:.3f}")


if __name__ == "__main__":
    sys.exit(main())
