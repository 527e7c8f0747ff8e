"""No memory growth across 1000 create/prefill/decode/destroy cycles (CPU): resident set size
from /proc, and glibc's count of bytes in use (mallinfo2), which sees C++ heap leaks far
smaller than a page. The CUDA counterpart is in test_cuda_hardening.py."""
import ctypes
import ctypes.util
import gc
import os

import numpy as np
import pytest

import tactic

HQ, HKV, D, N = 4, 2, 64, 64


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out and not had back (None without glibc >= 2.33)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _cycle(k, v, q, kn, policy):
    dec = tactic.SparseDecoder(2, HQ, HKV, D, max_batch=2, max_tokens=N + 4, cluster_size=8,
                               policy=policy, budget=16, record_selection=policy == "oracle")
    for layer in range(2):
        dec.prefill(layer, k, v)
        out = dec.decode(layer, q, kn, kn)
        dec.stats(layer)
    try:
        dec.decode(0, q, kn[..., :8], kn)  # a failed call must not leak either
    except ValueError:
        pass
    del dec
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="ASan's quarantine keeps freed memory by design")
def test_no_growth_over_1000_cycles():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((N, HKV, D)).astype(np.float16)
    v = rng.standard_normal((N, HKV, D)).astype(np.float16)
    q = rng.standard_normal((1, HQ, D)).astype(np.float16)
    kn = rng.standard_normal((1, HKV, D)).astype(np.float16)
    policies = ["tactic", "dense", "oracle", "quest"]
    for i in range(100):  # warm-up: allocator pools, OpenMP threads, lazily built caches
        _cycle(k, v, q, kn, policies[i % 4])
    gc.collect()
    rss0, heap0 = _rss_bytes(), _heap_in_use()
    store = tactic.SparseDecoder(2, HQ, HKV, D, max_batch=2, max_tokens=N + 4, cluster_size=8).nbytes
    for i in range(1000):
        _cycle(k, v, q, kn, policies[i % 4])
    gc.collect()
    rss1, heap1 = _rss_bytes(), _heap_in_use()
    print(f"1000 cycles (store {store} bytes each): RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB"
          + ("" if heap0 is None else f", malloc in use {heap0} -> {heap1} bytes"))
    # One leaked store per cycle would add > 1000 * store bytes (~100 MB); allow 4 MiB of
    # allocator noise in RSS, and 64 KiB (64 bytes a cycle) in malloc's own count.
    assert rss1 - rss0 < 4 * 2**20, (rss0, rss1)
    if heap0 is not None:
        assert heap1 - heap0 < 64 * 2**10, (heap0, heap1)
