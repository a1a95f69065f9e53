"""The demo's data set and report line, shared by the PyTorch and TensorFlow examples."""

import argparse
import json

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

LAYERS = (64, 256, 256, 10)


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--compression", choices=["none", "fp16", "tnq"], default="tnq")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_shard(rank, size, seed=0):
    """(x_train shard for this rank, y_train shard, x_test, y_test), features scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=0.25, random_state=seed,
        stratify=digits.target)
    return x_train[rank::size], y_train[rank::size], x_test, y_test


def report(framework, compression, bits, workers, steps, accuracy, loss, bytes_per_step,
           elements):
    """The JSON line run_demo.py reads. ``bytes_per_step`` is what TNQ handed to Horovod per
    step; for Horovod's own "none" and "fp16" it follows from the element count."""
    if compression != "tnq":
        bytes_per_step = elements * (2 if compression == "fp16" else 4)
    return json.dumps({
        "framework": framework, "compression": compression,
        "bits": bits if compression == "tnq" else None, "workers": workers, "steps": steps,
        "test_accuracy": accuracy, "final_loss": loss, "bytes_per_step": bytes_per_step,
        "fp32_bytes_per_step": 4 * elements, "bits_per_element": 8.0 * bytes_per_step / elements})
