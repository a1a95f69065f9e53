"""The main job: 2 Horovod workers train on digits with and without TNQ, in PyTorch and in
TensorFlow, and a table compares accuracy and bytes sent.

    python examples/run_demo.py [--workers 2] [--epochs 40] [--frameworks pytorch,tensorflow]
"""

import argparse
import json
import os
import subprocess
import sys

from horovod_tnq.protocol import DEFAULT_SCHEME

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = {"pytorch": "train_digits.py", "tensorflow": "train_digits_tf.py"}
RUNS = [("none", None), ("fp16", None), ("tnq", 4), ("tnq", 3), ("tnq", 2)]


def run_training(framework, compression, bits, epochs, workers=2):
    """One horovodrun job of the digits example; returns its report (a dict)."""
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    command = [horovodrun, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
               sys.executable, os.path.join(HERE, SCRIPTS[framework]),
               "--compression", compression, "--epochs", str(epochs)]
    if bits:
        command += ["--bits", str(bits)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        start = line.find('{"framework"')
        if start >= 0:
            return json.loads(line[start:])
    raise RuntimeError(f"{framework} {compression} {bits} failed:\n{done.stdout[-4000:]}\n"
                       f"{done.stderr[-4000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--frameworks", default="pytorch,tensorflow")
    args = parser.parse_args()
    print(f"sklearn digits, MLP 64-256-256-10, {args.workers} Horovod workers (Gloo), "
          f"{args.epochs} epochs\n")
    print("| framework | gradients | test accuracy | vs uncompressed | bits/element sent | "
          "bytes/step | vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for framework in args.frameworks.split(","):
        baseline = None
        for compression, bits in RUNS:
            row = run_training(framework, compression, bits, args.epochs, args.workers)
            baseline = row["test_accuracy"] if baseline is None else baseline
            # "tnq" runs TNQCompressor with its defaults: name the scheme it uses
            label = (DEFAULT_SCHEME if compression == "tnq" else compression) + \
                (f" {bits}-bit" if bits else "")
            print(f"| {framework} | {label} | {100 * row['test_accuracy']:.2f}% | "
                  f"{100 * (row['test_accuracy'] - baseline):+.2f} pp | "
                  f"{row['bits_per_element']:.2f} | {row['bytes_per_step']:.0f} | "
                  f"{row['bytes_per_step'] / row['fp32_bytes_per_step']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
