"""Does TNQ's communication overlap the backward pass, as stock Horovod's does? Read it off a
Horovod timeline.

Runs 2 workers (horovodrun, Gloo) that train an MLP of 6 hidden 1024x1024 layers with
hvd.DistributedOptimizer, with and without TNQCompressor, with HOROVOD_TIMELINE set. Right after
loss.backward() returns, each worker allreduces a one-element marker, so the timeline holds the
moment backward ended. For each step it reports how many gradient collectives had finished
moving their data before backward ended, and what fraction of the time spent moving data fell
inside the backward pass. Writes overlap.csv and overlap.png (one step's timeline, both runs)
to --out (default benchmarks/out).

    python -m benchmarks.overlap_timeline [--steps 6] [--workers 2] [--out DIR]
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARKER = "marker.backward_end"
# Horovod timeline activities that move a tensor's data between ranks
TRANSFERS = ("GLOO_ALLGATHER", "GLOO_ALLREDUCE", "GLOO_ALLTOALL", "MPI_ALLGATHER",
             "MPI_ALLREDUCE", "MPI_ALLTOALL")

WORKER = """
import sys
import horovod.torch as hvd
import torch
from horovod_tnq.torch import TNQCompressor

hvd.init()
torch.manual_seed(0)
layers = []
for _ in range(6):
    layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(1024, 10))
compression = TNQCompressor(bits=4) if sys.argv[1] == "tnq" else hvd.Compression.none
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                               named_parameters=model.named_parameters(),
                               compression=compression)
marker = torch.zeros(1)
for step in range(int(sys.argv[2])):
    x, y = torch.randn(256, 1024), torch.randint(0, 10, (256,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    hvd.allreduce(marker, name=f"%s.{step}")
    opt.step()
""" % MARKER


def run(compression, steps, workers, timeline):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(WORKER)
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3",
               HOROVOD_TIMELINE=timeline)
    try:
        subprocess.run([horovodrun, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
                        sys.executable, script.name, compression, str(steps)],
                       env=env, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"{compression} run failed:\n{error.stdout[-3000:]}\n"
                         f"{error.stderr[-3000:]}") from None
    finally:
        os.unlink(script.name)


def intervals(timeline):
    """{collective name: [(activity, begin us, end us), ...]} from a Horovod timeline."""
    with open(timeline) as f:
        text = f.read().rstrip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    names, open_at, spans = {}, {}, {}
    for event in events:
        pid = event.get("pid")
        if event.get("ph") == "M" and event.get("name") == "process_name":
            names[pid] = event["args"].get("name")
        elif event.get("ph") == "B":
            open_at[pid] = (event["name"], event["ts"])
        elif event.get("ph") == "E" and pid in open_at:
            activity, begin = open_at.pop(pid)
            spans.setdefault(names.get(pid), []).append((activity, begin, event["ts"]))
    return spans


def step_report(spans, step):
    """Overlap of gradient transfers with backward in one step: backward ends when the marker's
    negotiation begins; the step's transfers are those that began between the previous step's
    marker and the next step's."""
    def marker_begin(k):
        return min(b for a, b, _ in spans[f"allreduce.{MARKER}.{k}"] if a.startswith("NEGOTIATE"))
    start, end, after = marker_begin(step - 1), marker_begin(step), marker_begin(step + 1)
    transfers = [(name, b, e) for name, acts in spans.items() if MARKER not in (name or "")
                 for a, b, e in acts if a in TRANSFERS and start < b < after]
    moved = sum(e - b for _, b, e in transfers)
    hidden = sum(max(0.0, min(e, end) - b) for _, b, e in transfers)
    return {"step": step, "collectives": len(transfers),
            "finished_before_backward_end": sum(e <= end for _, _, e in transfers),
            "transfer_ms": moved / 1e3, "hidden_ms": hidden / 1e3,
            "hidden_fraction": hidden / moved if moved else 0.0}, transfers, end


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.4 * len(runs)), squeeze=False)
    for ax, (label, (transfers, end)) in zip(axes[:, 0], runs.items()):
        first = min([b for _, b, _ in transfers] + [end])
        for row, (name, b, e) in enumerate(sorted(transfers, key=lambda t: t[1])):
            ax.barh(row, (e - b) / 1e3, left=(b - first) / 1e3, color="tab:blue")
        ax.axvline((end - first) / 1e3, color="tab:red", label="backward ends")
        ax.set_title(f"{label}: gradient transfers of one step")
        ax.set_ylabel("collective")
        ax.legend(loc="lower right")
    axes[-1, 0].set_xlabel("ms since the step's first transfer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, shown = [], {}
    print("| gradients | step | collectives | finished before backward ends | "
          "transfer ms | of it inside backward |")
    print("|---|---|---|---|---|---|")
    for compression in ("none", "tnq"):
        with tempfile.TemporaryDirectory() as tmp:
            timeline = os.path.join(tmp, "timeline.json")
            run(compression, args.steps, args.workers, timeline)
            spans = intervals(timeline)
        for step in range(1, args.steps - 1):  # step 0 includes Horovod's start-up
            report, transfers, end = step_report(spans, step)
            rows.append(dict(report, compression=compression))
            print(f"| {compression} | {step} | {report['collectives']} | "
                  f"{report['finished_before_backward_end']} | {report['transfer_ms']:.1f} | "
                  f"{100 * report['hidden_fraction']:.0f}% |", flush=True)
        shown[{"none": "uncompressed", "tnq": "TNQ 4-bit"}[compression]] = (transfers, end)
    with open(os.path.join(args.out, "overlap.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(shown, os.path.join(args.out, "overlap.png"))
    print(f"\nwrote {os.path.join(args.out, 'overlap.csv')} and overlap.png")


if __name__ == "__main__":
    main()
