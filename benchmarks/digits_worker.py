"""One Horovod worker of the training benchmarks (bandwidth.py, scaling_bytes.py, convergence.py).

Trains an MLP on scikit-learn's digits with ``hvd.DistributedOptimizer`` and the compressor named
by a spec (see jobs.py), for a fixed number of untimed warm-up steps and then timed steps, and
rank 0 prints one report line (JSON after jobs.REPORT_MARKER):

- samples per second over the timed steps, and each step split (mean over ranks) into
  compute (forward, backward and the optimizer update, without the compressor's work),
  encode (the compressor's compress() calls, during backward), decode (CPU time of this
  thread inside decompress()) and communication wait (the rest of optimizer.synchronize():
  collectives that backward did not hide, and any time this thread waited for a core), and the
  CPU time of the whole process (Horovod's background thread included) per step;
- bytes each rank's network interface sent and received per timed step, from
  /sys/class/net/<interface>/statistics (TCP/IP headers and Horovod's coordination included),
  and what the compressor handed to Horovod when it keeps such counts;
- training loss per step (mean over ranks), test loss and accuracy at ``--eval-every`` steps and
  at the end.

    horovodrun -np 2 -H localhost:2 --gloo python -m benchmarks.digits_worker \
        --compressor tnq:bits=4
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import horovod.torch as hvd
import torch

import horovod_tnq.torch as tnq
from benchmarks.jobs import REPORT_MARKER, parse_spec
from examples.digits import load_shard
from horovod_tnq.torch import get_compressor


class TimedCompression:
    """A Horovod compressor that times another one: wall time of compress() (encoding runs on
    the thread that calls backward) and this thread's CPU time inside decompress(), which tells
    decoding apart from waiting for a collective (Horovod waits by sleeping)."""

    def __init__(self, inner):
        self.inner = inner
        self.compress_s = 0.0
        self.decompress_cpu_s = 0.0

    def compress(self, tensor):
        start = time.perf_counter()
        try:
            return self.inner.compress(tensor)
        finally:
            self.compress_s += time.perf_counter() - start

    def decompress(self, tensor, ctx):
        start = time.thread_time()
        try:
            return self.inner.decompress(tensor, ctx)
        finally:
            self.decompress_cpu_s += time.thread_time() - start

    def time_fused(self):
        """Time the inner TNQCompressor's start() and finish(), which the fused optimizer calls
        instead of compress() and decompress()."""
        start, finish = self.inner.start, self.inner.finish

        def timed_start(*args, **kwargs):
            began = time.perf_counter()
            try:
                return start(*args, **kwargs)
            finally:
                self.compress_s += time.perf_counter() - began

        def timed_finish(*args, **kwargs):
            began = time.thread_time()
            try:
                return finish(*args, **kwargs)
            finally:
                self.decompress_cpu_s += time.thread_time() - began

        self.inner.start, self.inner.finish = timed_start, timed_finish


def replay_codec():
    """Make the numpy core replay each tensor's first payload and first decoded sum, so that what
    is left of a step is the exchange itself, as if encoding and decoding cost nothing. A bound
    on speed only: the gradients applied after the first step are stale."""
    from horovod_tnq import core
    encode, decode_sum = core.encode, core.decode_sum
    payloads, sums = {}, {}

    def replay_encode(values, **options):
        key = (values.shape, options.get("key"))
        if key not in payloads:
            payloads[key] = encode(values, **options)
        return payloads[key]

    def replay_decode_sum(buf, expect, *args, out=None, **kwargs):
        key = (expect.numel, expect.shape_tag, buf.size, args, tuple(sorted(kwargs.items())))
        if key not in sums:
            sums[key] = decode_sum(buf, expect, *args, **kwargs)
        total, count = sums[key]
        if out is None:
            return total.copy(), count
        out[...] = total
        return out, count

    core.encode, core.decode_sum = replay_encode, replay_decode_sum


def interface_counters(interface):
    """(bytes sent, bytes received) so far on this network namespace's ``interface``."""
    base = f"/sys/class/net/{interface}/statistics/"
    with open(base + "tx_bytes") as tx, open(base + "rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def pin_to_one_core(rank):
    """Every thread of this process (Horovod's background and Gloo threads included) onto one
    of the cores this process may use, chosen by rank; threads started later inherit it.
    Returns the core."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[rank % len(cores)]
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), {core})
        except ProcessLookupError:  # a thread that ended since the listing
            pass
    return core


def build_model(hidden):
    sizes = [64, *hidden, 10]
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def evaluate(model, x_test, y_test):
    with torch.no_grad():
        logits = model(x_test)
        loss = torch.nn.functional.cross_entropy(logits, y_test).item()
        accuracy = (logits.argmax(1) == y_test).float().mean().item()
    return loss, accuracy


def barrier(name):
    hvd.allreduce(torch.zeros(1), name=name, op=hvd.Sum)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressor", default="none", help="spec: name[:key=value,...]")
    parser.add_argument("--hidden", default="4096,2560", help="hidden layer widths")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="0: evaluate at the end only")
    parser.add_argument("--interface", default=None,
                        help="network interface to count bytes on (default: Horovod's Gloo one)")
    parser.add_argument("--replay-codec", action="store_true",
                        help="replay each tensor's first payload and decoded sum (see "
                        "replay_codec): speed without codec cost; training results meaningless")
    parser.add_argument("--pin-core", action="store_true",
                        help="run on one core, chosen by rank (emulated hosts sharing a machine "
                        "get a core each instead of contending for all of them)")
    parser.add_argument("--profile", action="store_true",
                        help="rank 0 profiles the timed steps (slows them) and reports the top")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    return args


def main():
    args = parse_args()
    hvd.init()
    core = pin_to_one_core(hvd.rank()) if args.pin_core else None
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    name, options = parse_spec(args.compressor)
    if args.replay_codec:
        replay_codec()
    fused = bool(options.pop("fused", 0))  # spec option: the fused tnq.DistributedOptimizer
    compression = TimedCompression(get_compressor(name, **options))
    interface = args.interface or os.environ.get("HOROVOD_GLOO_IFACE", "lo")

    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in
                                        load_shard(hvd.rank(), hvd.size(), args.seed))
    model = build_model([int(w) for w in args.hidden.split(",")])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if fused:
        compression.time_fused()
        optimizer = tnq.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compression.inner)
    else:
        optimizer = hvd.DistributedOptimizer(optimizer,
                                             named_parameters=model.named_parameters(),
                                             compression=compression)
    generator = torch.Generator().manual_seed(args.seed + hvd.rank())

    def batches():
        while True:
            order = torch.randperm(len(x_train), generator=generator)
            for i in range(len(x_train) // args.batch_size):
                yield order[i * args.batch_size:(i + 1) * args.batch_size]

    total_steps = args.warmup + args.steps
    phases = dict.fromkeys(("forward_backward", "synchronize", "update"), 0.0)
    losses, curve = [], []
    eval_s = 0.0
    profiler = cProfile.Profile() if args.profile and hvd.rank() == 0 else None
    for step, batch in zip(range(1, total_steps + 1), batches()):
        if step == args.warmup + 1:
            barrier("benchmark.start")
            compression.compress_s = compression.decompress_cpu_s = 0.0
            phases = dict.fromkeys(phases, 0.0)
            stats_start = dict(getattr(compression.inner, "stats", {}))
            counters_start = interface_counters(interface)
            window_start = time.perf_counter()
            cpu_start = time.process_time()
            eval_s = 0.0
            if profiler:
                profiler.enable()
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        loss.backward()
        t1 = time.perf_counter()
        optimizer.synchronize()
        t2 = time.perf_counter()
        with optimizer.skip_synchronize():
            optimizer.step()
        t3 = time.perf_counter()
        phases["forward_backward"] += t1 - t0
        phases["synchronize"] += t2 - t1
        phases["update"] += t3 - t2
        losses.append(loss.item())
        if (args.eval_every and step % args.eval_every == 0) or step == total_steps:
            if step == total_steps:
                if profiler:
                    profiler.disable()
                barrier("benchmark.end")
                window_s = time.perf_counter() - window_start
                cpu_s = time.process_time() - cpu_start
                counters_end = interface_counters(interface)
            eval_start = time.perf_counter()
            test_loss, test_accuracy = evaluate(model, x_test, y_test)
            curve.append({"step": step, "test_loss": test_loss, "test_accuracy": test_accuracy})
            if step < total_steps:  # evaluations inside the timed window are not training time
                eval_s += time.perf_counter() - eval_start

    stats_end = getattr(compression.inner, "stats", {})
    steps = args.steps
    mine = {
        "compute_s": (phases["forward_backward"] - compression.compress_s + phases["update"])
        / steps,
        "encode_s": compression.compress_s / steps,
        "decode_s": compression.decompress_cpu_s / steps,
        "comm_wait_s": (phases["synchronize"] - compression.decompress_cpu_s) / steps,
        "tx_bytes_per_step": (counters_end[0] - counters_start[0]) / steps,
        "rx_bytes_per_step": (counters_end[1] - counters_start[1]) / steps,
        "window_s": window_s - eval_s,
        "process_cpu_s": (cpu_s - eval_s) / steps,
        "losses": losses, "core": core,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    if stats_end:
        handed = ("payload_bytes", "passthrough_bytes")
        mine["compressor_bytes_per_step"] = sum(stats_end[k] - stats_start[k]
                                                for k in handed) / steps
    everyone = hvd.allgather_object(mine)
    if hvd.rank() != 0:
        return

    def mean(key):
        return sum(rank[key] for rank in everyone) / len(everyone)

    window = max(rank["window_s"] for rank in everyone)
    train_loss = [sum(values) / len(values) for values in zip(*(r["losses"] for r in everyone))]
    for point in curve:
        point["train_loss"] = train_loss[point["step"] - 1]
    report = {
        "compressor": args.compressor, "replayed_codec": args.replay_codec,
        "workers": hvd.size(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden": args.hidden, "batch_size": args.batch_size, "warmup": args.warmup,
        "steps": steps, "interface": interface,
        "samples_per_s": hvd.size() * args.batch_size * steps / window,
        "step_s": window / steps,
        **{key: mean(key) for key in ("compute_s", "encode_s", "decode_s", "comm_wait_s",
                                      "process_cpu_s", "tx_bytes_per_step",
                                      "rx_bytes_per_step")},
        "tx_bytes_per_step_by_rank": [rank["tx_bytes_per_step"] for rank in everyone],
        "core_by_rank": [rank["core"] for rank in everyone],
        "malloc_mmap_threshold_by_rank": [rank["malloc_mmap_threshold"] for rank in everyone],
        "compressor_bytes_per_step": (mean("compressor_bytes_per_step")
                                      if "compressor_bytes_per_step" in mine else None),
        "train_loss": sum(train_loss[-10:]) / len(train_loss[-10:]),
        "test_loss": curve[-1]["test_loss"], "test_accuracy": curve[-1]["test_accuracy"],
        "curve": curve, "train_loss_per_step": train_loss,
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        report["profile"] = text.getvalue()
    print(REPORT_MARKER + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
