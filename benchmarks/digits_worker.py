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

Horovod starts with dynamic process sets (``hvd.init(process_sets="dynamic")``), which the
hierarchical exchange needs for its per-host sets, for every spec; the spec option
``process_sets=static`` starts it without (``hvd.init()``): on hosts of several ranks
horovod_tnq then warns and runs a flat exchange. With a TNQ compressor rank 0 also prints
(jobs.REPORT_EXTRA_MARKER) how many tensors per timed step took each exchange ("allgather",
"reduce-scatter", "hierarchical"), from the compressor's ``metrics()["counters"]``, and
whether every rank counted the same.

    horovodrun -np 2 -H localhost:2 --gloo python -m benchmarks.digits_worker \
        --compressor tnq:bits=4
"""

import json
import time

import horovod.torch as hvd
import torch

import horovod_tnq.torch as tnq
from benchmarks import worker_common as common
from benchmarks.jobs import REPORT_EXTRA_MARKER
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


def counters(compression):
    """What a TNQ compressor handed to Horovod (metrics()["counters"]); {} for Horovod's own."""
    return compression.metrics()["counters"] if hasattr(compression, "metrics") else {}


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


def shuffled_batches(count, batch_size, generator):
    """Index batches of ``count`` samples, reshuffled every epoch, forever (the DDP worker draws
    the same ones from the same generator)."""
    while True:
        order = torch.randperm(count, generator=generator)
        for i in range(count // batch_size):
            yield order[i * batch_size:(i + 1) * batch_size]


# the spec option process_sets: what hvd.init gets
PROCESS_SETS = {"dynamic": "dynamic", "static": None}
EXCHANGE_KINDS = ("allgather", "reduce-scatter", "hierarchical")  # the compressor's counters


def barrier(name):
    hvd.allreduce(torch.zeros(1), name=name, op=hvd.Sum)


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    name, options = common.compressor_spec(args.compressor, "torch")
    process_sets = options.pop("process_sets", "dynamic")  # spec option: see the docstring
    if process_sets not in PROCESS_SETS:
        raise ValueError(f"spec {args.compressor!r}: process_sets must be one of "
                         f"{sorted(PROCESS_SETS)}, got {process_sets!r}")
    hvd.init(process_sets=PROCESS_SETS[process_sets])
    core = common.pin_to_one_core(hvd.rank()) if args.pin_core else None
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    if args.replay_codec:
        common.replay_codec()
    fused = bool(options.pop("fused", 0))  # spec option: the fused tnq.DistributedOptimizer
    compression = TimedCompression(get_compressor(name, **options))
    interface = common.default_interface(args)

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

    phases = dict.fromkeys(("forward_backward", "synchronize", "update"), 0.0)
    stats_start = {}

    def start_window():
        compression.compress_s = compression.decompress_cpu_s = 0.0
        phases.update(dict.fromkeys(phases, 0.0))
        stats_start.update(counters(compression.inner))

    def train_step(batch):
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
        return loss.item()

    run = common.timed_steps(args, train_step,
                             shuffled_batches(len(x_train), args.batch_size, generator),
                             lambda: evaluate(model, x_test, y_test), barrier, interface,
                             profile=args.profile and hvd.rank() == 0,
                             on_window_start=start_window)

    stats_end = counters(compression.inner)
    handed = exchanges = None
    if stats_end:
        handed = sum(stats_end[k] - stats_start[k] for k in ("payload_bytes", "passthrough_bytes"))
        exchanges = {kind: (stats_end[kind] - stats_start[kind]) / args.steps
                     for kind in EXCHANGE_KINDS if kind in stats_end}
    mine = common.rank_summary(args, run, {
        "compute_s": phases["forward_backward"] - compression.compress_s + phases["update"],
        "encode_s": compression.compress_s,
        "decode_s": compression.decompress_cpu_s,
        "comm_wait_s": phases["synchronize"] - compression.decompress_cpu_s,
    }, core, handed)
    everyone = hvd.allgather_object(mine)
    exchanges_by_rank = hvd.allgather_object(exchanges)
    if hvd.rank() == 0:
        common.print_report(args, run, everyone, sum(p.numel() for p in model.parameters()),
                            interface)
        print(REPORT_EXTRA_MARKER + json.dumps({
            "process_sets": process_sets, "exchanges_per_step": exchanges,
            "exchanges_same_on_every_rank": all(e == exchanges for e in exchanges_by_rank),
        }), flush=True)


if __name__ == "__main__":
    main()
