"""Pallas kernels for merge hot paths, each with a pure-jnp reference and a dispatcher.

Dispatchers take `backend="auto" | "pallas" | "reference"` and `interpret=False`: "auto" runs
the kernel on GPU/TPU and the reference on CPU, unless `interpret=True` (the kernel in Pallas
interpret mode, for CPU tests).

Not yet on the merge path: `jmerge merge` and the search run the jnp methods of `jmerge.merge`
(whose bits the kernels' references match, tests/test_kernels.py); the kernels are benchmarked
on accelerators (`scripts/bench_kernels.py`, `scripts/bench_gpu.sh`) and wired into the engine
where they pay off at scale.

`magnitude_count` (the function) is deliberately not re-exported here: it would shadow the
submodule of the same name. Import it as `from jmerge.kernels.magnitude_count import
magnitude_count`.
"""

from jmerge.kernels.dare_fused import dare
from jmerge.kernels.magnitude_count import kth_largest_abs
from jmerge.kernels.ties_fused import ties_merge

__all__ = ["dare", "kth_largest_abs", "ties_merge"]
