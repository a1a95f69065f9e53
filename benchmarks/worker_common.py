"""What the digits benchmark workers share, PyTorch's (digits_worker.py), TensorFlow's
(digits_worker_tf.py) and PyTorch DDP's (digits_worker_ddp.py): arguments, core pinning,
interface counters, the timed loop of warm-up and timed steps, and the report rank 0 prints. No
framework imports: each worker hands in its training step, evaluation, barrier and
allgather_object, so all measure the same window the same way and print the same keys."""

import argparse
import cProfile
import io
import json
import os
import pstats
import threading
import time
from dataclasses import dataclass, field

from benchmarks.jobs import DDP_HOOKS, REPORT_MARKER, parse_spec
from horovod_tnq.core import SCHEMES
from horovod_tnq.protocol.host_core import HOST_CORE

PHASE_KEYS = ("compute_s", "encode_s", "decode_s", "comm_wait_s")


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
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


def compressor_spec(spec, framework):
    """(name, options) of a spec for ``framework``'s worker. The spec's "framework" option only
    chose the worker (bandwidth.py reads it), so it is dropped here, and a spec meant for the
    other framework's worker is refused rather than run on the wrong one."""
    name, options = parse_spec(spec)
    wanted = options.pop("framework", "torch")
    if wanted != framework:
        raise ValueError(f"spec {spec!r} is for framework {wanted!r}, this worker is "
                         f"{framework!r}")
    if framework == "ddp" and name not in DDP_HOOKS and name not in SCHEMES:
        raise ValueError(f"spec {spec!r}: the DDP worker runs {', '.join(DDP_HOOKS)} and "
                         f"horovod_tnq's schemes ({', '.join(sorted(SCHEMES))}) as a DDP hook")
    if framework != "ddp" and name in ("powersgd", "noop"):  # not get_compressor's "unknown"
        raise ValueError(f"spec {spec!r}: {name} is PyTorch DDP's hook; add framework=ddp")
    return name, options


def replay_codec():
    """Make the host codec replay each tensor's first payload and first decoded sum, so that
    what is left of a step is the exchange itself, as if encoding and decoding cost nothing. A
    bound on speed only: the gradients applied after the first step are stale. Installed through
    the codec's seam (horovod_tnq.protocol.host_core.HOST_CORE); returns the function that
    undoes it."""
    encode, decode_sum = HOST_CORE.encode, HOST_CORE.decode_sum
    payloads, sums = {}, {}

    def replay_encode(values, **options):
        # the payload's header names the tensor's shape, so parts of one size cut from tensors
        # of different shapes (a DDP hook's buckets) each replay their own
        key = (values.shape, options.get("key"), tuple(options.get("shape") or ()),
               options.get("dtype_name"))
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

    return HOST_CORE.replace(encode=replay_encode, decode_sum=replay_decode_sum)


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


def default_interface(args):
    """The interface whose counters a worker reads: --interface, else the one its collectives
    were told to use (Horovod's or PyTorch Gloo's variable), else loopback."""
    return (args.interface or os.environ.get("HOROVOD_GLOO_IFACE")
            or os.environ.get("GLOO_SOCKET_IFNAME", "lo"))


@dataclass
class Run:
    """What timed_steps measured on this rank."""
    losses: list = field(default_factory=list)  # every step's training loss, warm-up included
    curve: list = field(default_factory=list)  # {"step", "test_loss", "test_accuracy"}
    window_s: float = 0.0  # the timed steps' wall time, evaluations inside them excluded
    cpu_s: float = 0.0  # process CPU time over the same steps
    tx_bytes: int = 0  # sent and received on the interface over the timed steps
    rx_bytes: int = 0
    profile: str = None  # rank 0's profile of the timed steps, with --profile


def timed_steps(args, train_step, batches, evaluate, barrier, interface, profile=False,
                on_window_start=None):
    """``args.warmup`` untimed then ``args.steps`` timed calls of ``train_step(batch)``, which
    returns the step's loss as a float (so the step has finished when it returns). The window
    opens after a barrier (``barrier(name)``), when ``on_window_start()`` resets the worker's own
    phase timers, and closes after another, so every rank's window covers the same steps.
    ``evaluate()`` -> (test loss, accuracy) runs every ``args.eval_every`` steps and after the
    last; evaluations before the last are subtracted from the window."""
    run = Run()
    total_steps = args.warmup + args.steps
    profiler = cProfile.Profile() if profile else None
    eval_s = 0.0
    for step, batch in zip(range(1, total_steps + 1), batches):
        if step == args.warmup + 1:
            barrier("benchmark.start")
            if on_window_start:
                on_window_start()
            counters_start = interface_counters(interface)
            window_start = time.perf_counter()
            cpu_start = time.process_time()
            eval_s = 0.0
            if profiler:
                profiler.enable()
        run.losses.append(train_step(batch))
        if (args.eval_every and step % args.eval_every == 0) or step == total_steps:
            if step == total_steps:
                if profiler:
                    profiler.disable()
                barrier("benchmark.end")
                window_s = time.perf_counter() - window_start
                cpu_s = time.process_time() - cpu_start
                counters_end = interface_counters(interface)
            eval_start = time.perf_counter()
            test_loss, test_accuracy = evaluate()
            run.curve.append({"step": step, "test_loss": test_loss,
                              "test_accuracy": test_accuracy})
            if step < total_steps:  # evaluations inside the timed window are not training time
                eval_s += time.perf_counter() - eval_start
    run.window_s = window_s - eval_s
    run.cpu_s = cpu_s - eval_s
    run.tx_bytes = counters_end[0] - counters_start[0]
    run.rx_bytes = counters_end[1] - counters_start[1]
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        run.profile = text.getvalue()
    return run


def rank_summary(args, run, phases, core, compressor_bytes=None):
    """This rank's share of the report. ``phases``: seconds over the timed steps for each of
    PHASE_KEYS, None for a phase the worker cannot measure; ``compressor_bytes``: what the
    compressor handed to Horovod over the timed steps, where it keeps such counts."""
    steps = args.steps
    mine = {key: None if phases[key] is None else phases[key] / steps for key in PHASE_KEYS}
    mine.update({
        "tx_bytes_per_step": run.tx_bytes / steps,
        "rx_bytes_per_step": run.rx_bytes / steps,
        "window_s": run.window_s,
        "process_cpu_s": run.cpu_s / steps,
        "losses": run.losses, "core": core,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    })
    if compressor_bytes is not None:
        mine["compressor_bytes_per_step"] = compressor_bytes / steps
    return mine


def print_report(args, run, everyone, parameters, interface):
    """Rank 0's report line from every rank's rank_summary (``everyone``, in rank order)."""
    def mean(key):
        values = [rank[key] for rank in everyone]
        return None if None in values else sum(values) / len(values)

    workers, steps, curve = len(everyone), args.steps, run.curve
    window = max(rank["window_s"] for rank in everyone)
    train_loss = [sum(values) / len(values) for values in zip(*(r["losses"] for r in everyone))]
    for point in curve:
        point["train_loss"] = train_loss[point["step"] - 1]
    report = {
        "compressor": args.compressor, "replayed_codec": args.replay_codec,
        "workers": workers, "parameters": parameters,
        "hidden": args.hidden, "batch_size": args.batch_size, "warmup": args.warmup,
        "steps": steps, "interface": interface,
        "samples_per_s": workers * args.batch_size * steps / window,
        "step_s": window / steps,
        **{key: mean(key) for key in (*PHASE_KEYS, "process_cpu_s", "tx_bytes_per_step",
                                      "rx_bytes_per_step")},
        "tx_bytes_per_step_by_rank": [rank["tx_bytes_per_step"] for rank in everyone],
        "core_by_rank": [rank["core"] for rank in everyone],
        "malloc_mmap_threshold_by_rank": [rank["malloc_mmap_threshold"] for rank in everyone],
        "compressor_bytes_per_step": (mean("compressor_bytes_per_step")
                                      if "compressor_bytes_per_step" in everyone[0] else None),
        "train_loss": sum(train_loss[-10:]) / len(train_loss[-10:]),
        "test_loss": curve[-1]["test_loss"], "test_accuracy": curve[-1]["test_accuracy"],
        "curve": curve, "train_loss_per_step": train_loss,
    }
    if run.profile:
        report["profile"] = run.profile
    print(REPORT_MARKER + json.dumps(report), flush=True)


class CodecTimer:
    """Times the host codec's encode (wall time) and decode_sum (CPU time of the calling thread,
    which tells decoding apart from waiting) wherever they are called from: inside a TF graph
    the compressor's work runs in tf.numpy_function callbacks, which no wrapper around
    compress() or decompress() sees. Installed through the codec's seam (HOST_CORE; ``undo``
    removes it); install after replay_codec, so that it times the replay."""

    def __init__(self):
        self.encode_s = self.decode_cpu_s = 0.0
        lock = threading.Lock()  # the callbacks may run on several of TF's threads
        encode, decode_sum = HOST_CORE.encode, HOST_CORE.decode_sum

        def timed_encode(*args, **kwargs):
            start = time.perf_counter()
            try:
                return encode(*args, **kwargs)
            finally:
                with lock:
                    self.encode_s += time.perf_counter() - start

        def timed_decode_sum(*args, **kwargs):
            start = time.thread_time()
            try:
                return decode_sum(*args, **kwargs)
            finally:
                with lock:
                    self.decode_cpu_s += time.thread_time() - start

        self.undo = HOST_CORE.replace(encode=timed_encode, decode_sum=timed_decode_sum)

    def reset(self):
        self.encode_s = self.decode_cpu_s = 0.0
