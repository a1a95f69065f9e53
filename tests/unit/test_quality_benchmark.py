"""The quality benchmark runs end to end, and its headlines hold (README "Results" and
docs/benchmarks.md):

* the target of issue 4: at 2, 3 and 4 bits per element a TNQ scheme has the lowest NMSE of
  every compared scheme at the same bits per element sent, on every gradient source (synthetic
  and real models) and on every layer of the real models; ``tnq-sparse``'s payloads never
  exceed ``bits`` per element;
* among the quantizers (one code per element) a TNQ variant is best likewise;
* adaptive Top-K, at the same bits, beats every quantizer at 2 bits on the real models.

One seed instead of the documented run's three keeps it quick; the margins are wider than the
noise."""

import csv
import os
import subprocess
import sys

import pytest
from launch import ROOT

from benchmarks import quality



def test_quality_benchmark(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.quality",
                           "--out", str(tmp_path), "--seeds", "1"], capture_output=True, cwd=ROOT,
                          text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    with open(tmp_path / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    sources = {row["source"] for row in rows}
    assert {"cnn_digits", "char_lm_stdlib", "synthetic/student_t2",
            "synthetic/student_t3"} <= sources
    assert {row["scheme"] for row in rows} == set(quality.COMPARED) | set(quality.ANCHORS)
    for row in rows:
        if row["scheme"] == "tnq-sparse":
            assert float(row["bits_per_element"]) <= int(row["bits"]), row
    for exclude in ((), quality.SPARSIFIERS):  # against every scheme, among the quantizers
        for by_layer in (False, True):
            summary = quality.summarise(rows, by_layer=by_layer)
            verdicts = quality.equal_bits_verdicts(summary, exclude)
            assert len(verdicts) >= 3 * len(sources)
            for key, (best, nmse, rival, rival_nmse) in verdicts.items():
                assert nmse < rival_nmse, (exclude, key, best, nmse, rival, rival_nmse)
    summary = quality.summarise(rows)
    for source in sources:  # the default is as good as the state of the art, everywhere
        for bits in (2, 3, 4, 8):
            ours = summary[(source, "all", bits, "tnq-rht")][1]
            # one seed: a rotation's error varies by about 8% from seed to seed on the source
            # with outliers (the documented 3-seed run holds both within 6%)
            assert ours <= 1.15 * summary[(source, "all", bits, "eden-anchor")][1], source
            assert ours < summary[(source, "all", bits, "tnq")][1], source
    for source in ("cnn_digits", "char_lm_stdlib"):
        _, nmse, _, _ = quality.equal_bits_verdicts(summary, quality.SPARSIFIERS)[
            (source, "all", 2)]
        topk = summary[(source, "all", 2, "topk")][1]
        assert topk < nmse, (source, topk, nmse)


def test_equal_bits_comparison_interpolates_between_bit_widths():
    points = [(2.1, 0.4), (3.1, 0.1), (4.1, 0.025)]
    # halfway in log between 0.1 and 0.025; below its fewest bits a scheme is no better
    assert quality.nmse_at(points, 3.6) == pytest.approx(0.05)
    assert quality.nmse_at(points, 1.5) == pytest.approx(0.4)
    summary = {("s", "all", 2, "tnq-opt"): (2.2, 0.3), ("s", "all", 2, "orq"): (2.1, 0.4),
               ("s", "all", 3, "orq"): (3.1, 0.1)}
    best, nmse, rival, rival_nmse = quality.equal_bits_verdicts(summary)[("s", "all", 2)]
    assert (best, rival) == ("tnq-opt", "orq")
    assert 0.1 < rival_nmse < 0.4 and rival_nmse == quality.nmse_at([(2.1, 0.4), (3.1, 0.1)], 2.2)
