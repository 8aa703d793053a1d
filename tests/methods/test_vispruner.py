"""VisPruner / FasterVLM: reference == the released selection (quirks included), fixed repairs it.

The oracles are our own step-by-step readings of `encode_images` in Theia-4869/VisPruner @ aefa01a and
Theia-4869/FasterVLM @ f5d5f12 (llava/model/llava_arch.py), fed the way their CLIP towers feed it
(llava/model/multimodal_encoder/clip_encoder.py: hidden_states[-2][:, 1:] and attentions[-2][:, :, 0, 1:],
i.e. block 22) with the settings of llava/eval/model_vqa_loader.py (batch 1, `visual_token_num`,
`important_ratio`). Plain loops, one image at a time, torch's own ranking ops called the way the release
calls them ([1, len] rows, `argsort(descending=True)` / `topk`), so tie order is the release's on CPU.

Inputs are built so that a test either has NO near-ties (every ranking has a relative gap >= 1e-5,
checked, so any correct implementation must give the released order) or has EXACT ties computed
bit-exactly (identical keys, flat attention, integer features whose norms are powers of two), where
reference must follow torch's unstable order and fixed the lower index / position.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import pytest
import torch

from lmms_tokprune.methods import VisionInputs, compress

N = 576
MIN_GAP = 1e-5  # relative gap every ranking of a tie-free input must have (~100x fp32 rounding here)


class ReleasedCrash(Exception):
    """The released code raises here (IndexError / RuntimeError from its gather)."""


# ----------------------------------------------------------------------------------------- oracles


def head_attention(fq: torch.Tensor, fk: torch.Tensor, heads: int) -> torch.Tensor:
    """[1+N, D] raw q_proj / k_proj of block 22 -> [H, N]: each head's CLS softmax row, CLS column dropped.

    What CLIP's eager attention returns for attentions[-2][0, :, 0, 1:]: q scaled by 1/sqrt(D/H), softmax
    over all 1+N keys, no renormalisation after dropping the CLS column.
    """
    width = fq.shape[-1] // heads
    rows = []
    for h in range(heads):
        dims = slice(h * width, (h + 1) * width)
        logits = fk[:, dims] @ (fq[0, dims] / math.sqrt(width))
        rows.append(torch.softmax(logits, dim=0)[1:])
    return torch.stack(rows)


def min_gap(values: torch.Tensor) -> float:
    """Smallest relative gap between neighbours in descending order (0.0 = an exact tie)."""
    s = torch.sort(values.flatten(), descending=True).values
    if s.numel() < 2:
        return math.inf
    return float(((s[:-1] - s[1:]) / s[:-1].abs().clamp_min(1e-30)).min())


def rank(values: torch.Tensor, stable: bool) -> list[int]:
    """Descending order: the release's unstable argsort on a [1, len] row, or stable (ties to the lower position)."""
    if stable:
        return torch.sort(values, descending=True, stable=True).indices.tolist()
    return values[None].argsort(dim=-1, descending=True)[0].tolist()


def released_gather_len(R: int, r: int) -> int:
    """How many re-ordered evens the released gather really returns in a round of R residual tokens.

    The release takes argsort(scores)[:, r:] (ceil(R/2) - r entries, none if negative) and indexes them
    together with a batch-row index expanded to R//2 - r columns. Those broadcast only when the two
    lengths are equal or one is 1 (expand(-1, -1) keeps size 1); otherwise it raises: odd R in any
    ordinary round is an IndexError, an expand below -1 a RuntimeError. Where they do broadcast against a
    0-length row index, the surviving even is silently lost.
    """
    kept = max(0, (R + 1) // 2 - r)
    rows = R // 2 - r
    if rows < -1:
        raise ReleasedCrash(f"R={R}, r={r}: expand to {rows} columns")
    rows = 1 if rows == -1 else rows
    if rows == kept or rows == 1:
        return kept
    if kept == 1:
        assert rows == 0  # the only reachable case (odd R, one survivor)
        return 0
    raise ReleasedCrash(f"R={R}, r={r}: {kept} survivors vs {rows} row indices")


@dataclass
class Selection:
    kept: list[int]  # ascending patch indices (the release's index mask)
    gaps: list[float] = field(default_factory=list)  # min relative gap of every ranking used

    @property
    def gap(self) -> float:
        return min(self.gaps) if self.gaps else math.inf


def vispruner_oracle(hidden, fq, fk, heads, budget, ratio=0.5, *, stable=False, release_shapes=True,
                     resplit=True, reorder=True, evens_only=True, round_imp=False) -> Selection:
    """One image, as the released encode_images computes it; each keyword undoes one quirk.

    stable: stable sorts instead of torch's unstable argsort. release_shapes=False: odd / short rounds
    keep every surviving even (the repair). resplit=False: evens/odds assigned once from the first
    residual list. reorder=False: survivors keep their list order. evens_only=False: odds are scored and
    dropped too. round_imp: T_imp = round(n r) instead of int(n r).
    """
    sel = Selection([])
    a = head_attention(fq, fk, heads).mean(0)
    t_imp = round(budget * ratio) if round_imp else int(budget * ratio)
    t_div = budget - t_imp
    order = rank(a, stable)
    sel.gaps.append(min_gap(a))
    important, residual = order[:t_imp], order[t_imp:]
    x = hidden[1:] / hidden[1:].norm(dim=-1, keepdim=True)
    evens, odds = residual[0::2], residual[1::2]
    while t_div > 0:
        R = len(residual)
        r = min(8, R - t_div)
        if r <= 0:
            break
        if resplit:
            evens, odds = residual[0::2], residual[1::2]
        elif not evens:  # split once: the first evens are used up, nothing left to drop
            break
        sims = x[evens] @ x[odds].T
        score_e = sims.max(dim=1).values  # most similar odd, per even
        if evens_only:
            by_score = [evens[i] for i in rank(score_e, stable)]
            sel.gaps.append(min_gap(score_e))
            survivors = by_score[r:]
            if release_shapes:
                survivors = survivors[: released_gather_len(R, r)]
            dropped = set(by_score) - set(survivors)
            evens = survivors if reorder else [t for t in evens if t not in dropped]
            residual = evens + odds
        else:  # both halves scored against each other, the r most duplicated of all dropped
            score_o = sims.max(dim=0).values
            both = evens + odds
            dropped = {both[i] for i in rank(torch.cat([score_e, score_o]), stable)[:r]}
            evens = [t for t in evens if t not in dropped]
            odds = [t for t in odds if t not in dropped]
            residual = evens + odds
    sel.kept = sorted(set(important + (residual if t_div > 0 else [])))
    return sel


def fastervlm_oracle(fq, fk, heads, budget, *, stable=False) -> Selection:
    """One image: top-`budget` of the head-mean CLS attention (the release's topk), ascending."""
    a = head_attention(fq, fk, heads).mean(0)
    if stable:
        idx = torch.sort(a, descending=True, stable=True).indices[:budget]
    else:
        idx = torch.topk(a[None], k=budget, dim=1)[1][0]
    return Selection(sorted(idx.tolist()), [min_gap(a)])


def repaired(inp, b, budget, ratio=0.5) -> Selection:
    """What fixed should select where no round asks for more evens than exist: stable sorts, odd R handled."""
    return vispruner_oracle(inp.hidden[b], inp.feature_q[b], inp.feature_k[b], inp.num_heads, budget, ratio,
                            stable=True, release_shapes=False)


def released(inp, b, budget, ratio=0.5, **quirks) -> Selection:
    return vispruner_oracle(inp.hidden[b], inp.feature_q[b], inp.feature_k[b], inp.num_heads, budget, ratio, **quirks)


def released_fast(inp, b, budget, **kw) -> Selection:
    return fastervlm_oracle(inp.feature_q[b], inp.feature_k[b], inp.num_heads, budget, **kw)


# ----------------------------------------------------------------------------------------- inputs


def attention_qk(g, b, width, heads, mode="peaked"):
    """feature_q / feature_k whose CLS logits are set directly: head h's logit for patch j is k[j, h*d].

    q_CLS of head h is sqrt(d) on its first dim and 0 elsewhere, so every logit is exactly that key entry
    (identical keys -> bit-identical attention). Patches get distinct grades (0.002 apart, per-head
    slope), 24 'hot' patches get per-head boosts of 3-6 (peaked; the heads disagree), and the CLS key's
    own logit differs per head so renormalising after dropping it would reweight the heads. 'flat': q_CLS
    = 0, every patch gets exactly 1/577.
    """
    d = width // heads
    fq = torch.randn(b, N + 1, width, generator=g)
    fk = torch.randn(b, N + 1, width, generator=g)
    for i in range(b):
        grade = torch.randperm(N, generator=g).float() * 0.002
        logits = (0.5 + torch.rand(heads, 1, generator=g)) * grade
        if mode == "peaked":
            hot = torch.randperm(N, generator=g)[:24]
            logits[:, hot] += 3 + 3 * torch.rand(heads, 24, generator=g)
        fq[i, 0] = 0.0
        for h in range(heads):
            if mode != "flat":
                fq[i, 0, h * d] = math.sqrt(d)
            fk[i, 1:, h * d] = logits[h]
            fk[i, 0, h * d] = 6 * float(torch.rand(1, generator=g))
    return fq, fk


def structured_hidden(g, b, width, twins=12):
    """Tie-free diversity scores: x_j = alpha_j e_0 + gamma_j u_j with one private axis u_j per patch.

    Then x_e . x_o = alpha_e alpha_o exactly (distinct alphas 1e-3 apart) except for `twins` near-duplicate
    pairs (adjacent alphas, shared axis, cosine ~0.95-0.995, all different); rows get random scales so
    the L2 normalisation matters.
    """
    assert width >= N + 2
    h = torch.zeros(b, N + 1, width)
    for i in range(b):
        h[i, 0] = torch.randn(width, generator=g)
        alpha = 0.2 + 0.6 * torch.randperm(N, generator=g).double() / (N - 1)
        gamma = (1 - alpha**2).sqrt()
        rows = torch.zeros(N, width, dtype=torch.float64)
        rows[:, 0] = alpha
        rows[torch.arange(N), 1 + torch.arange(N)] = gamma
        by_alpha = torch.argsort(alpha).tolist()
        starts = torch.randperm(N // 2, generator=g)[:twins].tolist()
        for p, s in enumerate(starts):
            j, k = by_alpha[2 * s], by_alpha[2 * s + 1]
            c = 0.95 + 0.045 * p / max(twins - 1, 1)
            rows[k, 1:] = 0.0
            rows[k, 1 + j], rows[k, 1 + k] = gamma[k] * c, gamma[k] * math.sqrt(1 - c * c)
        scale = 0.5 + 1.5 * torch.rand(N, 1, generator=g, dtype=torch.float64)
        h[i, 1:] = (rows * scale).float()
    return h


def exact_hidden(g, b, width=64, bits=24, dups=0, near=0):
    """Integer rows with squared norm exactly 2^bits (then times 4^e): the L2 normalisation and every dot
    product are exact in fp32 whatever the summation order, so every implementation computes bit-identical
    diversity scores (2^-bits granularity; bits=16 gives many exact ties). `dups` rows are exact copies of
    others, `near` are copies (scaled by 2) with two coordinates swapped.
    """
    target, spread = 2**bits, {24: 800, 16: 50}[bits]
    root = math.isqrt(target)
    c = torch.arange(root + 1)
    h = torch.zeros(b, N + 1, width)
    for i in range(b):
        h[i, 0] = torch.randn(width, generator=g)
        rows = torch.zeros(N, width, dtype=torch.long)
        todo = torch.arange(N)
        while todo.numel():  # width-2 random entries, the last two solve c^2 + d^2 = the rest (balanced)
            v = torch.randint(-spread, spread + 1, (todo.numel(), width - 2), generator=g)
            rest = target - (v * v).sum(1, keepdim=True)
            d2 = rest - c * c
            d = d2.clamp_min(0).double().sqrt().round().long()
            ok = (d2 >= 0) & (d * d == d2) & (d <= c)
            cc = torch.where(ok, c, root + 1).min(1, keepdim=True).values
            good = (cc <= root).flatten()
            dd = (rest[good] - cc[good] ** 2).double().sqrt().round().long()
            signs = torch.randint(0, 2, (int(good.sum()), 2), generator=g) * 2 - 1
            rows[todo[good]] = torch.cat([v[good], torch.cat([cc[good], dd], 1) * signs], 1)
            todo = todo[~good]
        assert bool(((rows * rows).sum(1) == target).all())
        rows = torch.gather(rows, 1, torch.argsort(torch.rand(N, width, generator=g), dim=1))
        h[i, 1:] = rows.float() * 2.0 ** torch.randint(-2, 3, (N, 1), generator=g)
        src = torch.randperm(N, generator=g)[: dups + near].tolist()
        dst = torch.randperm(N, generator=g)[: dups + near].tolist()
        for t, (s, d) in enumerate(zip(src, dst)):
            if s != d and t < dups:
                h[i, 1 + d] = h[i, 1 + s]
            elif s != d:
                h[i, 1 + d] = 2.0 * h[i, 1 + s, torch.tensor([1, 0] + list(range(2, width)))]
    return h


@functools.cache
def _signals(b, seed, features, attention, dups, near):
    g = torch.Generator().manual_seed(seed)
    width, heads = (640, 10) if features == "structured" else (64, 4)
    fq, fk = attention_qk(g, b, width, heads, attention)
    if features == "structured":
        hidden = structured_hidden(g, b, width)
    else:
        hidden = exact_hidden(g, b, width, bits=16 if features == "coarse" else 24, dups=dups, near=near)
    return hidden, fq, fk, heads


def make(b=1, seed=0, features="structured", attention="peaked", dups=0, near=0) -> VisionInputs:
    """A batch of CLIP-like block-22 signals, fresh tensors each call (built once per argument set).

    features: 'structured' (tie-free scores, width 640 / 10 heads), 'exact' (integer rows, 2^-24 exact
    scores, width 64 / 4 heads) or 'coarse' (2^-16: many exact score ties); attention: 'peaked',
    'graded' or 'flat' (see attention_qk).
    """
    hidden, fq, fk, heads = _signals(b, seed, features, attention, dups, near)
    return VisionInputs(hidden.clone(), None, None, feature_q=fq.clone(), feature_k=fk.clone(), num_heads=heads)


def one(inp: VisionInputs, b: int) -> VisionInputs:
    s = slice(b, b + 1)
    return VisionInputs(inp.hidden[s], None, None, feature_q=inp.feature_q[s], feature_k=inp.feature_k[s],
                        num_heads=inp.num_heads)


def assert_selects(out, inp, b, kept: list[int]):
    """Indices exactly `kept` (ascending) and features exactly the hidden rows of those patches."""
    assert out.index.dtype == torch.long
    assert out.index.tolist() == kept
    assert torch.equal(out.features, inp.hidden[b, 1 + out.index])


# ----------------------------------------------------------------------------------------- reference, tie-free

VISPRUNER_SETTINGS = [(128, 0.5), (64, 0.75), (192, 0.5), (64, 0.5), (32, 0.5), (16, 0.5), (12, 0.5),
                      (512, 0.25), (200, 0.9), (576, 0.5), (100, 0.29)]


@pytest.mark.parametrize("budget,ratio", VISPRUNER_SETTINGS)
@pytest.mark.parametrize("attention,seed", [("peaked", 0), ("graded", 1)])
def test_vispruner_reference_is_the_released_selection(budget, ratio, attention, seed):
    """README settings (128 @ 0.5, 64 @ 0.75) and others, on inputs with no near-ties anywhere."""
    inp = make(1, seed, attention=attention)
    want = released(inp, 0, budget, ratio)
    assert want.gap > MIN_GAP and len(want.kept) == budget
    assert_selects(compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)[0], inp, 0, want.kept)


@pytest.mark.parametrize("budget,ratio", VISPRUNER_SETTINGS + [(96, 0.5), (320, 0.5), (144, 0.75), (40, 0.25), (48, 1.0), (64, 0.0)])
@pytest.mark.parametrize("seed,dups,near", [(20, 0, 0), (21, 40, 40)])
def test_vispruner_reference_on_exact_integer_features(budget, ratio, seed, dups, near):
    """Scores computed bit-exactly (ties possible, reproduced by the same argsort), duplicates and near-duplicates."""
    inp = make(1, seed, features="exact", dups=dups, near=near)
    want = released(inp, 0, budget, ratio)
    out = compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)[0]
    assert_selects(out, inp, 0, want.kept)


def test_vispruner_default_ratio_is_one_half():
    inp = make(1, 2)
    assert_selects(compress("vispruner", inp, variant="reference", budget=128)[0], inp, 0, released(inp, 0, 128, 0.5).kept)


@pytest.mark.parametrize("budget", [144, 58, 29, 1, 300, 576])
@pytest.mark.parametrize("attention,seed", [("peaked", 3), ("graded", 4)])
def test_fastervlm_reference_is_the_released_topk(budget, attention, seed):
    """README settings 144 / 58 / 29 (75 / 90 / 95 %) and the extremes."""
    inp = make(1, seed, features="exact", attention=attention)
    want = released_fast(inp, 0, budget)
    assert want.gap > MIN_GAP
    assert_selects(compress("fastervlm", inp, variant="reference", budget=budget)[0], inp, 0, want.kept)


@pytest.mark.parametrize("variant", ["reference", "fixed"])
@pytest.mark.parametrize("budget", [144, 58, 29])
def test_fastervlm_equals_vispruner_with_ratio_one(variant, budget):
    """PEERS.md: FasterVLM == VisPruner at important_ratio=1.0 (T_div = 0: the argsort prefix only)."""
    inp = make(1, 5, features="exact")
    fast = compress("fastervlm", inp, variant=variant, budget=budget)[0]
    vis = compress("vispruner", inp, variant=variant, budget=budget, important_ratio=1.0)[0]
    assert fast.index.tolist() == vis.index.tolist() == released_fast(inp, 0, budget).kept


# ----------------------------------------------------------------------------------------- reference, exact ties


def test_flat_attention_follows_torchs_unstable_order_in_reference():
    """All 576 attentions equal: the important set is whatever argsort / topk put first (not 0..T-1)."""
    inp = make(1, 6, attention="flat")
    assert min_gap(head_attention(inp.feature_q[0], inp.feature_k[0], inp.num_heads).mean(0)) == 0.0
    for budget, ratio in [(128, 0.5), (64, 0.75)]:
        want = released(inp, 0, budget, ratio)
        assert want.kept != repaired(inp, 0, budget, ratio).kept  # the tie order really decides
        out = compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)[0]
        assert_selects(out, inp, 0, want.kept)
    for budget in (144, 58, 29):
        want = released_fast(inp, 0, budget)
        assert want.kept != list(range(budget))
        assert_selects(compress("fastervlm", inp, variant="reference", budget=budget)[0], inp, 0, want.kept)


def test_flat_attention_argsort_prefix_and_topk_pick_different_ties():
    """Why 'FasterVLM == VisPruner @ 1.0' holds only without ties: argsort[:n] and topk break them differently."""
    inp = make(1, 6, attention="flat")
    for budget in (29, 58, 128):
        fast, vis = released_fast(inp, 0, budget), released(inp, 0, budget, 1.0)
        assert fast.kept != vis.kept
        assert compress("fastervlm", inp, variant="reference", budget=budget)[0].index.tolist() == fast.kept
        out = compress("vispruner", inp, variant="reference", budget=budget, important_ratio=1.0)[0]
        assert out.index.tolist() == vis.kept


@pytest.mark.parametrize("seed,dups,near", [(7, 0, 0), (8, 60, 30)])
@pytest.mark.parametrize("budget,ratio", [(128, 0.5), (64, 0.75), (192, 0.5)])
def test_tied_diversity_scores_follow_torchs_unstable_order_in_reference(seed, dups, near, budget, ratio):
    """Coarse integer features (exact arithmetic): many exactly equal scores; duplicate rows add ties at 1.0."""
    inp = make(1, seed, features="coarse", dups=dups, near=near)
    want = released(inp, 0, budget, ratio)
    assert want.gap == 0.0 and want.kept != released(inp, 0, budget, ratio, stable=True).kept
    out = compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)[0]
    assert_selects(out, inp, 0, want.kept)


def test_fastervlm_tied_keys_across_the_cut():
    """40 patches share one key just below 40 hot ones: topk takes 18 of them, fixed the 18 lowest indices."""
    inp = make(1, 9, features="exact", attention="graded")
    fk = inp.feature_k[0]
    order = torch.sort(head_attention(inp.feature_q[0], fk, inp.num_heads).mean(0), descending=True).indices
    tied = order[40:80] + 1
    fk[tied] = fk[int(order[40]) + 1].clone()
    want, stable = released_fast(inp, 0, 58), released_fast(inp, 0, 58, stable=True)
    assert want.kept != stable.kept
    assert stable.kept == sorted(order[:40].tolist() + sorted(order[40:80].tolist())[:18])
    assert_selects(compress("fastervlm", inp, variant="reference", budget=58)[0], inp, 0, want.kept)
    assert_selects(compress("fastervlm", inp, variant="fixed", budget=58)[0], inp, 0, stable.kept)


# ----------------------------------------------------------------------------------------- quirks


def test_quirk_unstable_sorts_matter_and_fixed_is_stable():
    """Undoing the unstable argsorts changes the release's result on ties; fixed breaks ties by position."""
    flat = make(1, 6, attention="flat")
    tied = make(1, 8, features="coarse", dups=60, near=30)
    for inp in (flat, tied):
        for budget, ratio in [(128, 0.5), (64, 0.75)]:
            assert released(inp, 0, budget, ratio).kept != released(inp, 0, budget, ratio, stable=True).kept
            out = compress("vispruner", inp, variant="fixed", budget=budget, important_ratio=ratio)[0]
            assert_selects(out, inp, 0, repaired(inp, 0, budget, ratio).kept)
    fixed = compress("vispruner", flat, variant="fixed", budget=128, important_ratio=0.5)[0]
    assert set(range(64)) <= set(fixed.index.tolist())  # flat: important = patches 0..63
    assert compress("fastervlm", flat, variant="fixed", budget=58)[0].index.tolist() == list(range(58))


@pytest.mark.parametrize("budget,ratio", [(128, 0.5), (64, 0.75)])
def test_quirk_parity_is_re_split_every_round_on_the_re_ordered_list(budget, ratio):
    """Splitting evens/odds once, or keeping survivors in list order, would select other patches."""
    inp = make(1, 0)
    want = released(inp, 0, budget, ratio)
    assert released(inp, 0, budget, ratio, resplit=False).kept != want.kept
    assert released(inp, 0, budget, ratio, reorder=False).kept != want.kept
    assert_selects(compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)[0], inp, 0, want.kept)


@pytest.mark.parametrize("budget,ratio", [(128, 0.5), (64, 0.75)])
def test_quirk_only_evens_are_ever_dropped(budget, ratio):
    """Scoring and dropping odds as well would select other patches."""
    inp = make(1, 1, attention="graded")
    want = released(inp, 0, budget, ratio)
    assert released(inp, 0, budget, ratio, evens_only=False).kept != want.kept
    assert_selects(compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)[0], inp, 0, want.kept)


@pytest.mark.parametrize("budget,ratio", [(58, 0.5), (7, 0.5), (130, 0.5), (90, 0.1), (575, 0.5)])
def test_quirk_odd_residual_crashes_in_reference_and_runs_in_fixed(budget, ratio):
    """Odd T_imp -> odd R: the release's gather fails (IndexError); reference raises, fixed repairs it."""
    inp = make(1, 2)
    assert int(budget * ratio) % 2 == 1
    with pytest.raises(ReleasedCrash):
        released(inp, 0, budget, ratio)
    want = repaired(inp, 0, budget, ratio)
    assert want.gap > MIN_GAP and len(want.kept) == budget
    with pytest.raises(ValueError):
        compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)
    assert_selects(compress("vispruner", inp, variant="fixed", budget=budget, important_ratio=ratio)[0], inp, 0, want.kept)


def test_quirk_important_count_truncates():
    """T_imp = int(n * r): 100 * 0.29 = 28.999..., so 28 important tokens (round() would give 29 and crash)."""
    inp = make(1, 3)
    with pytest.raises(ReleasedCrash):
        released(inp, 0, 100, 0.29, round_imp=True)
    want = released(inp, 0, 100, 0.29)
    assert want.gap > MIN_GAP
    assert_selects(compress("vispruner", inp, variant="reference", budget=100, important_ratio=0.29)[0], inp, 0, want.kept)


def test_attention_is_the_head_mean_without_renormalisation():
    """Head 0 alone, the max over heads or renormalising after dropping CLS would rank differently."""
    inp = make(1, 10, features="exact")
    att = head_attention(inp.feature_q[0], inp.feature_k[0], inp.num_heads)
    top = lambda a, n: sorted(torch.topk(a[None], n, dim=1)[1][0].tolist())
    for other in (att[0], att.max(0).values, (att / att.sum(1, keepdim=True)).mean(0)):
        assert any(top(other, n) != top(att.mean(0), n) for n in (12, 20, 29, 58))
    for n in (12, 20, 29, 58, 144):
        want = top(att.mean(0), n)
        assert compress("fastervlm", inp, variant="reference", budget=n)[0].index.tolist() == want
        assert compress("vispruner", inp, variant="reference", budget=n, important_ratio=1.0)[0].index.tolist() == want


# Release behaviour for every budget at ratio 0.5 depends only on (n, r): odd T_imp -> IndexError, and
# n = 1, 4, 8 end with a round asking for more evens than exist -> RuntimeError (running the released
# function on CPU over n = 1..576 agrees with released_gather_len).
CRASH_SWEEP = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 20, 29, 32, 58, 64, 96, 128, 130, 192, 288, 320, 500, 574, 575, 576]


def test_reference_budget_sweep_crashes_exactly_where_the_release_does():
    inp = make(1, 11, features="exact", attention="graded")
    crashed, wrong = [], []
    for budget in CRASH_SWEEP:
        try:
            want = released(inp, 0, budget, 0.5).kept
        except ReleasedCrash:
            crashed.append(budget)
            want = "ValueError"
        try:
            got = compress("vispruner", inp, variant="reference", budget=budget, important_ratio=0.5)[0].index.tolist()
        except ValueError:
            got = "ValueError"
        if got != want:
            wrong.append((budget, "release: " + (want if isinstance(want, str) else f"{len(want)} tokens"),
                          "reference: " + (got if isinstance(got, str) else f"{len(got)} tokens")))
    assert crashed == [b for b in CRASH_SWEEP if (b // 2) % 2 == 1 or b in (1, 4, 8)]
    assert not wrong, wrong


@pytest.mark.parametrize("budget,ratio,kept", [(14, 0.75, 13), (38, 0.9, 37)])
def test_reference_short_rounds_return_what_the_release_returns(budget, ratio, kept):
    """Where a late round's gather broadcasts against a 0-length row index, the release silently keeps
    n - 1 tokens (R 14 -> 7 -> 3 for 14 @ 0.75); reference reproduces that selection."""
    inp = make(1, 12)
    want = released(inp, 0, budget, ratio)
    assert len(want.kept) == kept and want.gap > MIN_GAP
    out = compress("vispruner", inp, variant="reference", budget=budget, important_ratio=ratio)[0]
    assert_selects(out, inp, 0, want.kept)


# ----------------------------------------------------------------------------------------- fixed


@pytest.mark.parametrize("budget", [1, 2, 7, 58, 64, 128, 576])
def test_fixed_budget_is_exact(budget):
    """budget=n: exactly n distinct patches, ascending, features = hidden rows; important = stable top T_imp."""
    inp = make(2, 13, features="exact", dups=40, near=20)
    a = torch.stack([head_attention(inp.feature_q[b], inp.feature_k[b], inp.num_heads).mean(0) for b in range(2)])
    for ratio in (0.5, 0.75, 0.25):
        outs = compress("vispruner", inp, variant="fixed", budget=budget, important_ratio=ratio)
        for b, out in enumerate(outs):
            idx = out.index.tolist()
            assert len(idx) == budget and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < N
            assert torch.equal(out.features, inp.hidden[b, 1 + out.index])
            important = torch.sort(a[b], descending=True, stable=True).indices[: int(budget * ratio)]
            assert set(important.tolist()) <= set(idx)
    for b, out in enumerate(compress("fastervlm", inp, variant="fixed", budget=budget)):
        assert out.index.tolist() == sorted(torch.sort(a[b], descending=True, stable=True).indices[:budget].tolist())
        assert torch.equal(out.features, inp.hidden[b, 1 + out.index])


@pytest.mark.parametrize("budget,ratio", [(128, 0.5), (64, 0.75), (58, 0.5), (100, 0.29)])
def test_fixed_equals_reference_without_ties(budget, ratio):
    """No ties and no odd rounds: fixed and reference are the same selection (58 @ 0.5: fixed only)."""
    inp = make(1, 14)
    want = repaired(inp, 0, budget, ratio)
    assert want.gap > MIN_GAP
    assert_selects(compress("vispruner", inp, variant="fixed", budget=budget, important_ratio=ratio)[0], inp, 0, want.kept)
    if int(budget * ratio) % 2 == 0:
        assert released(inp, 0, budget, ratio).kept == want.kept


@pytest.mark.parametrize("params", [("vispruner", {"budget": 128, "important_ratio": 0.5}),
                                    ("vispruner", {"budget": 58, "important_ratio": 0.5}),
                                    ("vispruner", {"budget": 7, "important_ratio": 0.75}),
                                    ("fastervlm", {"budget": 144}), ("fastervlm", {"budget": 29})])
def test_fixed_batch_equals_single_images(params):
    method, kw = params
    inp = make(3, 15, features="exact", dups=40, near=20)
    inp.feature_q[1, 0] = 0.0  # image 1: flat attention
    batch = compress(method, inp, variant="fixed", **kw)
    assert len(batch) == 3
    for b in range(3):
        single = compress(method, one(inp, b), variant="fixed", **kw)[0]
        assert torch.equal(batch[b].index, single.index) and torch.equal(batch[b].features, single.features)
    assert batch[0].index.tolist() != batch[2].index.tolist()


def test_reference_batch_rules():
    """PEERS.md: VisPruner's released LLM input assembly fails past sample 0 -> ValueError; FasterVLM runs per image."""
    inp = make(3, 16, features="exact")
    with pytest.raises(ValueError, match="batch"):
        compress("vispruner", inp, variant="reference", budget=128, important_ratio=0.5)
    outs = compress("fastervlm", inp, variant="reference", budget=144)
    for b in range(3):
        assert_selects(outs[b], inp, b, released_fast(inp, b, 144).kept)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("variant", ["reference", "fixed"])
def test_bad_arguments_are_value_errors(variant):
    inp = make(1, 17, features="exact")
    for method in ("vispruner", "fastervlm"):
        with pytest.raises(ValueError, match="budget"):
            compress(method, inp, variant=variant)  # budget is required
        for bad in (0, 577):
            with pytest.raises(ValueError, match="budget"):
                compress(method, inp, variant=variant, budget=bad)
        no_keys = VisionInputs(inp.hidden, None, None, feature_q=inp.feature_q, feature_k=None, num_heads=inp.num_heads)
        with pytest.raises(ValueError):
            compress(method, no_keys, variant=variant, budget=64)
        no_heads = VisionInputs(inp.hidden, None, None, feature_q=inp.feature_q, feature_k=inp.feature_k, num_heads=None)
        with pytest.raises(ValueError):
            compress(method, no_heads, variant=variant, budget=64)
        nan_q = inp.feature_q.clone()
        nan_q[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            compress(method, VisionInputs(inp.hidden, None, None, feature_q=nan_q, feature_k=inp.feature_k,
                                          num_heads=inp.num_heads), variant=variant, budget=64)
    for bad in (-0.1, 1.5):  # 0.0 is a released setting (T_imp = 0: all diverse)
        with pytest.raises(ValueError, match="important_ratio"):
            compress("vispruner", inp, variant=variant, budget=64, important_ratio=bad)
    with pytest.raises(ValueError, match="important_ratio"):
        compress("fastervlm", inp, variant=variant, budget=64, important_ratio=0.5)
