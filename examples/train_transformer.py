"""Train a small character-level transformer with Horovod and TNQ, per-layer settings and
TensorBoard metrics.

    horovodrun -np 2 -H localhost:2 --gloo python examples/train_transformer.py \\
        --steps 200 --logdir runs/transformer
    tensorboard --logdir runs/transformer

Layers do not all compress alike. The large attention and feed-forward matrices take the
default 3-bit TNQ; the token embedding (whose rows for characters absent from a batch are
exactly zero, and rare rows matter) and the output head get 8 bits; the LayerNorm scales and
biases (a few hundred numbers each) go uncompressed. The text is Python's own standard library
source (no download). Rank 0 logs the loss and the compressor's metrics (bytes, bits per
element, codec seconds, estimated relative quantization error, per tensor and per step) to
TensorBoard, and prints one JSON line at the end.
"""

import argparse
import glob
import json
import math
import os
import sysconfig
import time

import horovod.torch as hvd
import torch

import horovod_tnq.torch as tnq
from horovod_tnq.torch import TNQCompressor, log_metrics

# glob patterns against model.named_parameters() names; the first match wins
OVERRIDES = {
    "embed.*": {"bits": 8},
    "head.*": {"bits": 8},
    "*norm*": None,  # uncompressed
}


class CharTransformer(torch.nn.Module):
    def __init__(self, vocab=256, dim=128, heads=4, layers=2, context=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.position = torch.nn.Parameter(torch.zeros(context, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, tokens):
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.final_norm(hidden))


def stdlib_text(limit):
    """Bytes of the standard library's Python source, the same on every rank."""
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    chunks, size = [], 0
    for path in sources:
        with open(path, "rb") as f:
            chunks.append(f.read())
        size += len(chunks[-1])
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--bits", type=int, default=3, help="bits of the layers not overridden")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fused", action="store_true",
                        help="horovod_tnq's fused DistributedOptimizer instead of Horovod's")
    parser.add_argument("--logdir", default=None, help="TensorBoard directory (rank 0 writes)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    text = stdlib_text(2_000_000)
    model = CharTransformer(context=args.context)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    compressor = TNQCompressor(bits=args.bits, seed=args.seed, overrides=OVERRIDES)
    wrap = tnq.DistributedOptimizer if args.fused else hvd.DistributedOptimizer
    optimizer = wrap(torch.optim.Adam(model.parameters(), lr=args.lr),
                     named_parameters=model.named_parameters(), compression=compressor)
    writer = None
    if args.logdir and hvd.rank() == 0:
        from torch.utils.tensorboard import SummaryWriter  # imports TensorFlow when installed
        writer = SummaryWriter(args.logdir)

    generator = torch.Generator().manual_seed(args.seed + 1000 * hvd.rank())
    started, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(text) - args.context - 1, (args.batch_size,),
                               generator=generator)
        window = torch.stack([text[s: s + args.context + 1] for s in starts.tolist()])
        optimizer.zero_grad()
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 window[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if writer is not None and step % args.log_every == 0:
            writer.add_scalar("train/loss", sum(losses[-args.log_every:]) / args.log_every,
                              step)
            log_metrics(writer, compressor, step)
    if writer is not None:
        writer.close()

    metrics = compressor.metrics()["last_step"]
    if hvd.rank() == 0:
        window = min(10, len(losses))
        print(json.dumps({
            "example": "train_transformer", "workers": hvd.size(), "steps": args.steps,
            "first_loss": round(sum(losses[:window]) / window, 4),
            "last_loss": round(sum(losses[-window:]) / window, 4),
            "uniform_loss": round(math.log(256), 4),
            "bits_per_element": round(metrics["wire_bits_per_element"], 3),
            "relative_error": metrics["relative_error"] and round(metrics["relative_error"], 4),
            "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
