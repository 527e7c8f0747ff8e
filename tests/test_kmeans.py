"""k-means: determinism, monotone inertia, degenerate inputs; checked with NumPy."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tactic


def np_inertia(x, c, a, spherical=False):
    x = x.astype(np.float64)
    if spherical:
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
        return float((1 - (xn * c[a]).sum(axis=1)).sum())
    return float(((x - c[a]) ** 2).sum())


def test_deterministic_per_seed():
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    r1 = tactic.ops.kmeans(x, 100, seed=7)
    r2 = tactic.ops.kmeans(x, 100, seed=7)
    r3 = tactic.ops.kmeans(x, 100, seed=8)
    np.testing.assert_array_equal(r1.assign, r2.assign)
    np.testing.assert_array_equal(r1.centroids, r2.centroids)
    assert not np.array_equal(r1.assign, r3.assign)


@pytest.mark.parametrize("metric", ["euclidean", "spherical"])
def test_result_is_consistent_with_numpy(metric):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3000, 32)) + rng.integers(0, 4, (3000, 1))).astype(np.float32)
    r = tactic.ops.kmeans(x, 40, metric=metric, max_iters=10)
    c, a = np.asarray(r.centroids, np.float64), np.asarray(r.assign)
    assert c.shape == (40, 32) and a.shape == (3000,) and a.min() >= 0 and a.max() < 40
    assert np.isfinite(c).all()
    # final inertia matches an independent recomputation
    assert np.isclose(r.inertia[-1], np_inertia(x, c, a, metric == "spherical"), rtol=1e-5)
    # centroids are the (normalised, for spherical) means of their members
    for j in np.unique(a):
        mean = x[a == j].astype(np.float64)
        if metric == "spherical":
            mean = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        mean = mean.mean(axis=0)
        if metric == "spherical":
            mean /= np.linalg.norm(mean)
        np.testing.assert_allclose(c[j], mean, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 400), d=st.integers(1, 40), c=st.integers(1, 60), seed=st.integers(0, 2**32),
       metric=st.sampled_from(["euclidean", "spherical"]), dup=st.booleans())
def test_inertia_never_increases(n, d, c, seed, metric, dup):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if dup:  # many exact duplicates provoke empty clusters
        x = x[rng.integers(0, max(1, n // 10), n)]
    r = tactic.ops.kmeans(x, c, metric=metric, seed=seed % 1000, max_iters=10)
    inertia = np.array(r.inertia)
    # allowed slack: float32 rounding of centroids (~1e-6 per point), never a real increase
    assert (np.diff(inertia) <= 1e-6 * np.abs(inertia[:-1]) + 1e-6 * n).all(), inertia
    assert np.isfinite(np.asarray(r.centroids)).all()
    assert np.asarray(r.centroids).shape[0] == min(c, n)


def test_fewer_points_than_clusters():
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    r = tactic.ops.kmeans(x, 100)
    assert np.asarray(r.centroids).shape == (5, 16)
    assert sorted(r.assign.tolist()) == [0, 1, 2, 3, 4]  # every point its own cluster
    assert r.inertia[-1] == pytest.approx(0.0, abs=1e-9)


def test_all_duplicates_and_empty_clusters():
    x = np.ones((50, 8), np.float32)
    x[-1] = 5.0
    r = tactic.ops.kmeans(x, 6, max_iters=10)
    c = np.asarray(r.centroids)
    assert np.isfinite(c).all()
    counts = np.bincount(r.assign, minlength=6)
    assert counts.sum() == 50 and (counts == 0).any()  # empty clusters exist and are finite
    assert r.inertia[-1] == pytest.approx(0.0, abs=1e-6)


def test_kmeans_torch_input_returns_torch():
    torch = pytest.importorskip("torch")
    x = torch.randn(300, 16, dtype=torch.float16)
    r = tactic.ops.kmeans(x, 10)
    assert isinstance(r.centroids, torch.Tensor) and r.centroids.dtype == torch.float32
    assert isinstance(r.assign, torch.Tensor) and r.assign.dtype == torch.int32


def test_cluster_count_default_from_cluster_size():
    x = np.random.default_rng(3).standard_normal((161, 8)).astype(np.float32)
    assert np.asarray(tactic.ops.kmeans(x).centroids).shape[0] == 11  # ceil(161 / 16)
