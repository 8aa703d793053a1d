"""Outlier rules on per-token scores, batched in torch.

iqr_outliers: PruMerge's upper fence, bit-exact with the released numpy code (float32 percentiles).
lof_outliers / lof_fraction: Recoverable Compression's
``LocalOutlierFactor(n_neighbors, contamination='auto').fit_predict(row.reshape(-1, 1)) == -1``.

How the LOF emulation stays identical to scikit-learn (>= 1.5; read from sklearn/neighbors/_lof.py, _base.py,
_binary_tree.pxi.tp, metrics/_pairwise_distances_reduction/_argkmin.pyx.tp):

* n_neighbors_ = max(1, min(n_neighbors, N - 1)); 'auto' picks brute force when the *requested*
  n_neighbors >= N // 2, else a KDTree.  KDTree distances are |x - y| in float64 (exact kNN search);
  brute force ranks by the float64 surrogate (x*x + (-2*x*y)) + y*y (clipped at 0) and reports its sqrt.
  Both are reproduced exactly, including that brute force takes the sqrt of the float32-rounded surrogate
  (EuclideanDistance32._rdist_to_dist has a float32 argument); LOF then casts distances to float32.
* lrd, ratios and means are float32 numpy ops: a mean is numpy's float32 pairwise sum, divided by k in
  float64 and rounded to float32; ``+ 1e-10`` and ``1 / .`` are float32.  All reproduced op for op.
* Ties.  Self-exclusion in ``kneighbors`` (drop self, or the first of > k+1 zero-distance duplicates) always
  leaves the k smallest distances to *other* points, and copies of a value share k-distance and lrd, so
  the result depends only on the multiset of neighbour *values* and their order.  That multiset is fixed
  unless the k-distance T is shared by distinct values that do not all fit (in 1-D: x - T and x + T, "set
  ambiguity"); the order matters only between equidistant neighbours of distinct values ("order
  ambiguity", a few float32 ulps).  Which tied point sklearn keeps depends on the KDTree layout
  (std::nth_element) and heap internals, so nothing is guessed:
  - no ambiguity (the common case, incl. duplicate blocks and constant rows): bit-exact emulation;
  - order ambiguity only: the label is certain unless LOF is within a rigorous rounding margin of 1.5;
  - otherwise ``_lof_general`` bounds every LOF value sklearn could produce (each tie choice enumerated,
    every summation order, float32 rounding slack) and usually settles the label;
  - a row still unsettled (a tie choice really flips a label) is handed to scikit-learn itself.
  Real-valued scores essentially never reach sklearn; ``_lof_fast`` reports the rows that would.
* Hot path: sort each row; a two-pointer merge (k vectorised steps) yields the k nearest neighbours in
  kneighbors order (they are a window around the point in sorted order); everything else is gathers.
"""

from __future__ import annotations

import numbers
import warnings

import torch

_U32 = 2.0**-24  # float32 unit roundoff


def _check_scores(name: str, scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] < 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{name}: scores must be a [B, N] tensor with N >= 1, got {shape}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"{name}: scores must be real numbers, got {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name}: scores contain NaN or inf")


def _check_k(name: str, n_neighbors: int) -> int:
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, numbers.Integral):
        raise ValueError(f"{name}: n_neighbors must be an int, got {n_neighbors!r}")  # noqa: TRY004 one error type
    k = int(n_neighbors)
    if k < 1:
        raise ValueError(f"{name}: n_neighbors must be >= 1, got {k}")
    return k


# ----------------------------------------------------------------------------------------------------- IQR


def _np_percentile_f32(xs: torch.Tensor, q: int) -> torch.Tensor:
    """numpy-2 ``np.percentile(a_float32, q)`` ('linear') on pre-sorted float32 rows.

    q is a Python int, so numpy uses weak promotion: the float64 gamma becomes a Python float and
    ``_lerp`` runs in float32: ``a + (b-a)*f32(g)`` for g < 0.5 else ``b - (b-a)*f32(1-g)``.
    """
    n = xs.shape[1]
    virtual = (n - 1) * (q / 100)  # numpy: (n - 1) * true_divide(q, 100), float64
    if virtual >= n - 1:  # only n == 1: numpy takes index -1 for both and gamma = virtual - (-1)
        prev = nxt = n - 1
        gamma = virtual + 1.0
    else:
        prev = int(virtual // 1)
        nxt = prev + 1
        gamma = virtual - prev
    a, b = xs[:, prev], xs[:, nxt]
    diff = b - a
    if gamma >= 0.5:
        return b - diff * torch.tensor(1.0 - gamma, dtype=torch.float32, device=xs.device)
    return a + diff * torch.tensor(gamma, dtype=torch.float32, device=xs.device)


def quartiles(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float32 Q1, Q3, bit-exact with ``np.percentile(row.astype(float32), 25 / 75)``."""
    xs = torch.sort(scores.to(torch.float32), dim=1).values
    return _np_percentile_f32(xs, 25), _np_percentile_f32(xs, 75)


def _np_percentile_f32_counts(xs: torch.Tensor, counts: torch.Tensor, q: int) -> torch.Tensor:
    """`_np_percentile_f32` of each row's first counts[b] sorted values (a row of its own length): the same float64
    index arithmetic and float32 lerp, elementwise per row, so a full row gives the same bits."""
    virtual = (counts.to(torch.float64) - 1) * (q / 100)
    prev = torch.floor(virtual).long()
    lone = counts == 1  # numpy: index -1 for both ends, gamma = virtual + 1
    prev = torch.where(lone, 0, prev)
    nxt = torch.where(lone, 0, prev + 1)
    gamma = torch.where(lone, virtual + 1.0, virtual - prev.to(torch.float64))
    a = xs.gather(1, prev[:, None])[:, 0]
    b = xs.gather(1, nxt.clamp(max=xs.shape[1] - 1)[:, None])[:, 0]
    diff = b - a
    high = b - diff * (1.0 - gamma).to(torch.float32)
    low = a + diff * gamma.to(torch.float32)
    return torch.where(gamma >= 0.5, high, low)


def iqr_outliers(scores: torch.Tensor, whisker: float = 1.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] -> bool [B, N]: x > Q3 + whisker * (Q3 - Q1) per row, strict, all in float32.

    Reproduces PruMerge's ``attn_np = attn.float().numpy(); Q1, Q3 = np.percentile(attn_np, 25/75);
    upper = Q3 + 1.5 * (Q3 - Q1); attn_np > upper`` bit for bit (numpy 2 keeps float32 throughout), so a
    score sitting exactly on, or one ulp off, the fence gets the reference's label.

    mask [B, N] bool (valid patches, >= 1 per row): each row's fence from its masked entries only, exactly as
    numpy on that subset; entries outside the mask are never outliers.
    """
    _check_scores("iqr_outliers", scores)
    x = scores.to(torch.float32)
    if mask is None:
        q1, q3 = quartiles(x)
    else:
        xs = torch.sort(x.masked_fill(~mask, float("inf")), dim=1).values  # the row's own values first, ascending
        counts = mask.sum(dim=1)
        q1, q3 = _np_percentile_f32_counts(xs, counts, 25), _np_percentile_f32_counts(xs, counts, 75)
    w = torch.tensor(float(whisker), dtype=torch.float32, device=x.device)
    fence = q3 + w * (q3 - q1)
    return x > fence[:, None] if mask is None else (x > fence[:, None]) & mask


# ----------------------------------------------------------------------------------------------------- LOF


def _np_pairwise_sum_f32(x: torch.Tensor) -> torch.Tensor:
    """numpy's float32 ``add.reduce`` along the last dim (pairwise: 8 accumulators per <=128 block).

    The summation order decides the last bit of lrd / LOF, which decides labels sitting on -1.5.
    """
    n = x.shape[-1]
    if n < 8:
        res = x[..., 0]
        for i in range(1, n):
            res = res + x[..., i]
        return res
    if n <= 128:
        r = x[..., 0:8]
        i = 8
        stop = n - (n % 8)
        while i < stop:
            r = r + x[..., i : i + 8]
            i += 8
        res = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))
        while i < n:
            res = res + x[..., i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _np_pairwise_sum_f32(x[..., :n2]) + _np_pairwise_sum_f32(x[..., n2:])


def _np_mean_f32(x: torch.Tensor) -> torch.Tensor:
    """``np.mean(float32, axis=-1)``: float32 pairwise sum, divided by the count in float64, rounded to float32."""
    return (_np_pairwise_sum_f32(x).to(torch.float64) / x.shape[-1]).to(torch.float32)


def _gather_rows(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v [B, N], idx [B, N, m] (positions in the same row) -> v[b, idx[b, i, j]]."""
    return torch.gather(v, 1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)


def _lof_values(nbr: torch.Tensor, d64: torch.Tensor, kd32: torch.Tensor):
    """sklearn's float32 LOF arithmetic for neighbour lists already in kneighbors order.

    nbr/d64 [B, N, k]: neighbour positions and float64 distances sorted ascending; kd32 [B, N]: k-distance.
    Returns (reach [B,N,k] f32, lrd [B,N] f32, lrd of neighbours [B,N,k], mean lrd ratio [B,N] f32).
    """
    reach = torch.maximum(d64.to(torch.float32), _gather_rows(kd32, nbr))
    eps10 = torch.tensor(1e-10, dtype=torch.float32, device=kd32.device)  # numpy casts the weak 1e-10 to f32
    lrd = torch.ones((), dtype=torch.float32, device=kd32.device) / (_np_mean_f32(reach) + eps10)
    lrd_nb = _gather_rows(lrd, nbr)
    return reach, lrd, lrd_nb, _np_mean_f32(lrd_nb / lrd[:, :, None])


def _window_merge(xs: torch.Tensor, k: int):
    """Two-pointer merge of left/right sorted neighbours of every point (KDTree distances, left first on ties).

    Returns (dist float64 [B, N, k] ascending, neighbour sorted-positions [B, N, k], next unused left / right
    position in the padded row, padded float64 row).  Pads are -inf / +inf so running off an end gives
    distance inf, which is never taken before a real point.  k steps of a few [B, N] ops each.
    """
    B, N = xs.shape
    dev = xs.device
    xd = xs.to(torch.float64)
    xp = torch.cat([xd.new_full((B, k + 1), -float("inf")), xd, xd.new_full((B, k + 1), float("inf"))], 1)
    base = (torch.arange(N, device=dev) + (k + 1)).expand(B, N)
    jl, jr = base - 1, base + 1  # next unused position on each side (in xp)
    d64 = torch.empty(k, B, N, dtype=torch.float64, device=dev)  # step-major: contiguous writes
    nbr = torch.empty(k, B, N, dtype=torch.long, device=dev)
    for r in range(k):
        dl, dr = xd - xp.gather(1, jl), xp.gather(1, jr) - xd
        take = dl <= dr
        torch.where(take, dl, dr, out=d64[r])
        j = torch.where(take, jl, jr, out=nbr[r])
        jl = torch.minimum(jl, j - 1)  # moved iff the left one was taken
        jr = torch.maximum(jr, j + 1)
    return d64.permute(1, 2, 0).contiguous(), nbr.permute(1, 2, 0) - (k + 1), jl, jr, xp


def _regime(n_neighbors: int, N: int) -> tuple[int, bool]:
    """sklearn's (n_neighbors_, brute?): k clamped to [1, N - 1]; 'auto' goes brute when the *requested*
    n_neighbors >= N // 2, else KDTree (1 feature, minkowski p=2)."""
    return max(1, min(n_neighbors, N - 1)), n_neighbors >= N // 2


def _lof_scores_canonical(x: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """Float32 LOF (= -negative_outlier_factor_) for float32 rows [B, N], input order, canonical tie order.

    Same dispatch and arithmetic as the label path; bit-exact with sklearn wherever no two distinct values
    are equidistant from a point (tests compare it bit for bit).
    """
    k, brute = _regime(n_neighbors, x.shape[1])
    xs, order = torch.sort(x, dim=1, stable=True)
    if brute:
        _, dist, cand = _candidates(xs, k, "brute")
        lof = _lof_values(cand[:, :, :k], dist[:, :, :k], dist[:, :, k - 1].to(torch.float32))[3]
    else:
        d64, nbr, _, _, _ = _window_merge(xs, k)
        lof = _lof_values(nbr, d64, d64[:, :, k - 1].to(torch.float32))[3]
    return torch.empty_like(lof).scatter_(1, order, lof)


def _lof_window(xs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KDTree regime, sort-free: sorted float32 rows [B, N] -> (outlier [B, N] sorted order, redo rows [B]).

    In 1-D the k nearest others of xs[i] are a window around i; distances |x_j - x_i| (float64, what the
    tree reports) grow away from i on each side, so a two-pointer merge (k vectorised steps, left first on
    equal distance) yields the neighbours already in kneighbors order (ascending distance).
    Exactness: if no two *distinct* values are equidistant from a point up to its k-distance T, its
    neighbour value multiset and order are unique and the float32 emulation is bit-exact.  A tie whose
    points are all kept (x - d and x + d both inside the k) leaves the set fixed and only permutes float32
    sums, moving LOF by < (8k + 64) u relative, so labels farther than that from 1.5 are still certain.
    Rows with a tie at the boundary that not all tied points survive ("set ambiguity"), a float64
    rounding collision, or an order-ambiguous LOF too close to 1.5 are flagged and go to ``_lof_general``.
    """
    N = xs.shape[1]
    xd = xs.to(torch.float64)
    d64, nbr, jl, jr, xp = _window_merge(xs, k)
    T = d64[:, :, k - 1]  # k-distance: k-th smallest distance to another point
    _, _, _, lof = _lof_values(nbr, d64, T.to(torch.float32))

    vals = _gather_rows(xs, nbr)
    v_last = vals[:, :, -1]
    # Float64 |x_i - x_j| of float32 values is exact when their binades are <= 28 apart; then equal distance
    # on one side means equal value and only the x - T / x + T pair can tie.  Otherwise (|x_j| << |x_i|)
    # also look past the duplicate block of the first left-out point.
    absx = xs.abs()
    nz_min = torch.where(absx > 0, absx, torch.full_like(absx, float("inf"))).amin(1)
    collide = bool((nz_min < absx.amax(1) * 2.0**-28).any())
    if collide:
        bstart, bend = _dup_blocks(xs)
    set_amb = torch.zeros_like(T, dtype=torch.bool)
    for side, j in ((-1, jl), (1, jr)):
        # first point left out on this side: at distance T it must repeat the value kept at T ...
        d_next = (xp.gather(1, j) - xd) * side
        at_T = d_next == T
        jc = (j - (k + 1)).clamp(0, N - 1)
        set_amb |= at_T & (torch.gather(xs, 1, jc) != v_last)
        if collide:  # ... and the next distinct value beyond its duplicate block must be farther than T
            j2 = torch.gather(bstart, 1, jc) - 1 if side < 0 else torch.gather(bend, 1, jc) + 1
            ok2 = (j2 >= 0) & (j2 < N)
            d2 = (torch.gather(xd, 1, j2.clamp(0, N - 1)) - xd) * side
            set_amb |= at_T & ok2 & (d2 == T)
    # order ambiguity: kept neighbours of distinct values at one distance (sklearn's order between them unknown)
    order_amb = ((d64[:, :, 1:] == d64[:, :, :-1]) & (vals[:, :, 1:] != vals[:, :, :-1])).any(2)
    affected = order_amb | _gather_rows(order_amb, nbr).any(2)
    near = (lof.to(torch.float64) - 1.5).abs() <= 1.5 * (8 * k + 64) * _U32
    redo = set_amb.any(1) | (affected & near).any(1)
    return lof > 1.5, redo


def _dup_blocks(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted rows [B, N] -> (first, last) position of each entry's run of equal values."""
    B, N = xs.shape
    pos = torch.arange(N, device=xs.device).expand(B, N)
    newv = torch.ones(B, N, dtype=torch.bool, device=xs.device)
    newv[:, 1:] = xs[:, 1:] != xs[:, :-1]
    lastv = torch.ones_like(newv)
    lastv[:, :-1] = newv[:, 1:]
    bstart = torch.cummax(torch.where(newv, pos, torch.zeros_like(pos)), dim=1).values
    bend = torch.cummin(torch.where(lastv, pos, torch.full_like(pos, N - 1)).flip(1), dim=1).values.flip(1)
    return bstart, bend


def _beyond_window_collision(xs: torch.Tensor, k: int, T: torch.Tensor) -> torch.Tensor:
    """[B, N]: a tie group at distance T runs past the k-wide window and holds another value there.

    Past the window edge the group is copies of the edge value unless float64 rounding made the next
    distinct value equidistant; check that value (one jump over the duplicate block).
    """
    B, N = xs.shape
    dev = xs.device
    xd = xs.to(torch.float64)
    pos = torch.arange(N, device=dev)
    bstart, bend = _dup_blocks(xs)
    out = torch.zeros(B, N, dtype=torch.bool, device=dev)
    for side in (-1, 1):
        edge = pos + side * k
        ok = (edge >= 0) & (edge < N)
        edge_c = edge.clamp(0, N - 1).expand(B, N)
        d_edge = (torch.gather(xd, 1, edge_c) - xd) * side
        nxt = (torch.gather(bstart, 1, edge_c) - 1) if side < 0 else (torch.gather(bend, 1, edge_c) + 1)
        ok = ok & (nxt >= 0) & (nxt < N)
        d_nxt = (torch.gather(xd, 1, nxt.clamp(0, N - 1)) - xd) * side
        out |= ok & (d_edge == T) & (d_nxt == T)
    return out


def _sqrt_f32(y: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt of float32 ``y``.

    torch's vectorised CPU sqrt is not correctly rounded (float32: ~0.6% of inputs 1 ulp off; float64 too,
    by <= 1 ulp).  sqrt of a float32 lies >= 2^-49 (relative) away from any float32 rounding midpoint, so
    rounding a float64 sqrt that is within a few float64 ulps gives the correctly rounded float32 result.
    """
    return torch.sqrt(y.to(torch.float64)).to(torch.float32)


def _candidates(xs: torch.Tensor, k: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sorted point: candidate neighbours sorted by sklearn's ranking key (ascending, stable).

    Returns (key float64 [B, N, M], dist float64 [B, N, M], cand sorted-position [B, N, M]).
    "window" (kd_tree): key = dist = |x_j - x_i| in float64 (the tree's sqrt((x_i - x_j)^2), exact kNN);
    M = 2k window candidates, left ones first.  "all_kd": same keys, every other point (M = N - 1), for
    rows where a float64-rounding tie group runs past the window.
    "brute": key = float64 surrogate (x_i^2 + -2 x_i x_j) + x_j^2 clipped at 0 (ArgKmin ranks by it),
    dist = sqrt(float32(key)) (sklearn's float32 rdist_to_dist); the surrogate is not exactly monotone in
    |x_i - x_j|, so every other point is a candidate (M = N - 1).
    """
    B, N = xs.shape
    dev = xs.device
    xd = xs.to(torch.float64)
    pos = torch.arange(N, device=dev)
    if mode != "window":
        if mode == "brute":
            sq = xd * xd
            key = (sq[:, :, None] + (-2.0 * xd)[:, :, None] * xd[:, None, :]) + sq[:, None, :]
            key = key.clamp_min(0.0)
        else:
            key = (xd[:, None, :] - xd[:, :, None]).abs()
        key[:, pos, pos] = float("inf")  # self: sklearn's self-exclusion leaves the k smallest among others
        key, cand = torch.sort(key, dim=2, stable=True)
        key, cand = key[:, :, : N - 1], cand[:, :, : N - 1]
        if mode == "brute":  # EuclideanDistance32._rdist_to_dist takes a float32: sqrt(float32(surrogate))
            return key, _sqrt_f32(key.to(torch.float32)).to(torch.float64), cand
        return key, key, cand
    t = torch.arange(1, k + 1, device=dev)
    li = pos[:, None] - t  # [N, k]
    ri = pos[:, None] + t
    cand = torch.cat([li, ri], dim=1).clamp(0, N - 1)  # [N, 2k]
    valid = torch.cat([li >= 0, ri < N], dim=1)
    xc = xd[:, cand]  # [B, N, 2k]
    sign = torch.cat([torch.full((k,), -1.0, device=dev), torch.full((k,), 1.0, device=dev)]).to(torch.float64)
    key = (xc - xd[:, :, None]) * sign  # |x_j - x_i| rounded once, as the tree computes it
    key = torch.where(valid, key, torch.full_like(key, float("inf")))
    key, perm = torch.sort(key, dim=2, stable=True)
    cand = torch.gather(cand.expand(B, N, 2 * k), 2, perm)
    return key, key, cand


def _lof_general(xs: torch.Tensor, k: int, brute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Any regime, ties allowed: sorted float32 rows -> (outlier [B, N] sorted order, undecided rows [B]).

    Emulates with a canonical tie order, detects exactly which points could depend on sklearn's tie
    order (set or order ambiguity, see module doc), and decides those through ``_lof_enclosure``.
    """
    B = xs.shape[0]
    key, dist, cand = _candidates(xs, k, "brute" if brute else "window")  # [B, N, M]
    if not brute and bool(_beyond_window_collision(xs, k, key[:, :, k - 1]).any()):
        key, dist, cand = _candidates(xs, k, "all_kd")  # the tie group outgrows the window: take everyone
    M = key.shape[2]
    T = key[:, :, k - 1]  # boundary key: k-th smallest among the other points
    nbr = cand[:, :, :k]
    reach, lrd, lrd_nb, lof = _lof_values(nbr, dist[:, :, :k], dist[:, :, k - 1].to(torch.float32))
    outlier = lof > 1.5  # sklearn: -mean < offset_ (-1.5)

    cval = _gather_rows(xs, cand)
    same_key = key[:, :, 1:] == key[:, :, :-1]
    diff_val = cval[:, :, 1:] != cval[:, :, :-1]
    in_T = key == T[:, :, None]
    over = key[:, :, k] == T if M > k else torch.zeros_like(T, dtype=torch.bool)  # more tied than free slots
    set_amb = over & (same_key & diff_val & in_T[:, :, 1:]).any(2)
    undecided = torch.zeros(B, dtype=torch.bool, device=xs.device)
    adj_in = same_key[:, :, : k - 1]  # equal-distance neighbours: kneighbors order between them unknown
    order_amb_reach = (adj_in & (reach[:, :, 1:] != reach[:, :, :-1])).any(2)
    exact_lrd = ~set_amb & ~order_amb_reach
    exact_nb = _gather_rows(exact_lrd, nbr)
    order_amb_lof = (adj_in & ((lrd_nb[:, :, 1:] != lrd_nb[:, :, :-1]) | ~exact_nb[:, :, 1:] | ~exact_nb[:, :, :-1])).any(2)
    exact_lof = exact_lrd & exact_nb.all(2) & ~order_amb_lof
    if not bool(exact_lof.all()):
        reach_all = torch.maximum(dist.to(torch.float32), _gather_rows(dist[:, :, k - 1].to(torch.float32), cand))
        sure_out, sure_in = _lof_enclosure(xs, key, dist, cand, cval, k, T, reach, reach_all, lrd, set_amb, exact_lrd)
        outlier = torch.where(exact_lof, outlier, sure_out)
        undecided |= (~exact_lof & ~sure_out & ~sure_in).any(1)
    return outlier, undecided


def _lof_fast(x: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch LOF labels for float32 rows [B, N] (N >= 2), no sklearn.

    Returns (outlier bool [B, N] in the input order, undecided bool [B]); undecided rows are those whose
    labels provably depend on how sklearn breaks exact distance ties, to be settled by scikit-learn.
    """
    B, N = x.shape
    k, brute = _regime(n_neighbors, N)
    xs, order = torch.sort(x, dim=1, stable=True)
    if brute:
        outlier, undecided = _lof_general(xs, k, True)
    else:
        outlier, redo = _lof_window(xs, k)
        undecided = torch.zeros(B, dtype=torch.bool, device=x.device)
        if bool(redo.any()):
            idx = torch.nonzero(redo).flatten()
            outlier[idx], undecided[idx] = _lof_general(xs[idx], k, False)
    out = torch.empty_like(outlier)
    out.scatter_(1, order, outlier)
    return out, undecided


def _lof_enclosure(xs, key, dist, cand, cval, k, T, reach, reach_all, lrd, set_amb, exact_lrd):
    """Bounds on every LOF value sklearn could report, over all tie choices and summation orders.

    Work in float64 reals built from the exact float32 inputs, widened by ``eps`` >= the float32 rounding
    of a k-term mean plus the scalar ops around it (standard (n-1)u summation bound, doubled).
    A set-ambiguous point in 1-D has two tied values x - T < x < x + T; sklearn keeps ``a`` of the left
    copies and ``s - a`` of the right ones, with ``a`` in [max(0, s - cR), min(s, cL)]; every ``a`` is
    evaluated.  All copies of a value share one query, hence one choice, hence one lrd.
    A tie group with more than two values (float64 rounding made distinct values equidistant, or the brute
    surrogate collided) is bounded coarsely instead: s times the group's smallest / largest reach and lrd.
    Returns (surely outlier, surely inlier) per point.
    """
    B, N, M = key.shape
    dev = key.device
    f64 = torch.float64
    eps = 2.0 * (k + 8) * _U32
    pval = xs[:, :, None]
    inc = (torch.arange(M, device=dev) < k).expand(B, N, M)
    fixed = inc & (key < T[:, :, None])
    g = key == T[:, :, None]
    s = k - fixed.sum(2)
    inf = torch.full_like(cval, float("inf"))
    vL = torch.where(g, cval, inf).amin(2)
    vR = torch.where(g, cval, -inf).amax(2)
    isL = g & (cval == vL[:, :, None])
    isR = g & (cval == vR[:, :, None])
    multi = set_amb & (g & ~isL & ~isR).any(2)
    cL, cR = isL.sum(2), isR.sum(2)
    repL = cand.gather(2, isL.to(torch.uint8).argmax(2, keepdim=True)).squeeze(2)
    repR = cand.gather(2, isR.to(torch.uint8).argmax(2, keepdim=True)).squeeze(2)
    r64 = reach_all.to(f64)
    r_fix = torch.where(fixed, r64, torch.zeros_like(r64)).sum(2)
    kd32 = dist[:, :, k - 1].to(torch.float32)  # also p's distance to its boundary group
    rL = torch.maximum(kd32, torch.gather(kd32, 1, repL)).to(f64)  # reach via a left / right tied copy
    rR = torch.maximum(kd32, torch.gather(kd32, 1, repR)).to(f64)
    a_lo = torch.clamp(s - cR, min=0)
    a_hi = torch.minimum(s, cL)
    a = a_lo[:, :, None] + torch.arange(k + 1, device=dev)  # [B, N, k+1]
    a_ok = a <= a_hi[:, :, None]
    af = a.to(f64)
    sf = s.to(f64)[:, :, None]
    R_a = r_fix[:, :, None] + af * rL[:, :, None] + (sf - af) * rR[:, :, None]
    lrd_a = 1.0 / (R_a / k + 1e-10)  # real lrd for each choice
    lrd_real = 1.0 / (reach.to(f64).sum(2) / k + 1e-10)  # canonical set (right set when not set_amb)
    big = torch.full_like(lrd_a, float("inf"))
    lam_lo = torch.where(set_amb, torch.where(a_ok, lrd_a, big).amin(2), lrd_real)
    lam_hi = torch.where(set_amb, torch.where(a_ok, lrd_a, -big).amax(2), lrd_real)
    inf64 = torch.full_like(r64, float("inf"))
    gr_min = torch.where(g, r64, inf64).amin(2)
    gr_max = torch.where(g, r64, -inf64).amax(2)
    lam_lo = torch.where(multi, 1.0 / ((r_fix + s * gr_max) / k + 1e-10), lam_lo) * (1 - eps)
    lam_hi = torch.where(multi, 1.0 / ((r_fix + s * gr_min) / k + 1e-10), lam_hi) * (1 + eps)
    lrd32 = lrd.to(f64)
    lam_lo = torch.where(exact_lrd, lrd32, lam_lo)
    lam_hi = torch.where(exact_lrd, lrd32, lam_hi)

    # LOF(p) = (#same-value neighbours + sum_other lrd_o / lrd_p) / k; copies of p give ratio exactly 1.
    same = cval == pval
    c_lo, c_hi = _gather_rows(lam_lo, cand), _gather_rows(lam_hi, cand)
    z = torch.zeros_like(c_lo)
    # not set-ambiguous: the canonical k neighbours are the right set
    n_same_inc = (inc & same).sum(2).to(f64)
    num_lo = torch.where(inc & ~same, c_lo, z).sum(2)
    num_hi = torch.where(inc & ~same, c_hi, z).sum(2)
    lof_lo = (n_same_inc + num_lo / lam_hi) / k * (1 - eps)
    lof_hi = (n_same_inc + num_hi / lam_lo) / k * (1 + eps)
    # set-ambiguous: enumerate a; lrd_p for that a, neighbours at their extremes
    n_same_fix = (fixed & same).sum(2).to(f64)[:, :, None]
    nf_lo = torch.where(fixed & ~same, c_lo, z).sum(2)[:, :, None]
    nf_hi = torch.where(fixed & ~same, c_hi, z).sum(2)[:, :, None]
    lamL_lo, lamL_hi = torch.gather(lam_lo, 1, repL)[:, :, None], torch.gather(lam_hi, 1, repL)[:, :, None]
    lamR_lo, lamR_hi = torch.gather(lam_lo, 1, repR)[:, :, None], torch.gather(lam_hi, 1, repR)[:, :, None]
    na_lo = nf_lo + af * lamL_lo + (sf - af) * lamR_lo
    na_hi = nf_hi + af * lamL_hi + (sf - af) * lamR_hi
    la_lo = (n_same_fix + na_lo / (lrd_a * (1 + eps))) / k * (1 - eps)
    la_hi = (n_same_fix + na_hi / (lrd_a * (1 - eps))) / k * (1 + eps)
    lof_lo = torch.where(set_amb, torch.where(a_ok, la_lo, big).amin(2), lof_lo)
    lof_hi = torch.where(set_amb, torch.where(a_ok, la_hi, -big).amax(2), lof_hi)
    # multi-valued tie group: any s of the group, bounded by its extremes (numerator and lrd_p decoupled)
    gl_min = torch.where(g, c_lo, torch.full_like(c_lo, float("inf"))).amin(2)
    gl_max = torch.where(g, c_hi, torch.full_like(c_hi, -float("inf"))).amax(2)
    sf2, nsf = s.to(f64), n_same_fix[:, :, 0]
    m_lo = (nsf + (nf_lo[:, :, 0] + sf2 * gl_min) / lam_hi) / k * (1 - eps)
    m_hi = (nsf + (nf_hi[:, :, 0] + sf2 * gl_max) / lam_lo) / k * (1 + eps)
    lof_lo = torch.where(multi, m_lo, lof_lo)
    lof_hi = torch.where(multi, m_hi, lof_hi)
    return lof_lo > 1.5, lof_hi < 1.5


def _sklearn_labels(rows: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """scikit-learn on a few float32 rows (only rows whose labels hinge on its internal tie order)."""
    from sklearn.neighbors import LocalOutlierFactor

    arr = rows.detach().to("cpu", torch.float32).numpy()
    res = torch.empty(arr.shape, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, row in enumerate(arr):
            lab = LocalOutlierFactor(n_neighbors=n_neighbors, contamination="auto").fit_predict(row.reshape(-1, 1))
            res[i] = torch.from_numpy(lab == -1)
    return res.to(rows.device)


def lof_outliers(scores: torch.Tensor, n_neighbors: int = 20) -> torch.Tensor:
    """[B, N] -> bool [B, N] (same device): per row, sklearn LOF(n_neighbors, contamination='auto') == -1.

    Scores are taken as float32 (RC fits float32 scores).  n_neighbors >= N is clamped to N - 1 like sklearn
    (which warns).  N == 1: sklearn refuses to fit; a lone token is reported as an inlier.
    """
    _check_scores("lof_outliers", scores)
    k = _check_k("lof_outliers", n_neighbors)
    x = scores.detach().to(torch.float32)
    B, N = x.shape
    if N == 1 or B == 0:
        return torch.zeros(B, N, dtype=torch.bool, device=x.device)
    if _regime(k, N)[1] and B * N * N > (1 << 24):  # bound the [B, N, N] brute-force buffers
        parts = [_lof_fast(x[i : i + 1], k) for i in range(B)]
        out = torch.cat([p[0] for p in parts])
        undecided = torch.cat([p[1] for p in parts])
    else:
        out, undecided = _lof_fast(x, k)
    if bool(undecided.any()):
        idx = torch.nonzero(undecided).flatten()
        out[idx] = _sklearn_labels(x[idx], k)
    return out


def lof_fraction(scores: torch.Tensor, n_neighbors: int = 20) -> torch.Tensor:
    """[B, N] -> float64 [B]: LOF outlier count / N, in float64 like ``np.mean(labels == -1)``.

    Callers do ``int(576 * fraction)``; a float32 ratio can land just below the integer (59 -> 58).
    """
    lab = lof_outliers(scores, n_neighbors)
    return lab.sum(dim=1, dtype=torch.float64) / lab.shape[1]
