"""Train a small MLP on scikit-learn's digits with Horovod, optionally TNQ-compressed.

    horovodrun -np 2 -H localhost:2 --gloo python examples/train_digits.py --bits 3

Rank 0 prints one JSON line: test accuracy and what the gradient exchange sent per step.
"""

import horovod.torch as hvd
import torch
from digits import LAYERS, load_shard, parse_args, report

from horovod_tnq.torch import TNQCompressor


def main():
    args = parse_args(__doc__.splitlines()[0])
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_shard(hvd.rank(), hvd.size(), args.seed)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    layers = []
    for fan_in, fan_out in zip(LAYERS, LAYERS[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
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
    # what TNQ handed to Horovod (Horovod's own compressors count nothing)
    counters = compression.metrics()["counters"] if hasattr(compression, "metrics") else None
    sent = counters and (counters["payload_bytes"] + counters["passthrough_bytes"]) / steps
    if hvd.rank() == 0:
        print(report("pytorch", args.compression, args.bits, hvd.size(), steps, accuracy,
                     float(loss), sent, elements))


if __name__ == "__main__":
    main()
