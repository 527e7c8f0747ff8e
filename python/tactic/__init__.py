"""Tactic: adaptive sparse attention for long-context LLM decoding.

Per query head and decode step, Tactic reads the smallest set of key clusters holding a
target fraction P of the attention mass (k-means clusters ranked by q.centroid plus a
cluster-width term, with an estimate of the softmax mass to know where to stop), then
attends over them.
"""
from ._core import CapacityError, __version__, with_cuda, with_openmp
from ._runinfo import build_info
from .decoder import SparseDecoder
from . import ops

__all__ = ["SparseDecoder", "ops", "CapacityError", "__version__", "build_info", "with_cuda", "with_openmp"]

