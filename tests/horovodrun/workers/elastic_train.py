"""Runs under elastic `horovodrun --min-np ... --host-discovery-script ...`: training with TNQ
through a membership change (a killed worker, or hosts the discovery script takes away or adds).

argv: OUT_DIR, "stock" | "fused" | "hierarchical", HOSTS_FILE (what the discovery script
prints), STEPS, EVENT:
"resize": rank 0 takes a slot away at step SHRINK_AT and gives it back once the job runs on
one worker, so the job shrinks from 2 workers to 1 and grows back to 2 (a new process, with
fresh state); "kill": rank 1 dies (exit 1) once at step SHRINK_AT; Horovod drops its host for
a while and starts a replacement there afterwards.
Every rank that finishes writes OUT_DIR/rank<r>.json: the world size at the end, its parameters'
digest, and the reduced gradient divided by this rank's own (the projection ratio) on the last
step (the same data on every rank) and on every step run by one worker: 1 where Average divides
by the current world size (0.5 if it kept dividing by the old one).

"hierarchical": the stock optimizer with the default exchange and dynamic process sets, on two
emulated hosts of 2 ranks (localhost and 127.0.0.1) that shrink to 2 + 1 and grow back: the
hierarchical exchange runs on 2 x 2, the flat one on 2 + 1 (hosts of unequal sizes), and again
the hierarchical one after the newcomer joins (its process sets registered anew after the
reset). Each report also lists the world sizes at which the hierarchical exchange ran.
"""

import hashlib
import json
import os
import sys
import time

import horovod.torch as hvd
import torch

import horovod_tnq.torch as tnq
from elastic_hosts import set_hosts, wait_for_size

OUT_DIR, MODE, HOSTS_FILE, STEPS, EVENT = (sys.argv[1], sys.argv[2], sys.argv[3],
                                           int(sys.argv[4]), sys.argv[5])
KILLED = os.path.join(OUT_DIR, "killed")
SHRINK_AT = 3
if MODE == "hierarchical":  # two hosts of 2 ranks, one host loses one
    FULL, SHRUNK, FULL_SIZE, SHRUNK_SIZE = "localhost:2\n127.0.0.1:2", "localhost:2\n127.0.0.1:1", \
        4, 3
else:
    FULL, SHRUNK, FULL_SIZE, SHRUNK_SIZE = "localhost:2", "localhost:1", 2, 1


def digest(model):
    data = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    return hashlib.sha256(data).hexdigest()


def main():
    hvd.init(process_sets="dynamic" if MODE == "hierarchical" else None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    compressor = tnq.TNQCompressor(bits=4, min_numel=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if MODE == "fused":
        optimizer = tnq.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compressor)
        reset = optimizer.reset
    else:
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compressor)
        reset = compressor.reset
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, batch=0)
    state.register_reset_callbacks([reset])

    @hvd.elastic.run
    def train(state):
        while state.batch < STEPS:
            last = state.batch == STEPS - 1
            # each change of the world happens at a known step, however slowly Horovod acts
            if EVENT == "resize" and state.batch == SHRINK_AT + 1:
                wait_for_size(state, hvd.size(), SHRUNK_SIZE)  # the slot taken away at SHRINK_AT
            if last:
                wait_for_size(state, hvd.size(), FULL_SIZE)  # the worker back for the last step
            # the last step: the same data on every rank, so the average is each rank's own
            seed = 10_000 + state.batch if last else 100 * state.batch + hvd.rank()
            x = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
            optimizer.zero_grad()
            model(x).square().mean().backward()
            local = [p.grad.clone() for p in model.parameters()]
            before = compressor.metrics()["counters"]["hierarchical"]
            optimizer.synchronize()
            sizes.append(hvd.size())
            if compressor.metrics()["counters"]["hierarchical"] > before:
                hierarchical_at.add(hvd.size())
            ratio = (sum(float((p.grad * g).sum()) for p, g in zip(model.parameters(), local)) /
                     sum(float((g * g).sum()) for g in local))
            if hvd.size() == 1:
                solo_ratios.append(ratio)
            with optimizer.skip_synchronize():
                optimizer.step()
            if EVENT == "kill":
                if hvd.rank() == 1 and state.batch == SHRINK_AT and not os.path.exists(KILLED):
                    open(KILLED, "w").close()
                    os._exit(1)
            elif hvd.rank() == 0 and state.batch == SHRINK_AT and hvd.size() == FULL_SIZE:
                set_hosts(HOSTS_FILE, SHRUNK)
            elif hvd.rank() == 0 and hvd.size() == SHRUNK_SIZE and state.batch > SHRINK_AT:
                set_hosts(HOSTS_FILE, FULL)
            time.sleep(0.3)  # Horovod's discovery looks every second: let it see the change
            state.batch += 1
            state.commit()
        return ratio

    sizes, solo_ratios, hierarchical_at = [], [], set()
    ratio = train(state)
    report = {"size": hvd.size(), "digest": digest(model), "last_ratio": ratio,
              "steps": state.batch, "sizes_seen": sorted(set(sizes)), "solo_ratios": solo_ratios,
              "hierarchical_at": sorted(hierarchical_at)}
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
