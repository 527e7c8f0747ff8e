"""Tactic: adaptive sparse attention for long-context LLM decoding.

Per query head and decode step, Tactic reads the smallest set of key clusters holding a
target fraction P of the attention mass (k-means clusters ranked by q.centroid plus a cluster-width term, with an
estimate of the softmax mass to know where to stop), then attends over them.
"""
import atexit as _atexit
import gc as _gc

from ._core import CapacityError, __version__, with_cuda, with_openmp
from .decoder import SparseDecoder
from . import ops

__all__ = ["SparseDecoder", "ops", "CapacityError", "__version__", "with_cuda", "with_openmp"]


# Decoders caught in reference cycles (a traceback kept by an exception handler, a closure) are
# freed by the cyclic GC, which may not run again before the interpreter tears the extension
# down; a CUDA decoder would then free its device memory late in shutdown. One collection at
# exit, while torch and the CUDA runtime are still loaded, releases them in order.
_atexit.register(_gc.collect)
