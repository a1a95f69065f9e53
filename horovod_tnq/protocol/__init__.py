"""The exchange protocol both framework adapters use, with no framework imports.

Stock Horovod hands ``compress(tensor)`` to an *allreduce*, but packed codes cannot be summed.
So each compressor, inside the stock interface:

1. names the tensor's collectives from the name Horovod gives the allreduce (naming.py: the
   caller passes it, or the adapter reads it from stock Horovod's frames), so every rank pairs
   the same tensors, and picks its exchange and payloads (plan.py);
2. encodes each payload (state.py: error feedback, the step that seeds the random stream) and
   starts its exchange: the allgather, the reduce-scatter or the hierarchical exchange, all
   written once in exchange.py over the adapter's collectives (hosts.py finds the hosts);
3. returns a small *probe* instead of the gradient (N + 5 floats, probe.py), which Horovod
   allreduces with the caller's op and scale factors;
4. in ``decompress(probe, ctx)`` finishes the exchange, decoding and summing every rank's
   payloads, and scales the sum by what the probe reveals.

settings.py holds what all ranks must share, state.py what each rank carries from step to step
(checkpointable), base.py what the compressors share. The adapters (horovod_tnq.torch,
horovod_tnq.tensorflow) add only tensor conversion and Horovod calls.
"""

from .base import CompressorBase, DefaultInstanceMethod, compressor_registry
from .naming import CollectiveNamer, NamedCompression, TensorName
from .overrides import TENSOR_SETTINGS, TensorSettings
from .plan import (REDUCED, WHOLE, Hosts, choose_exchange, chunk_bounds, cross_config,
                   host_bits, local_bounds, part_bounds,
                   part_names, plan, second_bits, second_round_configs, second_widths)
from .probe import (JOINED, MISMATCH, PROBE_TOLERANCE, UNSUPPORTED_OP, ProbeReading,
                    cached_exchange_under_join, exchange_refused_by_join, plan_code,
                    probe_values, read_probe, reduction_scale)
from .settings import (DEFAULT_SCHEME, EXCHANGES, SETTINGS_BYTES, CompressorConfig,
                       check_settings_agree, scheme_option_names, settings_buffer,
                       settings_differences, settings_text)
from .state import CompressorState, new_stats

__all__ = [
    "DEFAULT_SCHEME", "EXCHANGES", "JOINED", "MISMATCH", "PROBE_TOLERANCE", "REDUCED",
    "SETTINGS_BYTES", "UNSUPPORTED_OP", "WHOLE", "CollectiveNamer", "CompressorBase",
    "CompressorConfig",
    "CompressorState", "DefaultInstanceMethod", "ProbeReading",
    "cached_exchange_under_join", "exchange_refused_by_join", "choose_exchange", "chunk_bounds",
    "TENSOR_SETTINGS", "TensorSettings", "check_settings_agree", "compressor_registry",
    "NamedCompression", "TensorName", "new_stats", "part_bounds", "part_names", "plan",
    "second_bits", "second_round_configs", "second_widths", "Hosts", "cross_config", "host_bits",
    "local_bounds",
    "plan_code", "probe_values", "read_probe", "reduction_scale", "scheme_option_names",
    "settings_buffer", "settings_differences", "settings_text",
]
