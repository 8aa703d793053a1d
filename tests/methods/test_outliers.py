"""Outlier rules against their oracles: numpy (PruMerge IQR fence) and scikit-learn (RC's LOF labels).

The LOF tests check both the public ``lof_outliers`` (torch + sklearn only for provably tie-dependent rows)
and the pure-torch ``_lof_fast`` on every row it decides, so the torch path itself is what is verified.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor
from threadpoolctl import threadpool_limits

from lmms_tokprune.methods import outliers as O
from lmms_tokprune.methods.outliers import iqr_outliers, lof_fraction, lof_outliers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny oracle calls: OpenMP thread hand-offs on a shared 2-core box cost more than they
    save (sklearn's kneighbors and torch both), so run this module single-threaded and restore after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------------------------- oracles


def np_iqr(row: np.ndarray, whisker: float = 1.5) -> np.ndarray:
    """The released PruMerge code, per row."""
    attn_np = np.asarray(row, dtype=np.float32).flatten()
    q1 = np.percentile(attn_np, 25)
    q3 = np.percentile(attn_np, 75)
    iqr = q3 - q1
    upper = q3 + whisker * iqr
    return attn_np > upper


def sk_lof(row: np.ndarray, k: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab = LocalOutlierFactor(n_neighbors=k, contamination="auto").fit_predict(np.asarray(row, dtype=np.float32).reshape(-1, 1))
    return lab == -1


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


# ----------------------------------------------------------------------------------------------- IQR


def test_iqr_matches_numpy_random_rows():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 64, 576]:
        for scale in (1e-3, 1.0, 1e3):
            X = (rng.random((6, n)) * scale).astype(np.float32)
            X[:2] = rng.pareto(1.5, (2, n)).astype(np.float32)  # heavy tails
            got = iqr_outliers(t(X)).numpy()
            want = np.stack([np_iqr(r) for r in X])
            assert np.array_equal(got, want), (n, scale)


def test_iqr_fence_adjacent_values_bit_exact():
    """Scores exactly at the float32 fence and one ulp either side: only a float32 emulation gets all."""
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(400):
        n = int(rng.choice([4, 5, 6, 7, 8, 11, 12, 576]))
        row = (rng.random(n) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
        if rng.random() < 0.3:
            row = np.round(row * 4) / 4
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        up = q3 + 1.5 * (q3 - q1)
        for v in (up, np.nextafter(up, np.float32(np.inf)), np.nextafter(up, np.float32(-np.inf))):
            r2 = row.copy()
            r2[rng.integers(0, n)] = v
            assert np.array_equal(iqr_outliers(t(r2[None]))[0].numpy(), np_iqr(r2)), r2.tolist()
            checked += 1
    assert checked == 1200


def test_iqr_float32_arithmetic_regression():
    """The reference fence is float32 (numpy 2 keeps float32 through percentile and 1.5 * IQR): the score
    0.92499995 sits exactly on that fence (not an outlier) but above the float64 fence."""
    row = np.array([0.9249999523162842, 0.36, 0.57, 0.32, 0.59, 0.34, 0.39], np.float32)
    r64 = np.sort(row.astype(np.float64))
    q1, q3 = r64[1] + (r64[2] - r64[1]) * 0.5, r64[4] + (r64[5] - r64[4]) * 0.5
    assert row[0] > q3 + 1.5 * (q3 - q1)  # float64 arithmetic would flag it
    assert not np_iqr(row)[0]
    assert np.array_equal(iqr_outliers(t(row[None]))[0].numpy(), np_iqr(row))


def test_iqr_ties_constant_rows_small_n():
    assert not iqr_outliers(torch.full((3, 7), 0.25)).any()  # IQR = 0, strict > : nothing
    row = np.array([1, 1, 1, 1, 1, 1, 1.0000001, 5], np.float32)  # IQR 0: anything above Q3 is out
    assert np.array_equal(iqr_outliers(t(row[None]))[0].numpy(), np_iqr(row))
    for n in (1, 2, 3, 4):
        for row in ([0.5] * n, list(range(n)), list(range(n))[::-1], [0.0] * (n - 1) + [9.0]):
            r = np.array(row, np.float32)
            assert np.array_equal(iqr_outliers(t(r[None]))[0].numpy(), np_iqr(r)), row
    row = np.array([0.0, 0.0, 0.0, 1.0, 2.5, 2.5000002], np.float32)
    for w in (0.5, 1.5, 3.0):
        assert np.array_equal(iqr_outliers(t(row[None]), whisker=w)[0].numpy(), np_iqr(row, w))


def test_iqr_per_row_and_dtype():
    X = np.array([[0, 0, 0, 0, 10], [5, 5, 5, 5, 5]], np.float32)
    got = iqr_outliers(torch.tensor(X, dtype=torch.float64))
    assert got.dtype == torch.bool and got.shape == (2, 5)
    assert got.tolist() == [[False, False, False, False, True], [False] * 5]


# ----------------------------------------------------------------------------------------------- LOF helpers


def test_numpy_float32_mean_emulation():
    """lrd / LOF are float32 np.mean: pairwise summation, float64 division by the count."""
    rng = np.random.default_rng(2)
    for n in list(range(1, 140)) + [200, 256, 575, 1000]:
        A = (rng.random((4, n)) * rng.choice([1e-3, 1.0, 1e4], (4, n))).astype(np.float32)
        assert np.array_equal(O._np_mean_f32(torch.from_numpy(A)).numpy(), A.mean(axis=1)), n


def _sk_tie_free(lof: LocalOutlierFactor, row: np.ndarray) -> bool:
    """From sklearn's own neighbour lists: no point has two distinct values at one distance <= its k-distance."""
    d, ind = lof.kneighbors(n_neighbors=len(row) - 1)
    vals = row[ind]
    relevant = d[:, 1:] <= d[:, lof.n_neighbors_ - 1 : lof.n_neighbors_]
    return not ((d[:, 1:] == d[:, :-1]) & (vals[:, 1:] != vals[:, :-1]) & relevant).any()


def test_lof_scores_bit_exact_both_regimes():
    """-negative_outlier_factor_ itself, bit for bit, on tie-free rows: KDTree (k < N // 2, exact |x - y|)
    and brute force (k >= N // 2: float64 x^2 - 2xy + y^2 ranking, sqrt of its float32 rounding)."""
    rng = np.random.default_rng(10)
    gens = {
        "uniform": lambda n: rng.random(n),
        "lognormal": lambda n: rng.lognormal(0, 4, n),
        "softmax": lambda n: _rows(rng, "softmax", n),
        "offset": lambda n: 7 + rng.random(n) * 3,
    }
    checked = {True: 0, False: 0}
    skipped = 0
    for name, gen in gens.items():
        for n, ks in (
            (3, (1, 2, 5)),
            (5, (1, 2, 5)),
            (10, (1, 2, 5, 10)),
            (21, (2, 5, 10, 20)),
            (41, (5, 20, 50)),
            (42, (5, 20, 21)),
            (100, (1, 10, 20, 50, 600)),
            (576, (10, 20)),
        ):
            for k in ks:
                X = np.stack([gen(n) for _ in range(2)]).astype(np.float32)
                brute = k >= n // 2
                got = O._lof_scores_canonical(torch.from_numpy(X), k).numpy()
                for r in range(len(X)):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        lof = LocalOutlierFactor(n_neighbors=k).fit(X[r].reshape(-1, 1))
                    assert lof._fit_method == ("brute" if brute else "kd_tree")
                    if not _sk_tie_free(lof, X[r]):
                        skipped += 1
                        continue
                    want = -lof.negative_outlier_factor_
                    assert np.array_equal(got[r], want), (name, n, k, np.nonzero(got[r] != want))
                    checked[brute] += 1
    assert min(checked.values()) > 100 and skipped < 0.2 * sum(checked.values()), (checked, skipped)


def test_sqrt_f32_correctly_rounded():
    """torch's vectorised sqrt is not correctly rounded; brute-force distances need the rounded one."""
    rng = np.random.default_rng(11)
    y = (rng.random(200_000) * rng.choice([1e-20, 1e-3, 1.0, 1e6], 200_000)).astype(np.float32)
    assert np.array_equal(O._sqrt_f32(torch.from_numpy(y)).numpy(), np.sqrt(y))


def _rows(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Score generators: realistic ones and tie-heavy ones."""
    if kind == "softmax":  # CLS-attention-like
        z = rng.standard_normal(n) * 5
        e = np.exp(z - z.max())
        return (e / e.sum()).astype(np.float32)
    if kind == "softmax_wide":  # values spanning > 2^28: float64 distances round, distinct values tie
        z = rng.standard_normal(n) * 25
        e = np.exp(z - z.max())
        return (e / e.sum()).astype(np.float32)
    if kind == "powerlaw":
        return rng.pareto(rng.uniform(0.5, 3.0), n).astype(np.float32)
    if kind == "lognormal":
        return rng.lognormal(0, 2.5, n).astype(np.float32)
    if kind == "text_minset":  # RC step 3: entries of V set to min(s)
        s = (rng.standard_normal(n) * 0.02 / np.sqrt(768)).astype(np.float32)
        s[rng.random(n) < rng.uniform(0.05, 0.95)] = s.min()
        return s
    if kind == "levels_rand":  # few random levels: many duplicates, no exact symmetric ties
        lv = (rng.random(int(rng.integers(1, 7))) * rng.choice([1e-3, 1.0, 100.0])).astype(np.float32)
        return lv[rng.integers(0, len(lv), n)]
    if kind == "levels_grid":  # equally spaced levels: x - d and x + d tie everywhere
        return (rng.integers(0, int(rng.integers(1, 6)), n) * rng.choice([1.0, 0.5, 0.1, 3.0])).astype(np.float32)
    if kind == "int_grid":  # distinct-ish values on an exact grid: x - d and x + d both kept, everywhere
        return (rng.integers(0, 4 * n, n) * 2.0**-10).astype(np.float32)
    if kind == "dup_blocks":  # continuous scores with several duplicate groups, some larger than k
        x = rng.random(n).astype(np.float32)
        for _ in range(int(rng.integers(1, 5))):
            x[rng.random(n) < rng.uniform(0, 0.5)] = x[rng.integers(0, n)]
        return x
    if kind == "constant":
        return np.full(n, np.float32(rng.random()), np.float32)
    raise KeyError(kind)


def _check_batch(X: np.ndarray, k: int, stats: dict, kind: str) -> None:
    """Torch path on every row it decides, public function (sklearn fallback) on the rest."""
    fast, undecided = O._lof_fast(torch.from_numpy(X), k)
    und = np.nonzero(undecided.numpy())[0]
    full = lof_outliers(torch.from_numpy(X[und]), k).numpy() if len(und) else None
    for r in range(len(X)):
        want = sk_lof(X[r], k)
        if undecided[r]:
            stats[kind] = stats.get(kind, 0) + 1
            assert np.array_equal(full[list(und).index(r)], want), (kind, X.shape[1], k, X[r].tolist())
        else:
            assert np.array_equal(fast[r].numpy(), want), ("torch path", kind, X.shape[1], k, X[r].tolist())
    if not len(und):  # the public entry point is the torch path here
        assert torch.equal(lof_outliers(torch.from_numpy(X), k), fast)


# ----------------------------------------------------------------------------------------------- LOF


def test_lof_realistic_scores_torch_path_only():
    """Attention-like and text-similarity-like rows: identical labels, and the torch path decides them all."""
    rng = np.random.default_rng(3)
    for kind in ("softmax", "softmax_wide", "powerlaw", "lognormal", "text_minset", "dup_blocks"):
        for k in (20, 10):
            X = np.stack([_rows(rng, kind, 576) for _ in range(6)])
            stats: dict = {}
            _check_batch(X, k, stats, kind)
            assert not stats, stats  # no sklearn fallback on realistic data
    # the secondary-recovery call: k=10 on the remaining patches (a_R)
    X = np.stack([_rows(rng, "softmax", 576)[rng.random(576) < 0.8][:400] for _ in range(4)])
    _check_batch(X, 10, {}, "a_R")


def test_lof_fuzz_tie_heavy_against_sklearn():
    """Seeded fuzz over tie-heavy rows, N in 2..40 and 576, k in {1, 2, 5, 10, 20}."""
    rng = np.random.default_rng(4)
    kinds = ["levels_rand", "levels_grid", "dup_blocks", "text_minset", "constant", "softmax", "lognormal", "levels_grid"]
    stats: dict = {}
    rows = 0
    for n in range(2, 41):
        for k in (1, 2, 5, 10, 20):
            X = np.stack([_rows(rng, kinds[i % len(kinds)], n) for i in range(16)])
            _check_batch(X, k, stats, f"n{n}")
            rows += len(X)
    for k in (1, 2, 5, 10, 20):
        for kind in ("levels_rand", "levels_grid", "dup_blocks", "text_minset", "softmax_wide"):
            X = np.stack([_rows(rng, kind, 576) for _ in range(8)])
            _check_batch(X, k, stats, kind)
            rows += len(X)
    assert rows == 39 * 5 * 16 + 5 * 5 * 8
    # sklearn is consulted only where its own tie order decides; that is rare even on equally spaced grids
    assert sum(stats.values()) < 0.05 * rows, stats


def test_lof_decided_tie_rows_do_not_depend_on_sklearn_tie_order():
    """Rows with exact ties the torch path decides: sklearn gives the same labels for any input order."""
    rng = np.random.default_rng(5)
    checked = 0
    for n in (7, 12, 25, 40, 100):
        for k in (1, 2, 5, 10):
            X = np.stack([_rows(rng, "levels_grid", n) for _ in range(8)])
            fast, undecided = O._lof_fast(torch.from_numpy(X), k)
            for r in np.nonzero(~undecided.numpy())[0]:
                p = rng.permutation(n)
                lab = np.empty(n, bool)
                lab[p] = sk_lof(X[r][p], k)
                assert np.array_equal(fast[r].numpy(), lab), (n, k, X[r].tolist())
                checked += 1
    assert checked > 100


def test_lof_symmetric_ties_on_a_float_grid():
    """576 scores on a 2^-18 / 2^-16 grid: x - d and x + d both present all over.  Ties whose points are all
    kept only reorder float32 sums (certified in the window path); boundary ties go to the general path;
    every label matches sklearn, also after shuffling the input (so none hinges on sklearn's tie order)."""
    rng = np.random.default_rng(13)
    kept_tie_rows = 0
    for bits, k in ((18, 20), (16, 10)):
        X = (np.round(rng.random((8, 576)) * 2.0**bits) / 2.0**bits).astype(np.float32)
        _, redo = O._lof_window(torch.sort(torch.from_numpy(X), dim=1).values, k)
        fast, undecided = O._lof_fast(torch.from_numpy(X), k)
        for r in range(len(X)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lof = LocalOutlierFactor(n_neighbors=k).fit(X[r].reshape(-1, 1))
            want = lof.negative_outlier_factor_ < lof.offset_
            assert np.array_equal(lof_outliers(t(X[r][None]), k)[0].numpy(), want)
            if not undecided[r]:
                assert np.array_equal(fast[r].numpy(), want)
                if r < 2:
                    p = rng.permutation(576)
                    lab = np.empty(576, bool)
                    lab[p] = sk_lof(X[r][p], k)
                    assert np.array_equal(fast[r].numpy(), lab)
            kept_tie_rows += int(not redo[r] and not _sk_tie_free(lof, X[r]))
    assert kept_tie_rows >= 1


def test_lof_exact_integer_grid_rows():
    """Pathological: every value on a coarse exact grid (boundary ties everywhere).  Still identical labels;
    the sklearn fallback is used only where the tie order provably matters."""
    rng = np.random.default_rng(14)
    for n in (40, 100, 576):
        for k in (5, 10, 20):
            X = np.stack([_rows(rng, "int_grid", n) for _ in range(3)])
            _check_batch(X, k, {}, "int_grid")


def test_lof_tie_dependent_rows_are_real():
    """x = 2 has neighbours 1 and 3 at equal distance; with k = 1 sklearn keeps whichever its KDTree meets
    first, and the labels change with the input order.  The torch path refuses to guess; the public
    function then matches sklearn for every order."""
    row = np.array([3, 0, 3, 2, 1, 3], np.float32)
    _, undecided = O._lof_fast(t(row[None]), 1)
    assert bool(undecided[0])
    rng = np.random.default_rng(6)
    labelings = set()
    for _ in range(40):
        p = rng.permutation(len(row))
        want = sk_lof(row[p], 1)
        assert np.array_equal(lof_outliers(t(row[p][None]), 1)[0].numpy(), want)
        lab = np.empty(len(row), bool)
        lab[p] = want
        labelings.add(tuple(lab))
    assert len(labelings) > 1  # sklearn's answer depends on the input order


def test_lof_constant_rows_duplicates_and_small_n():
    for n in (2, 3, 5, 40, 576):
        x = torch.full((2, n), 0.125)
        assert not lof_outliers(x, 20).any()  # all distances 0 -> lrd = 1/(0 + 1e-10) everywhere, LOF 1
        assert np.array_equal(lof_outliers(x, 20)[0].numpy(), sk_lof(x[0].numpy(), 20))
    # a duplicate block larger than k next to spread-out values: lrd 1e10 makes neighbours huge outliers
    row = np.concatenate([np.full(30, 0.5), np.linspace(0.0, 1.0, 17)]).astype(np.float32)
    for k in (5, 10, 20):
        got = lof_outliers(t(row[None]), k)[0].numpy()
        assert np.array_equal(got, sk_lof(row, k)) and got.any()
    for n in (2, 3, 4):
        for row in ([0.0] * n, list(range(n)), [0.0] * (n - 1) + [100.0], [1.0, 2.0, 4.0, 8.0][:n]):
            for k in (1, 2, 3, 5, 20):
                r = np.array(row, np.float32)
                assert np.array_equal(lof_outliers(t(r[None]), k)[0].numpy(), sk_lof(r, k)), (row, k)
    assert lof_outliers(torch.tensor([[0.3], [7.0]]), 20).tolist() == [[False], [False]]  # sklearn cannot fit N=1


def test_lof_n_neighbors_clamped_and_brute_regime():
    """k >= N is clamped to N - 1; k >= N // 2 switches sklearn to brute force (inexact squared distances)."""
    rng = np.random.default_rng(7)
    for n, ks in ((10, (5, 9, 10, 50)), (41, (20, 40, 41)), (42, (20, 21)), (120, (60, 100, 500))):
        for k in ks:
            for kind in ("softmax", "dup_blocks", "levels_rand", "lognormal"):
                X = np.stack([_rows(rng, kind, n) for _ in range(3)])
                _check_batch(X, k, {}, kind)


def test_lof_fraction_float64():
    rng = np.random.default_rng(8)
    X = torch.from_numpy(np.stack([_rows(rng, "softmax", 576) for _ in range(4)]))
    frac = lof_fraction(X, 20)
    assert frac.dtype == torch.float64 and frac.shape == (4,)
    for r in range(4):
        want = np.mean(sk_lof(X[r].numpy(), 20))  # what RC computes
        assert float(frac[r]) == want
        assert int(576 * float(frac[r])) == int(sk_lof(X[r].numpy(), 20).sum())
    # the count survives int(576 * fraction) for every count; a float32 mean loses e.g. 59
    lab = torch.arange(576)[None, :] < torch.arange(577)[:, None]
    f64 = lab.sum(1, dtype=torch.float64) / 576
    assert all(int(576 * float(f)) == c for c, f in enumerate(f64))
    assert int(576 * float(lab[59].float().mean())) == 58


def test_lof_device_dtype_and_shape():
    x = torch.from_numpy(np.stack([_rows(np.random.default_rng(9), "softmax", 100) for _ in range(2)]))
    ref = lof_outliers(x, 10)
    assert ref.dtype == torch.bool and ref.shape == x.shape and ref.device == x.device
    assert torch.equal(lof_outliers(x.double(), 10), ref)  # taken as float32 (exactly representable here)
    assert lof_outliers(x.to(torch.bfloat16), 10).dtype == torch.bool
    if torch.cuda.is_available():
        assert torch.equal(lof_outliers(x.cuda(), 10).cpu(), ref)
        assert torch.equal(iqr_outliers(x.cuda()).cpu(), iqr_outliers(x))


def test_validation_errors():
    for fn in (iqr_outliers, lof_outliers, lof_fraction):
        with pytest.raises(ValueError, match="B, N"):
            fn(torch.rand(5))
        with pytest.raises(ValueError, match="B, N"):
            fn(torch.rand(2, 3, 4))
        with pytest.raises(ValueError, match="B, N"):
            fn(torch.rand(2, 0))
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(torch.tensor([[0.1, float("nan"), 0.2]]))
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(torch.tensor([[0.1, float("inf"), 0.2]]))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_neighbors"):
            lof_outliers(torch.rand(1, 10), bad)
