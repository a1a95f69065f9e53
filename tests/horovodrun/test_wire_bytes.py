"""Bytes that cross the (loopback) network with real horovodrun workers: TNQ 4-bit vs none."""

import json
import subprocess
import sys

import pytest

from launch import ROOT

pytestmark = pytest.mark.horovodrun


def test_tnq_4bit_sends_at_most_a_fifth_of_uncompressed(tmp_path):
    out = tmp_path / "wire.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.wire_bytes",
                           "--quick", "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["compression"]: row for row in json.loads(out.read_text())}
    none, tnq = rows["none"], rows["tnq"]
    # the counters saw the gradients: both ranks send at least their own payloads
    # (1.9, not 2: the per-step figure is a difference of two runs, and varies by about 1%)
    assert none["wire_bytes_per_step"] >= 1.9 * none["fp32_bytes_per_step"]
    assert tnq["wire_bytes_per_step"] >= 2 * tnq["payload_bytes_per_step"]
    assert tnq["vs_uncompressed"] <= 0.2, rows
