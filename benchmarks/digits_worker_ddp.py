"""The PyTorch DistributedDataParallel twin of digits_worker.py: the same MLP, initialisation,
data shards, batches, optimizer and warm-up and timed steps, trained with DDP over Gloo and one
of PyTorch's own communication hooks (benchmarks/ddp.py: none, fp16, powersgd, noop) or
horovod_tnq's tnq_hook (``--replay-codec``: with its codec replayed, see
worker_common.replay_codec), and the same report line (worker_common.py), so bandwidth.py runs
it for a ``framework=ddp`` spec. Started by torchrun (one per host), not horovodrun.

What a DDP step cannot be split into: the hooks' work and the allreduces run inside backward,
partly in callbacks on Gloo's threads, so compute, encode, decode and wait are reported as None.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.digits_worker_ddp \
        --compressor powersgd:rank=4,framework=ddp
"""

import torch

from benchmarks import ddp
from benchmarks import worker_common as common
from benchmarks.digits_worker import build_model, evaluate, shuffled_batches
from benchmarks.jobs import DDP_HOOKS
from examples.digits import load_shard


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    name, options = common.compressor_spec(args.compressor, "ddp")
    if args.replay_codec:
        if name in DDP_HOOKS:
            raise ValueError(f"--replay-codec replays horovod_tnq's codec; PyTorch's {name} "
                             "hook has none")
        common.replay_codec()  # tnq_hook's host codec: the exchange's speed, codec free
    rank, size = ddp.init_from_env()
    core = common.pin_to_one_core(rank) if args.pin_core else None  # Gloo's threads too
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    interface = common.default_interface(args)

    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in
                                        load_shard(rank, size, args.seed))
    model = build_model([int(w) for w in args.hidden.split(",")])
    # PowerSGD compresses from the first timed step on; the warm-up steps allreduce plainly
    ddp_model, handed = ddp.wrap(model, name, options, start_iter=args.warmup)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    generator = torch.Generator().manual_seed(args.seed + rank)

    def train_step(batch):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp_model(x_train[batch]), y_train[batch])
        loss.backward()  # returns once DDP's hook has averaged every bucket
        optimizer.step()
        return loss.item()

    handed_start = {}
    run = common.timed_steps(args, train_step,
                             shuffled_batches(len(x_train), args.batch_size, generator),
                             lambda: evaluate(model, x_test, y_test), ddp.barrier, interface,
                             profile=args.profile and rank == 0,
                             on_window_start=lambda: handed_start.update(
                                 total=handed.total if handed else 0))
    mine = common.rank_summary(args, run, dict.fromkeys(common.PHASE_KEYS), core,
                               None if handed is None else handed.total - handed_start["total"])
    everyone = ddp.allgather_object(mine)
    if rank == 0:
        common.print_report(args, run, everyone, sum(p.numel() for p in model.parameters()),
                            interface)


if __name__ == "__main__":
    main()
    ddp.end_process()
