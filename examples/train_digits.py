"""Train a small MLP on scikit-learn's digits with Horovod, optionally TNQ-compressed.

    horovodrun -np 2 -H localhost:2 --gloo python examples/train_digits.py --compression tnq --bits 3

Rank 0 prints one JSON line: test accuracy and what the gradient exchange sent per step.
"""

import argparse
import json

import horovod.torch as hvd
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from horovod_tnq.torch import TNQCompressor


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", choices=["none", "fp16", "tnq"], default="tnq")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    # each worker trains on its own shard of the training set
    x_train = torch.from_numpy(x_train[hvd.rank()::hvd.size()])
    y_train = torch.from_numpy(y_train[hvd.rank()::hvd.size()])

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                   "tnq": TNQCompressor(bits=args.bits, seed=args.seed)}[args.compression]
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression)

    generator = torch.Generator().manual_seed(args.seed + hvd.rank())
    # equal step counts on every rank, whatever the shard sizes
    steps_per_epoch = hvd.allreduce(torch.tensor(len(x_train) // args.batch_size),
                                    op=hvd.Min, name="steps").item()
    steps = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            steps += 1

    with torch.no_grad():
        predictions = model(torch.from_numpy(x_test)).argmax(1).numpy()
    accuracy = float((predictions == y_test).mean())
    elements = sum(p.numel() for p in model.parameters())
    fp32_bytes = 4 * elements
    if args.compression == "tnq":
        stats = compression.stats
        sent = (stats["payload_bytes"] + stats["passthrough_bytes"]) / steps
    else:
        sent = fp32_bytes / (2 if args.compression == "fp16" else 1)
    if hvd.rank() == 0:
        print(json.dumps({
            "compression": args.compression, "bits": args.bits if args.compression == "tnq" else
            None, "workers": hvd.size(), "steps": steps, "test_accuracy": accuracy,
            "final_loss": float(loss), "bytes_per_step": sent, "fp32_bytes_per_step": fp32_bytes,
            "bits_per_element": 8.0 * sent / elements}))


if __name__ == "__main__":
    main()
