"""See the engine work: step traces (`Tracer`), their pictures (`fast.trace.render`) and
`python -m fast.trace`, which runs a small workload and draws them."""

from fast.trace.ref_observer import RefObserver
from fast.trace.tracer import MAX_RECORDS, SCHEMA, LayerTimer, Tracer, read_trace, sample_key

__all__ = ["MAX_RECORDS", "SCHEMA", "LayerTimer", "RefObserver", "Tracer", "read_trace", "sample_key"]
