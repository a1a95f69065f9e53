"""The main job: 2 Horovod workers train on digits with and without TNQ; prints a table.

    python examples/run_demo.py [--workers 2] [--epochs 40]
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = [("none", None), ("fp16", None), ("tnq", 4), ("tnq", 3), ("tnq", 2)]


def run(workers, compression, bits, epochs):
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    command = [horovodrun, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
               sys.executable, os.path.join(HERE, "train_digits.py"),
               "--compression", compression, "--epochs", str(epochs)]
    if bits:
        command += ["--bits", str(bits)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        start = line.find('{"compression"')
        if start >= 0:
            return json.loads(line[start:])
    sys.exit(f"run {compression} {bits} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    rows = [run(args.workers, compression, bits, args.epochs) for compression, bits in RUNS]
    baseline = rows[0]["test_accuracy"]
    print(f"\nsklearn digits, MLP 64-256-256-10, {args.workers} Horovod workers (Gloo), "
          f"{rows[0]['steps']} steps\n")
    print("| gradients | test accuracy | vs uncompressed | bits/element sent | bytes/step | "
          "vs fp32 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        label = row["compression"] + (f" {row['bits']}-bit" if row["bits"] else "")
        print(f"| {label} | {100 * row['test_accuracy']:.2f}% | "
              f"{100 * (row['test_accuracy'] - baseline):+.2f} pp | "
              f"{row['bits_per_element']:.2f} | {row['bytes_per_step']:.0f} | "
              f"{row['bytes_per_step'] / row['fp32_bytes_per_step']:.3f} |")


if __name__ == "__main__":
    main()
