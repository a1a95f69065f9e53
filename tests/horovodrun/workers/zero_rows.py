"""Runs under `horovodrun -np N`: embedding rows that no rank touches stay exactly where they
are under Adam, with horovod.torch's stock DistributedOptimizer and horovod_tnq's fused one, for
"tnq-rht" and "tnq" (payloads carry their zero runs, core/codec.py).

Each rank looks up tokens from its own half of the first 100 ids of a 1000-row embedding; rows
100 and up are touched by no rank. Writes OUT_DIR/rank<r>.json for tests/horovodrun/
test_zero_rows.py: per configuration, how far untouched rows moved, how far touched rows moved,
and a digest of the parameters (equal on every rank).
"""

import json
import os
import sys
import zlib

import horovod.torch as hvd
import torch

import horovod_tnq.torch as tnq

OUT_DIR = sys.argv[1]
VOCAB, DIM, TOUCHED = 1000, 40, 100


def train(scheme, fused, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, DIM), torch.nn.Linear(DIM, 8))
    start = model[0].weight.detach().clone()
    compressor = tnq.TNQCompressor(scheme=scheme, bits=2, bucket_size=256)
    wrap = tnq.DistributedOptimizer if fused else hvd.DistributedOptimizer
    optimizer = wrap(torch.optim.Adam(model.parameters(), lr=1e-2),
                     named_parameters=model.named_parameters(), compression=compressor)
    generator = torch.Generator().manual_seed(hvd.rank())
    half = TOUCHED // hvd.size()
    for _ in range(steps):
        tokens = torch.randint(hvd.rank() * half, (hvd.rank() + 1) * half, (64,),
                               generator=generator)
        optimizer.zero_grad()
        model(tokens).square().mean().backward()
        optimizer.step()
    moved = (model[0].weight.detach() - start).abs()
    digest = zlib.crc32(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    return {"untouched_moved": float(moved[TOUCHED:].max()),
            "touched_moved": float(moved[:TOUCHED].max()), "digest": digest}


def main():
    hvd.init()
    report = {f"{scheme}/{'fused' if fused else 'stock'}": train(scheme, fused)
              for scheme in ("tnq-rht", "tnq") for fused in (False, True)}
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
