"""Runs under `horovodrun -np N`: exercises TNQCompressor on real Horovod workers.

Each rank writes what it saw to OUT_DIR/rank<r>.json; tests/test_torch_horovodrun.py asserts on
those files (cross-rank agreement, error bounds, error messages). Every rank can rebuild every
other rank's input from the seed, so each knows the exact true mean.
"""

import hashlib
import json
import os
import sys

import horovod.torch as hvd
import numpy as np
import torch

import bounds
from common import expect_error
from horovod_tnq import core
from horovod_tnq.protocol import choose_exchange
from horovod_tnq.torch import DistributedOptimizer, TNQCompressor, get_compressor

OUT_DIR = sys.argv[1]
N_ELEMENTS = 60_000


def digest(tensor):
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy()
                          .tobytes()).hexdigest()


def rank_input(rank, dtype=torch.float32, n=N_ELEMENTS):
    x = np.random.default_rng(1000 + rank).laplace(scale=0.01, size=n)
    return torch.from_numpy(x).to(dtype)


def error_report(result, inputs, reduce_sum, bits, bucket_size=512, exchange="auto"):
    return bounds.error_report(result.double().numpy(), [t.double().numpy() for t in inputs],
                               reduce_sum, bits, bucket_size, exchange)


# settings for the schemes that need some, in the sweeps below
SCHEME_OPTIONS = {"dp-binomial": dict(dp_clip=0.1, dp_epsilon=4.0, dp_sensitivity=1e-4)}


def scheme_sweep(inputs, rank):
    """Every registered scheme through hvd.allreduce: the reduced gradient's NMSE beside the NMSE
    of one rank's own compression, and a digest to compare across ranks."""
    results = {}
    for scheme in core.SCHEMES:
        bits = next(b for b in (4, 2, 1) if core.supports(scheme, b))
        options = SCHEME_OPTIONS.get(scheme, {})
        compressor = get_compressor(scheme, bits=bits, **options)
        out = hvd.allreduce(inputs[rank], name=f"scheme.{scheme}", op=hvd.Average,
                            compression=compressor)
        truth = torch.stack(inputs).double().mean(0)
        single = [core.decode(core.encode(x.numpy(), scheme=scheme, bits=bits, bucket_size=512,
                                          key=99, options=options))[0] for x in inputs]
        single_nmse = np.mean([((d - x.double().numpy()) ** 2).sum() / (x.double() ** 2).sum()
                               for d, x in zip(single, inputs)])
        kind = choose_exchange(compressor.config, out.numel(), hvd.size())
        # (the reduce-scatter's chunk payloads differ in size from rank to rank)
        sent = compressor.metrics()["counters"]["payload_bytes"] if kind == "allgather" else None
        results[scheme] = {"digest": digest(out), "single_nmse": float(single_nmse),
                           "exchange": kind, "bits": bits, "payload_bytes": sent,
                           "fixed_size": core.SCHEMES[scheme].body is None and
                           core.SCHEMES[scheme].choose_bits is None,
                           "nmse": float(((out.double() - truth) ** 2).sum() /
                                         (truth ** 2).sum())}
    return results


def exchanges(inputs, rank):
    """Both exchanges forced at any size, what "auto" picks, and the reduce-scatter with
    tensors decompressed in opposite orders on alternate ranks (which must not hang)."""
    report = {}
    for kind in ("allgather", "reduce-scatter"):
        compressor = TNQCompressor(bits=3, exchange=kind)
        out = hvd.allreduce(inputs[rank], name=f"exchange.{kind}", compression=compressor)
        report[kind] = error_report(out, inputs, False, bits=3, exchange=kind)
        report[kind].update(digest=digest(out), stats=compressor.metrics()["counters"])
    compressor = TNQCompressor(bits=4)
    hvd.allreduce(inputs[rank], name="exchange.auto", compression=compressor)
    report["auto_stats"] = compressor.metrics()["counters"]
    # 60,000 elements in parts of 8,192 (whole buckets): 8 payloads, each its own allgather
    compressor = TNQCompressor(bits=3, exchange="allgather", part_elements=8000)
    out = hvd.allreduce(inputs[rank], name="exchange.parts", compression=compressor)
    report["parts"] = dict(error_report(out, inputs, False, bits=3, exchange="allgather"),
                           digest=digest(out), stats=compressor.metrics()["counters"])

    compressor = TNQCompressor(bits=3, exchange="reduce-scatter")
    second = [t.flip(0) for t in inputs]
    contexts = [compressor.compress(t) for t in (inputs[rank], second[rank])]  # noname.0, .1
    probes = [hvd.allreduce(probe, name=f"order.probe{i}", op=hvd.Average)
              for i, (probe, _) in enumerate(contexts)]
    order = [0, 1] if rank % 2 == 0 else [1, 0]
    results = {i: compressor.decompress(probes[i], contexts[i][1]) for i in order}
    # rank 0 allgathers, the others alltoall: Horovod sees unrelated collectives, the probe
    # tells every rank before any of them waits
    report["mixed_exchanges"] = expect_error(lambda: hvd.allreduce(
        inputs[rank], name="exchange.mixed", compression=TNQCompressor(
            bits=3, exchange="allgather" if rank == 0 else "reduce-scatter")))
    # rank 0 sends the tensor in parts, the others whole: allgathers of names the others never
    # start; the probe tells every rank before any of them waits
    report["mixed_parts"] = expect_error(lambda: hvd.allreduce(
        inputs[rank], name="exchange.parts_mixed", compression=TNQCompressor(
            bits=3, exchange="allgather", part_elements=8192 if rank == 0 else 0)))
    # settings that differ by rank, the mismatched tensor decompressed after another: with
    # 3 ranks the first is a reduce-scatter on every rank, and waiting on it would wait on the
    # second's alltoall too, which only rank 0 started; the settings check comes first
    mixed = TNQCompressor(bits=3, exchange="reduce-scatter" if rank == 0 else "auto")
    pair = [mixed.compress(inputs[rank]), mixed.compress(inputs[rank][:1000])]
    pair_probes = [hvd.allreduce(probe, name=f"mixed.pair{i}", op=hvd.Average)
                   for i, (probe, _) in enumerate(pair)]
    report["mixed_two_tensors"] = expect_error(
        lambda: [mixed.decompress(pair_probes[i], pair[i][1]) for i in (0, 1)])
    report["out_of_order"] = [dict(error_report(results[i], data, False, bits=3,
                                                exchange="reduce-scatter"),
                                   digest=digest(results[i]))
                              for i, data in enumerate((inputs, second))]
    return report


def adaptive_input(rank, n=N_ELEMENTS):
    """Inputs whose shapes differ by rank, so that adaptive schemes choose differently."""
    rng = np.random.default_rng(2000 + rank)
    x = rng.standard_t(1.5 + rank, n) if rank % 2 else rng.normal(size=n)
    return torch.from_numpy(0.01 * x).to(torch.float32)


def reconstruct(inputs, scheme, bits, name, step, options, seed=0):
    """What hvd.allreduce(op=Average) must return, rebuilt from every rank's input with the
    numpy core: each rank's payload decoded and summed in rank order, divided by N."""
    payloads = [core.encode(x.numpy(), scheme=scheme, bits=bits, bucket_size=512,
                            key=core.stream_key(seed, r, name), step=step, options=options)
                for r, x in enumerate(inputs)]
    total = None
    for payload in payloads:
        values = core.decode(payload)[0]
        total = values if total is None else total + values
    total *= 1.0 / len(inputs)
    return torch.from_numpy(total).to(torch.float32), payloads


def adaptive_checks(rank, size):
    """topk, tnq-sparse, dqsgd and dp-binomial on real workers: the reduced tensor equals the core's
    reconstruction exactly, over several steps (fresh noise, uneven payloads), and the privacy
    accounting matches the core's."""
    inputs = [adaptive_input(r) for r in range(size)]
    report = {}
    for scheme, bits, options in (("topk", 2, {}), ("tnq-sparse", 2, {}),
                                  ("dqsgd", 8, {"nmse_target": 0.05}),
                                  ("dp-binomial", 4, SCHEME_OPTIONS["dp-binomial"])):
        # no error feedback here, so every step's payload depends on the input alone
        compressor = get_compressor(scheme, bits=bits, error_feedback=0.0,
                                    exchange="allgather", **options)
        exact, digests, sizes = [], [], []
        for step in range(2):
            out = hvd.allreduce(inputs[rank], name=f"adaptive.{scheme}", op=hvd.Average,
                                compression=compressor)
            expected, payloads = reconstruct(inputs, scheme, bits, f"adaptive.{scheme}", step,
                                             options)
            exact.append(bool(torch.equal(out, expected)))
            digests.append(digest(out))
            sizes.append([int(p.size) for p in payloads])
        report[scheme] = {"exact": exact, "digests": digests, "payload_sizes": sizes,
                          "widths": [int(core.read_header(p).bits) for p in payloads]}
        report.setdefault("bytes_sent", {})[scheme] = [
            compressor.metrics()["counters"]["payload_bytes"],
            sum(step_sizes[rank] for step_sizes in sizes)]
        if scheme == "dp-binomial":
            report[scheme]["privacy"] = compressor.privacy_spent()
            report[scheme]["privacy_core"] = core.privacy.account(
                [N_ELEMENTS], 2, bits, **compressor.config.scheme_options())

    for scheme in ("topk", "tnq-sparse"):
        feedback = get_compressor(scheme, bits=1)  # error feedback on by default
        for _ in range(3):
            out = hvd.allreduce(inputs[rank], name=f"adaptive.{scheme}.feedback",
                                compression=feedback)
        report[f"{scheme}_feedback"] = {"digest": digest(out),
                                        "residuals": sorted(feedback.state_dict()["residuals"]),
                                        "error_feedback": feedback.config.error_feedback}
    report["mixed_schemes"] = expect_error(lambda: hvd.allreduce(
        inputs[rank], name="adaptive.mixed",
        compression=get_compressor("topk" if rank == 0 else "tnq", bits=2,
                                   exchange="allgather")))
    return report


def decode_into(inputs, rank):
    """finish() with ``out``: the result lands in out (a float32 gradient, in the allgather
    and the reduce-scatter exchange) and equals the result of a run without out; an out that
    cannot take it (float64 for a float32 tensor, a bfloat16 tensor's own memory: numpy has no
    bfloat16) is left alone. Then the fused optimizer: a lone parameter keeps its gradient
    memory through synchronize(), bfloat16 and sparse-as-dense gradients are reduced too."""
    report = {}
    for kind in ("allgather", "reduce-scatter"):
        for dtype, targets in ((torch.float32, ("none", "same", "float64")),
                               (torch.bfloat16, ("none", "same"))):
            results = []
            for target in targets:
                compressor = TNQCompressor(bits=3, exchange=kind, part_elements=25_000)
                sent = inputs[rank].to(dtype, copy=True)  # "same" decodes into it
                ctx = compressor.start(sent, f"into.{kind}")  # same name, step: same noise
                out = {"none": None, "same": sent,
                       "float64": torch.zeros(N_ELEMENTS, dtype=torch.float64)}[target]
                result = compressor.finish(ctx, 1.0 / len(inputs), out=out)
                results.append(result)
                if target != "none":
                    entry = f"{kind}.{dtype}.{target}"
                    report[entry + ".shares"] = result.data_ptr() == out.data_ptr()
                    report[entry + ".equal"] = bool(torch.equal(result, results[0]))
            report[f"{kind}.{dtype}.digest"] = digest(results[0])
            report[f"{kind}.{dtype}.error"] = error_report(results[0], inputs, False, bits=3,
                                                           exchange=kind)
    fused = {}
    for case, model in (("lone", torch.nn.Linear(200, 100, bias=False)),
                        ("bucket", torch.nn.Linear(200, 100)),
                        ("bfloat16", torch.nn.Linear(200, 100).to(torch.bfloat16)),
                        ("sparse", torch.nn.Embedding(3000, 8, sparse=True))):
        optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters(),
                                         compression=TNQCompressor(bits=4),
                                         sparse_as_dense=case == "sparse")
        if case == "sparse":
            model(torch.arange(rank, 3000, 2)).sum().backward()
        else:
            dtype = next(model.parameters()).dtype
            model(torch.ones(4, 200, dtype=dtype) * (rank + 1)).sum().backward()
        grad = model.weight.grad
        before = grad.data_ptr() if not grad.is_sparse else None
        optimizer.synchronize()
        reduced = model.weight.grad
        fused[case] = {"keeps_memory": None if reduced.is_sparse else reduced.data_ptr() == before,
                       "dense": not reduced.is_sparse,
                       "dtype": str(reduced.dtype),
                       "digest": digest(reduced.to_dense() if reduced.is_sparse else reduced)}
    report["fused"] = fused
    return report


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    inputs = [rank_input(r) for r in range(size)]
    mine = inputs[rank]
    report = {"size": size}

    for op_name, op in (("average", hvd.Average), ("sum", hvd.Sum)):
        result = hvd.allreduce(mine, name=f"grad.{op_name}", op=op,
                               compression=TNQCompressor(bits=3))
        report[op_name] = error_report(result, inputs, op_name == "sum", bits=3)
        report[op_name]["digest"] = digest(result)

    result = hvd.allreduce(mine, name="grad.class", compression=TNQCompressor)
    report["class"] = error_report(result, inputs, False, bits=4)
    report["class"]["digest"] = digest(result)

    scaled = hvd.allreduce(mine, name="grad.scaled", op=hvd.Average, prescale_factor=0.5,
                           postscale_factor=3.0, compression=TNQCompressor(bits=4))
    report["scaled"] = error_report(scaled / 1.5, inputs, False, bits=4)

    anonymous = hvd.allreduce(mine, compression=TNQCompressor(bits=4))
    report["anonymous"] = error_report(anonymous, inputs, False, bits=4)

    report["dtypes"] = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        typed = [t.to(dtype) for t in inputs]
        out = hvd.allreduce(typed[rank].reshape(200, 300), name=f"grad.{dtype}",
                            compression=TNQCompressor(bits=4))
        entry = error_report(out.reshape(-1), [t.double() for t in typed], False, bits=4)
        entry.update(dtype=str(out.dtype), shape=list(out.shape), digest=digest(out))
        report["dtypes"][str(dtype)] = entry

    small = torch.arange(10, dtype=torch.float32) * (rank + 1)
    integer = torch.arange(5000, dtype=torch.int64) * (rank + 1)
    compressor = TNQCompressor(bits=2)
    report["passthrough"] = {
        "small_equal": bool(torch.equal(hvd.allreduce(small, name="small", compression=compressor),
                                        hvd.allreduce(small, name="small.ref"))),
        "int_equal": bool(torch.equal(hvd.allreduce(integer, name="int", compression=compressor),
                                      hvd.allreduce(integer, name="int.ref"))),
        "stats": compressor.metrics()["counters"],
    }

    poisoned = mine.clone()
    if rank == size - 1:
        poisoned[[5, 7]] = torch.tensor([float("nan"), float("inf")], dtype=poisoned.dtype)
    out = hvd.allreduce(poisoned, name="poisoned", compression=TNQCompressor(bits=3))
    report["nonfinite"] = {"nan_at_5": bool(torch.isnan(out[5])), "inf_at_7": float(out[7]),
                           "finite_elsewhere": bool(torch.isfinite(out[8:]).all()),
                           "digest": digest(out)}

    report["mismatched_bits"] = expect_error(lambda: hvd.allreduce(
        mine, name="mismatch", compression=TNQCompressor(bits=3 + rank % 2)))
    report["op_max"] = expect_error(lambda: hvd.allreduce(
        mine, name="max", op=hvd.Max, compression=TNQCompressor(bits=3)))
    report["meta_device"] = expect_error(lambda: TNQCompressor().compress(
        torch.empty(5000, device="meta")))

    # Same seed, rank, name and step give the same payload; another seed changes it.
    seeded = [TNQCompressor(bits=3, seed=s) for s in (7, 7, 8)]
    digests = [digest(hvd.allreduce(mine, name="seeded", compression=c)) for c in seeded]
    report["seeds"] = {"same_seed_same_result": digests[0] == digests[1],
                       "other_seed_other_result": digests[0] != digests[2]}

    report["schemes"] = scheme_sweep(inputs, rank)
    report.update(exchanges(inputs, rank))
    report["adaptive"] = adaptive_checks(rank, size)
    report["decode_into"] = decode_into(inputs, rank)

    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
