"""docs/CONTRACT.md on the CUDA backend: mixed devices refused by name, bad calls change
nothing, the store owns its data, no device-memory growth over 1000 cycles, and a capacity
that does not fit the GPU refused with the bytes it needs. Skipped without a usable GPU."""
import gc
import re

import numpy as np
import pytest

import tactic
from conftest import ranked_decoder as SparseDecoder

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (tactic.with_cuda and torch.cuda.is_available()),
                       reason="needs a CUDA build of tactic and a CUDA GPU"),
]

L, HQ, HKV, D, CAP, N = 2, 4, 2, 64, 48, 30


def _host():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((N, HKV, D)).astype(np.float16)
    v = rng.standard_normal((N, HKV, D)).astype(np.float16)
    q = rng.standard_normal((1, HQ, D)).astype(np.float16)
    kn = rng.standard_normal((1, HKV, D)).astype(np.float16)
    return k, v, q, kn


def _cuda(*arrays):
    return [torch.from_numpy(a).cuda() for a in arrays]


def fresh():
    k, v, *_ = _cuda(*_host())
    dec = SparseDecoder(L, HQ, HKV, D, max_batch=2, max_tokens=CAP, device="cuda",
                               cluster_size=4)
    for layer in range(L):
        dec.prefill(layer, k, v)
    return dec


def _q():
    _, _, q, kn = _host()
    return _cuda(q, kn)


BAD = [
    # mixed devices: every array must be on the decoder's device
    ("q-on-cpu", lambda d, q, kn: d.decode(0, q.cpu(), kn, kn), ValueError, "`q` must be on device cuda:0, got cpu"),
    ("k-on-cpu", lambda d, q, kn: d.decode(0, q, kn.cpu(), kn), ValueError, "`k_new` must be on device cuda:0"),
    ("v-on-cpu", lambda d, q, kn: d.decode(0, q, kn, kn.cpu()), ValueError, "`v_new` must be on device cuda:0"),
    ("out-on-cpu", lambda d, q, kn: d.decode(0, q, kn, kn, out=torch.empty(1, HQ, D, dtype=torch.float16)), ValueError, "`out` must be on device cuda:0"),
    ("prefill-on-cpu", lambda d, q, kn: d.prefill(0, torch.zeros(N, HKV, D, dtype=torch.float16), torch.zeros(N, HKV, D, dtype=torch.float16)), ValueError, "`keys` must be on device cuda:0"),
    ("prefill-values-on-cpu", lambda d, q, kn: d.prefill(0, torch.zeros(N, HKV, D, dtype=torch.float16, device="cuda"), torch.zeros(N, HKV, D, dtype=torch.float16)), ValueError, "`values` must be on device cuda:0"),
    # the device-independent checks hold on CUDA too
    ("layer", lambda d, q, kn: d.decode(L, q, kn, kn), ValueError, "`layer`"),
    ("q-shape", lambda d, q, kn: d.decode(0, q[:, :3], kn, kn), ValueError, "`q`"),
    ("q-int", lambda d, q, kn: d.decode(0, q.to(torch.int32), kn, kn), TypeError, "`q`"),
    ("k-v-dtypes", lambda d, q, kn: d.decode(0, q, kn, kn.float()), TypeError, "`v_new`"),
    ("seq", lambda d, q, kn: d.decode(0, q, kn, kn, seq=2), ValueError, "`seq`"),
    ("empty-seq", lambda d, q, kn: d.decode(0, q, None, None, seq=1), ValueError, "is empty"),
    ("out-overlap", lambda d, q, kn: d.decode(0, q, kn, kn, out=torch.empty(D, dtype=torch.float16, device="cuda").expand(1, HQ, D)), ValueError, "`out` has overlapping"),
    ("prefill-capacity", lambda d, q, kn: d.prefill(0, torch.zeros(CAP + 1, HKV, D, dtype=torch.float16, device="cuda"), torch.zeros(CAP + 1, HKV, D, dtype=torch.float16, device="cuda")), tactic.CapacityError, "max_tokens"),
    ("reuse-without-selection", lambda d, q, kn: d.decode(0, q, None, None, reuse_selection=True), ValueError, "reuse_selection needs a selection"),
    ("reuse-with-append", lambda d, q, kn: d.decode(0, q, kn, kn, reuse_selection=True), ValueError, "pass k_new=v_new=None"),
    ("target-set-zero", lambda d, q, kn: setattr(d, "target", 0.0), ValueError, "`target` must be in (0, 1]"),
    ("budget-zero", lambda d, q, kn: d.decode(0, q, kn, kn, budget=np.zeros((1, HKV), np.int64)), ValueError, "`budget`"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_call_on_cuda_changes_nothing(case):
    _, call, exc, words = case
    dec, ref = fresh(), fresh()
    q, kn = _q()
    with pytest.raises(exc, match=re.escape(words)) as info:
        call(dec, q, kn)
    assert type(info.value) is exc
    assert dec.target == ref.target
    for layer in range(L):
        a, b = dec.decode(layer, q, kn, kn), ref.decode(layer, q, kn, kn)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert dec.length(layer, 0) == ref.length(layer, 0) == N + 1


def test_store_owns_its_data_on_cuda():
    k, v, q, kn = _cuda(*_host())
    dec, ref = SparseDecoder(1, HQ, HKV, D, max_tokens=CAP, device="cuda"), \
        SparseDecoder(1, HQ, HKV, D, max_tokens=CAP, device="cuda")
    dec.prefill(0, k, v)
    ref.prefill(0, k.clone(), v.clone())
    k.fill_(float("nan"))  # stream-ordered after the prefill's copy
    v.fill_(float("nan"))
    del k, v
    gc.collect()
    torch.cuda.empty_cache()
    junk = [torch.full((N, HKV, D), float("nan"), dtype=torch.float16, device="cuda") for _ in range(8)]
    torch.testing.assert_close(dec.decode(0, q, kn, kn), ref.decode(0, q, kn, kn), rtol=0, atol=0)
    assert len(junk) == 8


def test_nan_propagates_only_to_its_group_on_cuda():
    """CUDA does not scan inputs for NaN/Inf (that would synchronise the host): documented
    propagation. A NaN in KV head 0's new value reaches the query heads of group 0 (P = 1
    reads every token) and no other; re-prefilling the slot clears it."""
    k, v, q, kn = _cuda(*_host())
    dec = SparseDecoder(1, HQ, HKV, D, max_tokens=CAP, device="cuda", target=1.0)
    dec.prefill(0, k, v)
    bad = kn.clone()
    bad[0, 0, 3] = float("nan")
    out = dec.decode(0, q, kn, bad).float().cpu()
    g = HQ // HKV
    assert torch.isnan(out[0, :g]).any() and torch.isfinite(out[0, g:]).all()
    dec.prefill(0, k, v)
    assert torch.isfinite(dec.decode(0, q, kn, kn).float()).all()


def test_no_device_memory_growth_over_1000_cycles():
    k, v, q, kn = _cuda(*_host())

    def cycle():
        dec = SparseDecoder(L, HQ, HKV, D, max_batch=2, max_tokens=CAP, device="cuda",
                                   cluster_size=4)
        for layer in range(L):
            dec.prefill(layer, k, v)
            dec.decode(layer, q, kn, kn)
            dec.stats(layer)
        with pytest.raises(ValueError):
            dec.decode(0, q, kn[..., :8], kn)
        del dec

    for _ in range(50):
        cycle()
    torch.cuda.synchronize()
    gc.collect()
    free0, _ = torch.cuda.mem_get_info()  # cudaMemGetInfo: sees tactic's own cudaMalloc too
    alloc0 = torch.cuda.memory_allocated()
    for _ in range(1000):
        cycle()
    torch.cuda.synchronize()
    gc.collect()
    free1, _ = torch.cuda.mem_get_info()
    print(f"1000 CUDA cycles: free device memory {free0 / 2**20:.1f} -> {free1 / 2**20:.1f} MiB")
    assert torch.cuda.memory_allocated() == alloc0
    assert free0 - free1 < 8 * 2**20, (free0, free1)


def test_capacity_beyond_the_gpu_names_the_bytes():
    _, total = torch.cuda.mem_get_info()
    # 8 KV heads x 128 dims x float16 x (K + V) = 4 KiB a token and layer; 2^20 tokens a layer
    # (65536 clusters, within the CUDA backend's limits): enough layers for 4x the GPU
    tokens = 2**20
    layers = -(-4 * total // (4096 * tokens))
    kv = layers * 8 * tokens * 128 * 2 * 2  # computed here, independently of the library
    with pytest.raises(tactic.CapacityError, match=r"needs \d+ bytes") as info:
        SparseDecoder(layers, 8, 8, 128, max_tokens=tokens, device="cuda")
    msg = str(info.value)
    assert "GPU memory" in msg and f"keys and values {kv} " in msg, msg
    need = int(re.search(r"needs (\d+) bytes", msg).group(1))
    assert need > kv  # the rest: positions, centroids, selection buffers
    # nothing was left allocated by the failed construction
    SparseDecoder(1, 8, 8, 128, max_tokens=1024, device="cuda")
