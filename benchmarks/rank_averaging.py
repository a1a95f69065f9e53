"""Does the error of the averaged gradient fall with the number of ranks? Real horovodrun workers.

    python -m benchmarks.rank_averaging [--ranks 2 4 8] [--schemes tnq-rht tnq] [--bits 2 3 4]
                                        [--exchanges allgather reduce-scatter]
                                        [--elements 262144] [--noise 0.1] [--csv PATH]

For each N in --ranks, one `horovodrun -np N -H localhost:N --gloo` job
(rank_averaging_worker.py) allreduces (op=Average) gradients that are alike across ranks, as in
data-parallel training: g_i = g + 0.1 n_i, g and n_i Student-t(3), every (scheme, bits,
exchange) in turn. It reports

* averaged NMSE: ||mean_i Q(g_i) - mean_i g_i||^2 / ||mean_i g_i||^2 of the reduced tensor;
* single NMSE:   ||Q(g_i) - g_i||^2 / ||g_i||^2 of one rank's own compression (core.encode and
  core.decode with the same settings and key), mean over the ranks: the N = 1 equivalent;
* ratio = single / averaged: about N where the ranks' errors are independent and unbiased (each
  rank rotates or rounds with its own random stream), about 1 where they share a floor (a bias
  that every rank makes alike, e.g. truncation). The reduce-scatter exchange quantizes each
  chunk's sum a second time, at protocol.plan.second_bits (wider), so its ratio stays within
  about a sixteenth of the allgather's.

Prints a markdown table; every number in it comes from the same run.
"""

import argparse
import tempfile
import time

from benchmarks import launcher
from benchmarks.jobs import markdown_table, worker_env, write_csv

WORKER = "benchmarks.rank_averaging_worker"  # run with python -m, from ROOT


def launch(num_ranks, out_dir, worker_args=(), timeout=None):
    """Run the worker on ``num_ranks`` local Gloo ranks; return each rank's JSON report."""
    command = launcher.horovodrun_command(num_ranks, f"localhost:{num_ranks}",
                                          ["-m", WORKER, str(out_dir), *worker_args],
                                          disable_cache=True)
    return launcher.run_ranks(command, num_ranks, out_dir, worker_env(), timeout,
                              what=f"horovodrun -np {num_ranks}")


def summarise(reports):
    """One row per (scheme, bits, exchange) of one job: the averaged NMSE (every rank must hold
    the same result), the single-rank NMSE (mean over ranks) and their ratio."""
    rows = []
    for entries in zip(*(report["rows"] for report in reports)):
        first = entries[0]
        digests = {entry["digest"] for entry in entries}
        if len(digests) != 1:
            raise RuntimeError(f"ranks disagree on the result of {first['scheme']} "
                               f"{first['bits']} bits {first['exchange']}: {sorted(digests)}")
        if first["exchange_used"] != [first["exchange"]]:
            raise RuntimeError(f"asked for {first['exchange']}, got {first['exchange_used']}")
        single = sum(entry["single_nmse"] for entry in entries) / len(entries)
        rows.append({"scheme": first["scheme"], "bits": first["bits"],
                     "exchange": first["exchange"], "ranks": len(entries),
                     "averaged_nmse": first["nmse"], "single_nmse": single,
                     "ratio": single / first["nmse"], "digest": first["digest"]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--schemes", nargs="+", default=["tnq-rht", "tnq"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--exchanges", nargs="+", default=["allgather", "reduce-scatter"])
    parser.add_argument("--elements", type=int, default=1 << 18, help="per gradient")
    parser.add_argument("--noise", type=float, default=0.1, help="g_i = g + noise * n_i")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per horovodrun")
    parser.add_argument("--csv", help="also write the rows here")
    args = parser.parse_args()
    worker_args = ["--schemes", *args.schemes, "--bits", *map(str, args.bits), "--exchanges",
                   *args.exchanges, "--elements", str(args.elements), "--noise",
                   str(args.noise), "--seed", str(args.seed)]
    rows = []
    for num_ranks in args.ranks:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out_dir:
            rows += summarise(launch(num_ranks, out_dir, worker_args, args.timeout))
        print(f"  N={num_ranks}: {time.perf_counter() - started:.0f} s", flush=True)
    if args.csv:
        write_csv(args.csv, rows)
    rows.sort(key=lambda row: (args.schemes.index(row["scheme"]), row["bits"],
                               args.exchanges.index(row["exchange"]), row["ranks"]))
    print(f"\nNMSE of the averaged gradient vs one rank's own compression: {args.elements} "
          f"float32 elements, g_i = g + {args.noise} n_i (Student-t(3)), bucket 512, "
          "op=Average\n")
    print(markdown_table(rows, [("scheme", "scheme", ""), ("bits", "bits", "d"),
                                ("exchange", "exchange", ""), ("N", "ranks", "d"),
                                ("averaged NMSE", "averaged_nmse", ".4g"),
                                ("single NMSE", "single_nmse", ".4g"),
                                ("ratio single/averaged", "ratio", ".2f")]))


if __name__ == "__main__":
    main()
