"""VectorIndex against a brute-force numpy oracle, through appends, updates and removals."""

from __future__ import annotations

import numpy as np
import pytest
from ms_oracle import recall, topk_ip, topk_l2

from memory_store.index import VectorIndex


class Table:
    """The table a VectorIndex mirrors: a growing float32 matrix."""

    def __init__(
        self,
        dim: int,
        metric: str,
        exact_max: int,
        fp16: bool = False,
        approx: str = "hnsw",
        nprobe: int = 32,
    ):
        self.x = np.zeros((0, dim), dtype=np.float32)
        self.index = VectorIndex(
            dim,
            metric,  # type: ignore[arg-type]
            exact_max,
            lambda: self.x,
            hnsw_m=16,
            fp16=fp16,
            approx=approx,  # type: ignore[arg-type]
            nprobe=nprobe,
        )

    def append(self, v: np.ndarray) -> None:
        self.x = np.concatenate([self.x, v])
        self.index.append(v)

    def update(self, rows: np.ndarray, v: np.ndarray) -> None:
        self.x[rows] = v
        self.index.update(rows, v)

    def remove(self, keep: np.ndarray) -> None:
        self.x = self.x[keep]
        self.index.remove(keep)


def _churn(t: Table, rng: np.random.Generator, rounds: int, dim: int) -> None:
    for _ in range(rounds):
        t.append(rng.standard_normal((int(rng.integers(1, 40)), dim)).astype(np.float32))
        if len(t.x) > 5:
            rows = rng.choice(len(t.x), 3, replace=False)
            t.update(rows, rng.standard_normal((3, dim)).astype(np.float32))
            t.remove(rng.random(len(t.x)) > 0.1)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    t = Table(16, metric, exact_max=10_000)
    oracle = topk_ip if metric == "ip" else topk_l2
    for _ in range(6):
        _churn(t, rng, 3, 16)
        q = rng.standard_normal((25, 16)).astype(np.float32)
        dist, rows = t.index.search(q, 8)
        true_rows, true_dist = oracle(q, t.x, 8)
        assert t.index.kind == "flat"
        np.testing.assert_array_equal(rows, true_rows)
        np.testing.assert_allclose(dist, true_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_fp16_matches_brute_force(metric):
    """The float16 exact kind, over float16 vectors: the same answers, through the same churn."""
    rng = np.random.default_rng(3)
    t = Table(16, metric, exact_max=10_000, fp16=True)
    oracle = topk_ip if metric == "ip" else topk_l2

    def f16(shape: tuple[int, int]) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16).astype(np.float32)

    def check() -> None:
        q = rng.standard_normal((25, 16)).astype(np.float32)
        dist, rows = t.index.search(q, 8)
        true_rows, true_dist = oracle(q, t.x, 8)
        assert t.index.kind == "flat"
        np.testing.assert_array_equal(rows, true_rows)
        np.testing.assert_allclose(dist, true_dist, rtol=1e-4, atol=1e-4)

    for _ in range(8):
        t.append(f16((int(rng.integers(1, 40)), 16)))  # into the built index
        check()
        rows = rng.choice(len(t.x), 3, replace=False)
        t.update(rows, f16((3, 16)))  # in place, in the float16 codes
        check()
        t.remove(rng.random(len(t.x)) > 0.1)  # dropped, rebuilt at the next search
        check()
    assert t.index.nbytes() == len(t.x) * 16 * 2


def test_missing_neighbours_are_minus_one():
    t = Table(4, "ip", exact_max=100)
    q = np.ones((2, 4), dtype=np.float32)
    _, rows = t.index.search(q, 3)
    assert (rows == -1).all()
    t.append(np.eye(4, dtype=np.float32)[:2])
    _, rows = t.index.search(q, 3)
    assert sorted(rows[0, :2].tolist()) == [0, 1] and (rows[:, 2] == -1).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_hnsw_recall_with_tombstones(metric):
    """HNSW (the other approximate kind): updates and removals leave tombstones."""
    rng = np.random.default_rng(1)
    dim = 16
    t = Table(dim, metric, exact_max=60)
    t.append(rng.standard_normal((400, dim)).astype(np.float32))
    oracle = topk_ip if metric == "ip" else topk_l2
    q = rng.standard_normal((50, dim)).astype(np.float32)
    _, rows = t.index.search(q, 10)
    assert t.index.kind == "hnsw"
    assert recall(rows, oracle(q, t.x, 10)[0]) >= 0.9
    # updates re-add under new labels, removals leave tombstones: still right rows, good recall
    t.update(np.arange(0, 400, 7), rng.standard_normal((58, dim)).astype(np.float32))
    keep = np.ones(len(t.x), dtype=bool)
    keep[rng.choice(len(t.x), 60, replace=False)] = False
    t.remove(keep)
    dist, rows = t.index.search(q, 10)
    true_rows, _ = oracle(q, t.x, 10)
    assert recall(rows, true_rows) >= 0.9
    assert rows.max() < len(t.x)
    # a returned row's distance is that row's true distance (labels map back to the right rows)
    r = rows[rows >= 0]
    qq = np.repeat(q, 10, axis=0)[(rows >= 0).ravel()]
    want = (qq * t.x[r]).sum(1) if metric == "ip" else ((qq - t.x[r]) ** 2).sum(1)
    np.testing.assert_allclose(dist[rows >= 0], want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("approx", ["hnsw", "ivf"])
def test_switches_back_to_flat_below_exact_max(approx):
    rng = np.random.default_rng(2)
    t = Table(8, "ip", exact_max=50, approx=approx)
    t.append(rng.standard_normal((80, 8)).astype(np.float32))
    t.index.search(np.ones((1, 8), np.float32), 4)
    assert t.index.kind == approx
    keep = np.zeros(80, dtype=bool)
    keep[:40] = True
    t.remove(keep)
    q = rng.standard_normal((10, 8)).astype(np.float32)
    _, rows = t.index.search(q, 5)
    assert t.index.kind == "flat"
    np.testing.assert_array_equal(rows, topk_ip(q, t.x, 5)[0])


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivf_scanning_every_list_is_exact_through_churn(metric, fp16):
    """With nprobe >= lists the IVF answers equal brute force: labels map back to the right rows
    through appends, updates (re-added under new labels), removals and retraining."""
    rng = np.random.default_rng(4)
    dim = 16
    t = Table(dim, metric, exact_max=60, approx="ivf", nprobe=10_000, fp16=fp16)
    oracle = topk_ip if metric == "ip" else topk_l2

    def vectors(n: int) -> np.ndarray:  # float16-exact when the index keeps float16 codes
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return x.astype(np.float16).astype(np.float32) if fp16 else x

    t.append(vectors(100))
    trained = []
    for _ in range(12):
        for _ in range(4):  # as _churn, with float16-exact vectors
            t.append(vectors(int(rng.integers(1, 40))))
            rows = rng.choice(len(t.x), 3, replace=False)
            t.update(rows, vectors(3))
            t.remove(rng.random(len(t.x)) > 0.1)
        t.append(vectors(60))
        q = rng.standard_normal((30, dim)).astype(np.float32)
        dist, rows = t.index.search(q, 8)
        assert t.index.kind == "ivf"
        trained.append(t.index._trained_n)
        true_rows, true_dist = oracle(q, t.x, 8)
        np.testing.assert_allclose(dist, true_dist, rtol=1e-4, atol=1e-3)
        assert recall(rows, true_rows) == 1.0
    assert len(set(trained)) > 1  # the lists were trained again as the table grew


def test_ivf_recall_on_clustered_keys():
    """Few lists scanned out of many: most of the true top-k on clustered data (as attention keys
    are), where HNSW's inner-product search is known to do badly."""
    rng = np.random.default_rng(5)
    dim, n = 32, 6000
    centers = rng.standard_normal((40, dim)).astype(np.float32) * 3
    x = centers[rng.integers(0, 40, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    t = Table(dim, "ip", exact_max=1000, approx="ivf", nprobe=16)
    t.append(x)
    q = centers[rng.integers(0, 40, 100)] + rng.standard_normal((100, dim)).astype(np.float32)
    _, rows = t.index.search(q, 16)
    assert t.index.kind == "ivf"
    lists = t.index._index.nlist
    assert lists > 16  # the search is approximate: not every list is scanned
    assert recall(rows, topk_ip(q, t.x, 16)[0]) >= 0.8
    assert t.index.nbytes() >= n * dim * 4
