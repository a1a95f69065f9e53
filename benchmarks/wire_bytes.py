"""Bytes that really cross the network per training step, TNQ against uncompressed Horovod.

Runs examples/train_digits.py with 2 Horovod workers inside a private network namespace (so the
loopback interface carries their traffic and nothing else) and reads the interface's transmit
counter from /proc/net/dev: TCP/IP headers, Horovod's own coordination messages and the probe
allreduce are all counted. Each configuration runs for two lengths; the difference divided by the
difference in steps is the per-step traffic, free of start-up and parameter broadcast.

    python -m benchmarks.wire_bytes            (needs root or user namespaces, for unshare -n)
"""

import argparse
import json
import os
import subprocess
import sys

from examples.run_demo import run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [("none", None), ("fp16", None), ("tnq", 4), ("tnq", 3), ("tnq", 2)]
QUICK = [("none", None), ("tnq", 4)]


def loopback_tx_bytes():
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def train(compression, bits, epochs, workers):
    before = loopback_tx_bytes()
    run = run_training("pytorch", compression, bits, epochs, workers)
    return loopback_tx_bytes() - before, run


def measure(configs=CONFIGS, short=1, long=3, workers=2):
    rows = []
    for compression, bits in configs:
        sent_short, run_short = train(compression, bits, short, workers)
        sent_long, run_long = train(compression, bits, long, workers)
        steps = run_long["steps"] - run_short["steps"]
        rows.append({"compression": compression, "bits": bits, "workers": workers,
                     "wire_bytes_per_step": (sent_long - sent_short) / steps,
                     "payload_bytes_per_step": run_long["bytes_per_step"],
                     "fp32_bytes_per_step": run_long["fp32_bytes_per_step"]})
    baseline = rows[0]["wire_bytes_per_step"]
    for row in rows:
        row["vs_uncompressed"] = row["wire_bytes_per_step"] / baseline
    return rows


def in_private_network(argv):
    """Re-run this script inside a new network namespace with only loopback, up."""
    script = "ip link set lo up && exec \"$@\""
    return subprocess.call(["unshare", "--net", "sh", "-c", script, "sh", sys.executable,
                            "-m", "benchmarks.wire_bytes", "--inside"] + argv, cwd=ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--quick", action="store_true", help="uncompressed and TNQ 4-bit only")
    args, rest = parser.parse_known_args()
    if not args.inside:
        sys.exit(in_private_network(sys.argv[1:]))
    rows = measure(QUICK if args.quick else CONFIGS)
    print("| gradients | wire bytes/step (both ranks) | vs uncompressed | compressor output/step |")
    print("|---|---|---|---|")
    for row in rows:
        label = row["compression"] + (f" {row['bits']}-bit" if row["bits"] else "")
        print(f"| {label} | {row['wire_bytes_per_step']:.0f} | {row['vs_uncompressed']:.3f} | "
              f"{row['payload_bytes_per_step']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
