"""Property-based tests (hypothesis): the loss and the neighbour mining against naive references.

Random shapes, masks and labels, rows without positives, duplicate images, classes of one image and
K larger than a class. Every reference is a deliberately naive loop in float64.
"""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import naive_info_nce
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scan_zoo.core.losses import contrast_masks, masked_info_nce, moco_info_nce
from scan_zoo.core.neighbors import mine_neighbors
from scan_zoo.methods.moco import MoCo
from scan_zoo.methods.scan import SCAN

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ the loss
def naive_masked_info_nce(logits, pos, neg, denominator="all"):
    """Per anchor: positives from ``pos``, denominator = positives + negatives (or negatives only)."""

    def anchor(i):
        P = [j for j in range(len(logits[i])) if pos[i][j]]
        N = [j for j in range(len(logits[i])) if neg[i][j]]
        return logits[i], P, P + N if denominator == "all" else N

    return naive_info_nce(anchor(i) for i in range(len(logits)))


@st.composite
def logits_and_masks(draw, max_b=8, max_m=12):
    """``[B, M]`` logits (as if divided by a temperature) and disjoint positive / negative masks.

    Each entry is ignored, positive or negative; whole rows without a positive (or without a negative)
    come up often.
    """
    b = draw(st.integers(1, max_b))
    m = draw(st.integers(1, max_m))
    values = draw(st.lists(st.floats(-30.0, 30.0, allow_nan=False, width=32), min_size=b * m, max_size=b * m))
    kinds = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=b * m, max_size=b * m))  # ignore / pos / neg
    no_pos_rows = draw(st.sets(st.integers(0, b - 1), max_size=b))
    logits = torch.tensor(values, dtype=torch.float32).reshape(b, m)
    kind = torch.tensor(kinds).reshape(b, m)
    for r in no_pos_rows:
        kind[r][kind[r] == 1] = 2
    return logits, kind == 1, kind == 2


@SETTINGS
@given(data=logits_and_masks(), denominator=st.sampled_from(["all", "negatives"]))
def test_masked_info_nce_equals_a_naive_loop(data, denominator):
    logits, pos, neg = data
    logits = logits.clone().requires_grad_(True)
    got = masked_info_nce(logits, pos, neg, denominator)
    want = naive_masked_info_nce(logits.detach().double().tolist(), pos.tolist(), neg.tolist(), denominator)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-4)
    got.backward()
    assert torch.isfinite(logits.grad).all()
    # anchors that contribute nothing get no gradient; ignored entries never get one
    den = (pos | neg) if denominator == "all" else neg
    silent = ~(pos.any(1) & den.any(1))
    assert torch.all(logits.grad[silent] == 0)
    assert torch.all(logits.grad[~(pos | den)] == 0)


@SETTINGS
@given(data=logits_and_masks(), shift=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_masked_info_nce_ignores_row_shifts_and_column_order(data, shift, seed):
    logits, pos, neg = data
    base = masked_info_nce(logits, pos, neg)
    assert masked_info_nce(logits + shift, pos, neg).item() == pytest.approx(base.item(), rel=1e-4, abs=1e-3)
    perm = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(seed))
    assert masked_info_nce(logits[:, perm], pos[:, perm], neg[:, perm]).item() == pytest.approx(
        base.item(), rel=1e-5, abs=1e-5
    )
    assert base.item() >= -1e-6  # with positives in the denominator every term is -log(p), p <= 1


def unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@SETTINGS
@given(
    b=st.integers(1, 9),
    d=st.integers(1, 9),
    length=st.integers(1, 20),
    tau=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_scan_at_k0_without_in_batch_negatives_is_moco(b, d, length, tau, seed):
    """docs/method.md's degenerate case, through the masks SCAN really builds: each slot its own pseudo-class."""
    q, k, queue = unit_rows(b, d, seed), unit_rows(b, d, seed + 1), unit_rows(length, d, seed + 2)
    index = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))[:b]  # distinct images
    batch = {"index": index, "group": torch.arange(b)}
    keys = {"index": index, "group": torch.arange(b), "queue_label": torch.full((length,), -1)}
    scan = types.SimpleNamespace(in_batch_negatives=False)
    pos_b, neg_b, pos_q, neg_q = SCAN.masks(scan, batch, keys)
    assert pos_q is None and neg_q is None  # the queue: negatives of every query, handed over without masks
    got = masked_info_nce(q @ k.T / tau, pos_b, neg_b, negatives=q @ queue.T / tau)
    naive = 0.0
    for i in range(b):
        l_pos = float(q[i].double() @ k[i].double()) / tau
        l_neg = [float(q[i].double() @ z.double()) / tau for z in queue]
        naive -= l_pos - math.log(math.exp(l_pos) + sum(math.exp(x) for x in l_neg))
    assert got.item() == pytest.approx(naive / b, rel=1e-4, abs=1e-5)
    assert got.item() == pytest.approx(moco_info_nce(q, k, queue, tau).item(), rel=1e-4, abs=1e-5)
    # and the masks are MoCo's own
    for a, m in zip((pos_b, neg_b, pos_q, neg_q), MoCo.masks(None, batch, keys)):
        assert (a is None and m is None) or torch.equal(a, m)


@st.composite
def slots(draw):
    """Batch slots with repeated images and repeated groups: ``(index [Bq], group [Bq], index_k, group_k)``."""
    bq = draw(st.integers(1, 10))
    bk = draw(st.integers(1, 10))
    ints = st.integers(0, 5)
    return tuple(torch.tensor(draw(st.lists(ints, min_size=n, max_size=n))) for n in (bq, bq, bk, bk))


@SETTINGS
@given(s=slots(), use_groups=st.booleans(), in_batch_negatives=st.booleans())
def test_contrast_masks_equal_their_definition(s, use_groups, in_batch_negatives):
    iq, gq, ik, gk = s
    if not use_groups:
        gq = gk = None
    pos, neg = contrast_masks(iq, ik, gq, gk, in_batch_negatives)
    assert pos.shape == neg.shape == (len(iq), len(ik)) and pos.dtype == neg.dtype == torch.bool
    for i in range(len(iq)):
        for j in range(len(ik)):
            same = iq[i] == ik[j] or (use_groups and gq[i] == gk[j])
            assert pos[i, j] == same
            assert neg[i, j] == (in_batch_negatives and not same)
    assert not (pos & neg).any()


@SETTINGS
@given(s=slots(), in_batch_negatives=st.booleans())
def test_contrast_masks_of_a_batch_against_itself(s, in_batch_negatives):
    """Queries and keys of the same slots: every slot is its own positive, and 'positive' is symmetric."""
    index, group, _, _ = s
    pos, neg = contrast_masks(index, index, group, group, in_batch_negatives)
    assert pos.diagonal().all()
    assert torch.equal(pos, pos.T) and torch.equal(neg, neg.T)
    if in_batch_negatives:
        assert torch.equal(pos | neg, torch.ones_like(pos))
    else:
        assert not neg.any()


# ---------------------------------------------------------------------------------------- the mining
TOL = 1e-5


def brute_force_sims(features, labels):
    """Eq. 2-4 over all pairs, float64: ``Sim [N, N]`` with -inf where j = i or another class."""
    a = F.normalize(features.double(), dim=1)
    sim = (a @ a.T + 1) / 2
    n = len(labels)
    for i in range(n):
        for j in range(n):
            if i == j or labels[i] != labels[j]:
                sim[i, j] = float("-inf")
    return sim


@st.composite
def mining_inputs(draw):
    """Small integer features (so duplicates, parallel and zero vectors come up), labels with classes of
    one image, a K that may exceed a class, and a chunk size."""
    n = draw(st.integers(1, 24))
    d = draw(st.integers(1, 4))
    base = draw(st.lists(st.lists(st.integers(-2, 2), min_size=d, max_size=d), min_size=n, max_size=n))
    feats = torch.tensor(base, dtype=torch.float32)
    dups = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=4))
    for src, dst in dups:  # the same image twice
        feats[dst] = feats[src]
    labels = torch.tensor(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)))
    k = draw(st.integers(1, 6))
    chunk = draw(st.integers(1, n + 1))
    return feats, labels, k, chunk


@SETTINGS
@given(inputs=mining_inputs())
def test_mining_equals_brute_force(inputs):
    feats, labels, k, chunk = inputs
    idx, sim = mine_neighbors(feats, labels, k, chunk=chunk)
    assert idx.shape == sim.shape == (len(labels), k) and idx.dtype == torch.long
    ref = brute_force_sims(feats, labels)
    for i in range(len(labels)):
        row = ref[i]
        cands = [j for j in range(len(labels)) if row[j] > float("-inf")]  # same class, j != i
        want = sorted((float(row[j]) for j in cands), reverse=True)
        n_valid = int((idx[i] >= 0).sum())
        # -1 / 0 padding only at the end, and only where the class is too small (or Sim ~ 0, antipodal)
        assert torch.all(idx[i, n_valid:] == -1) and torch.all(sim[i, n_valid:] == 0)
        assert n_valid <= min(k, len(cands))
        assert n_valid >= min(k, len([s for s in want if s > TOL]))
        chosen = idx[i, :n_valid].tolist()
        assert len(set(chosen)) == n_valid and i not in chosen
        for r, j in enumerate(chosen):
            assert labels[j] == labels[i]
            assert abs(float(row[j]) - float(sim[i, r])) < TOL  # the similarity reported is j's
            assert abs(want[r] - float(sim[i, r])) < TOL  # and the r-th best there is
        # without near-ties the table is the brute force's exactly (ties: lower index first)
        top = sorted(cands, key=lambda j: (-float(row[j]), j))[:n_valid]
        gaps = [want[r] - want[r + 1] for r in range(min(len(want) - 1, n_valid))]
        if all(g > TOL for g in gaps) and all(s > TOL for s in want[:n_valid]):
            assert chosen == top


@SETTINGS
@given(n=st.integers(1, 12), k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_every_image_alone_in_its_class_has_no_neighbour(n, k, seed):
    feats = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    idx, sim = mine_neighbors(feats, torch.arange(n) * 3 + 1, k)  # non-contiguous class ids
    assert torch.all(idx == -1) and torch.all(sim == 0)


@SETTINGS
@given(n=st.integers(2, 12), copies=st.integers(2, 4), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_copies_of_an_image_are_each_others_nearest(n, copies, k, seed):
    """A class whose first ``copies`` images are the same picture: those copies come first, Sim_A = 1."""
    feats = torch.randn(n + copies, 5, generator=torch.Generator().manual_seed(seed))
    feats[1:copies] = feats[0]
    idx, sim = mine_neighbors(feats, torch.zeros(n + copies, dtype=torch.long), k)
    for i in range(copies):
        want = [j for j in range(copies) if j != i][:k]
        assert idx[i, : len(want)].tolist() == want  # ties broken by the lower index
        assert torch.allclose(sim[i, : len(want)], torch.ones(len(want)), atol=1e-6)


@SETTINGS
@given(
    axes=st.lists(st.tuples(st.integers(0, 2), st.sampled_from([-3, -1, 1, 2])), min_size=1, max_size=16),
    labels=st.lists(st.integers(0, 2), min_size=16, max_size=16),
    k=st.integers(1, 5),
)
def test_exact_ties_and_opposite_images(axes, labels, k):
    """Features along the axes: Sim is exactly 1 (same direction), 1/2 (orthogonal) or 0 (opposite).

    Exact ties go to the lower index, and an opposite image (Sim = 0) is never a neighbour (Eq. 4).
    """
    feats = torch.zeros(len(axes), 3)
    for i, (axis, value) in enumerate(axes):
        feats[i, axis] = value
    labels = torch.tensor(labels[: len(axes)])
    idx, sim = mine_neighbors(feats, labels, k)
    ref = brute_force_sims(feats, labels)
    for i in range(len(axes)):
        ranked = sorted((j for j in range(len(axes)) if ref[i, j] > 0), key=lambda j: (-float(ref[i, j]), j))[:k]
        want = ranked + [-1] * (k - len(ranked))
        assert idx[i].tolist() == want
        assert sim[i].tolist() == [float(ref[i, j]) for j in ranked] + [0.0] * (k - len(ranked))
