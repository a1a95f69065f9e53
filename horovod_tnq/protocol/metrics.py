"""What a compressor did, per tensor and in total, for live training metrics (no framework
imports).

Each tensor's most recent exchange is kept as a record; "last_step" sums the records (every
tensor at its last exchange: after a training step, that step), "total" every exchange so far.
Records hold what was handed to Horovod (payload bytes of compressed tensors, bytes of the ones
passed through uncompressed), the elements, the seconds spent encoding and decoding on this rank
(on a GPU: the host time to launch the kernels), and the quantization error this rank's
gradients suffered, estimated from each payload's header and per-bucket parameters
(core.estimate_error: no extra pass over the data). The reduce-scatter's second quantization,
of the owners' chunk sums, counts in bytes and seconds but not in the error estimate, which is
about each rank's own gradient.

Tensors Horovod did not name (naming.is_anonymous: a new name at every call) share the record
"unnamed", which holds the latest such exchange (its "step": the number of that unnamed
tensor), so the records stay as many as the named tensors however many unnamed calls come.
"""

import threading

from .naming import UNNAMED, anonymous_number, is_anonymous, record_name
from .picklable import LockedState

AMOUNTS = ("payload_bytes", "passthrough_bytes", "compressed_elements", "passthrough_elements",
           "encode_seconds", "decode_seconds", "squared_error", "squared_norm")


class CompressionMetrics(LockedState):
    """Per-tensor records of the last exchange and running totals; see the module docstring."""

    def __init__(self):
        self._lock = threading.Lock()
        self.last = {}  # tensor name -> {"step": its exchange count, **AMOUNTS}
        self.total = dict.fromkeys(AMOUNTS, 0)
        self.total["exchanges"] = 0

    def add(self, name, step, **amounts):
        """Add ``amounts`` (keys of AMOUNTS) to tensor ``name``'s record of exchange ``step``
        (a new record when the step changed; ``step`` None: always a new one)."""
        if is_anonymous(name):  # its step is always 0; its number tells its exchanges apart
            name, step = UNNAMED, anonymous_number(name)
        with self._lock:
            record = self.last.get(name)
            if record is None or step is None or record["step"] != step:
                record = self.last[name] = {"step": step, **dict.fromkeys(AMOUNTS, 0)}
                self.total["exchanges"] += 1
            for key, value in amounts.items():
                record[key] += value
                self.total[key] += value

    def add_to_last(self, name, **amounts):
        """Add ``amounts`` to tensor ``name``'s latest record (its decoding, after its
        encoding: the exchange is the same)."""
        name = record_name(name)
        with self._lock:
            record = self.last.get(name)
            if record is None:
                record = self.last[name] = {"step": None, **dict.fromkeys(AMOUNTS, 0)}
            for key, value in amounts.items():
                record[key] += value
                self.total[key] += value

    def summary(self):
        """{"last_step": ..., "total": ..., "tensors": {name: ...}}, each with the amounts and
        what follows from them: bits_per_element (of the compressed tensors' payloads),
        wire_bits_per_element (everything handed to Horovod, per element reduced) and
        relative_error (estimated squared error over squared norm of the compressed tensors
        whose scheme has an estimate; None where none has)."""
        with self._lock:
            tensors = {name: _derived(dict(record)) for name, record in self.last.items()}
            last = dict.fromkeys(AMOUNTS, 0)
            for record in self.last.values():
                for key in AMOUNTS:
                    last[key] += record[key]
            last["tensors"] = len(self.last)
            return {"last_step": _derived(last), "total": _derived(dict(self.total)),
                    "tensors": tensors}



def _derived(amounts):
    compressed = amounts["compressed_elements"]
    elements = compressed + amounts["passthrough_elements"]
    wire = amounts["payload_bytes"] + amounts["passthrough_bytes"]
    amounts["bits_per_element"] = 8.0 * amounts["payload_bytes"] / compressed \
        if compressed else None
    amounts["wire_bits_per_element"] = 8.0 * wire / elements if elements else None
    amounts["relative_error"] = amounts["squared_error"] / amounts["squared_norm"] \
        if amounts["squared_norm"] > 0 else None
    return amounts


def scalars(summary, per_tensor=True):
    """(tag, value) pairs of a summary() for TensorBoard: the last step's and the total's
    numbers under "horovod_tnq/step/" and "horovod_tnq/total/", and each tensor's bits and
    estimated error under "horovod_tnq/tensors/<name>/" (``per_tensor``); None values left out."""
    pairs = []
    for scope, key in (("step", "last_step"), ("total", "total")):
        pairs += [(f"horovod_tnq/{scope}/{name}", value)
                  for name, value in summary[key].items() if value is not None]
    if per_tensor:
        for tensor, record in sorted(summary["tensors"].items()):
            for name in ("bits_per_element", "relative_error"):
                if record[name] is not None:
                    pairs.append((f"horovod_tnq/tensors/{tensor}/{name}", record[name]))
    return [(tag, float(value)) for tag, value in pairs]
