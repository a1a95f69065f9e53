"""What the training benchmarks share: compressor specs, their horovodrun command line (built by
launcher.py), reports, CSV output.

A compressor *spec* is a registry name with optional options, ``name[:key=value,...]``, handed to
``horovod_tnq.torch.get_compressor(name, **options)`` by each worker:

    none   fp16   tnq:bits=4   qsgd:bits=4   tnq:bits=4,exchange=alltoall

so a new scheme or a new TNQCompressor option is benchmarked by adding a spec to a list, with no
change to the benchmarks. The option ``framework`` picks the worker (``WORKERS``): ``tf`` runs
TensorFlow's, ``ddp`` PyTorch's DistributedDataParallel worker, which knows PyTorch's own
communication hooks (``DDP_HOOKS``) and horovod_tnq's schemes as a DDP hook (tnq_hook; not
Horovod's ``fp16``, nor the options only Horovod's compressors have):

    none:framework=ddp   fp16:framework=ddp   powersgd:rank=4,framework=ddp
    tnq-rht:bits=2,framework=ddp

The Horovod PyTorch worker (digits_worker.py) also reads two options that are not compressor
settings: ``fused=1`` (horovod_tnq.torch.DistributedOptimizer instead of Horovod's) and
``process_sets=static`` (hvd.init() without the dynamic process sets that the hierarchical
exchange needs), e.g. ``tnq-rht:bits=2,exchange=hierarchical,fused=1``.
"""

import csv
import json

from benchmarks import launcher
# the launch itself (command lines, the workers' environment) is launcher.py's; these names stay
# here for the benchmarks that import them from jobs
from benchmarks.launcher import ROOT, torchrun_command, worker_env  # noqa: F401

WORKER = "benchmarks.digits_worker"  # run with python -m, from ROOT
# the digits worker of each framework; a spec's "framework" option picks one (default torch)
WORKERS = {"torch": WORKER, "tf": "benchmarks.digits_worker_tf",
           "ddp": "benchmarks.digits_worker_ddp"}
# PyTorch's hooks a framework=ddp spec may name: DDP without a hook, fp16_compress_hook,
# powerSGD_hook, and noop_hook, which communicates nothing (each rank trains alone: the step's
# compute floor, the fastest any hook could be; benchmarks/ddp.py); only framework=ddp specs
# may name powersgd or noop. Besides these the DDP workers run horovod_tnq's schemes
# (core.SCHEMES) through horovod_tnq.torch.ddp.tnq_hook.
DDP_HOOKS = ("none", "fp16", "powersgd", "noop")
REPORT_MARKER = "BENCHMARK-REPORT "
# a worker's further keys for its report, printed after it (read_report merges them)
REPORT_EXTRA_MARKER = "BENCHMARK-REPORT-EXTRA "


def parse_spec(spec):
    """("name", {option: value}) from "name[:key=value,...]"; ints and floats are converted."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"compressor spec {spec!r} has no name")
    options = {}
    for item in filter(None, rest.split(",")):
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise ValueError(f"compressor spec {spec!r}: option {item!r} is not key=value")
        options[key] = _number_or_text(text)
    return name, options


def _number_or_text(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def horovodrun_command(workers, hosts, worker_args, extra=(), worker=WORKER):
    """The horovodrun command line (Gloo, --disable-cache) running the benchmark ``worker`` (a
    module) on ``hosts`` ("host:slots,..."); launcher.horovodrun_command builds it."""
    return launcher.horovodrun_command(workers, hosts, ["-m", worker, *worker_args],
                                       disable_cache=True, extra=extra)


def read_report(done, what):
    """The JSON report rank 0 of a finished horovodrun job printed, with the keys of any
    REPORT_EXTRA_MARKER lines added; a clear error where there is no report."""
    report, extra = None, {}
    for line in done.stdout.splitlines():
        start = line.find(REPORT_MARKER)
        if start >= 0 and report is None:
            report = json.loads(line[start + len(REPORT_MARKER):])
        start = line.find(REPORT_EXTRA_MARKER)
        if start >= 0:
            extra.update(json.loads(line[start + len(REPORT_EXTRA_MARKER):]))
    if report is not None:
        return dict(report, **extra)
    raise RuntimeError(f"{what}: no report (exit {done.returncode})\n--- stdout\n"
                       f"{done.stdout[-5000:]}\n--- stderr\n{done.stderr[-5000:]}")


def run_local(workers, worker_args, timeout=None):
    """One benchmark job with every worker on this host's loopback; returns rank 0's report."""
    command = horovodrun_command(workers, f"localhost:{workers}", worker_args)
    done = launcher.run(command, worker_env(), timeout)
    return read_report(done, " ".join(worker_args))


def write_csv(path, rows):
    """Rows (dicts) to CSV, columns in first-seen order across all rows."""
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows, columns):
    """A markdown table of ``rows`` with ``columns`` = [(header, key or function, format)]."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = key(row) if callable(key) else row.get(key)
            cells.append("" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
