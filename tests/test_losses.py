"""The shared masked InfoNCE against naive loops, and the degenerate cases docs/method.md pins."""

import pytest
import torch
import torch.nn.functional as F
from helpers import naive_info_nce

from scan_zoo.core.losses import contrast_masks, masked_info_nce, moco_info_nce


def naive_masked_info_nce(logits, pos, neg, denominator="all"):
    """Per anchor: positives from ``pos``, denominator = positives + negatives (or negatives only)."""
    B, M = logits.shape

    def anchor(i):
        P = [j for j in range(M) if pos[i, j]]
        N = [j for j in range(M) if neg[i, j]]
        return logits[i].tolist(), P, P + N if denominator == "all" else N

    return naive_info_nce(anchor(i) for i in range(B))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_masked_info_nce_matches_naive_loop(seed, denominator):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 9, (1,), generator=g))
    M = int(torch.randint(2, 20, (1,), generator=g))
    tau = float(torch.empty(1).uniform_(0.05, 1.0, generator=g))
    sims = torch.rand(B, M, generator=g) * 2 - 1
    logits = sims / tau
    pos = torch.rand(B, M, generator=g) < 0.3
    neg = (torch.rand(B, M, generator=g) < 0.7) & ~pos
    got = masked_info_nce(logits, pos, neg, denominator)
    want = naive_masked_info_nce(logits.double(), pos, neg, denominator)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_default_negatives_are_the_complement():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    pos = torch.rand(5, 7, generator=g) < 0.3
    assert torch.allclose(masked_info_nce(logits, pos), masked_info_nce(logits, pos, ~pos))


def test_anchor_without_positive_is_finite_and_ignored():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, generator=g, requires_grad=True)
    pos = torch.zeros(4, 6, dtype=torch.bool)
    pos[0, 1] = pos[2, 3] = True  # anchors 1 and 3 have no positive
    loss = masked_info_nce(logits, pos)
    assert torch.isfinite(loss)
    want = naive_masked_info_nce(logits.detach().double(), pos, ~pos)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[3] == 0)
    assert torch.isfinite(logits.grad).all()


def test_no_positive_at_all_gives_zero_with_a_graph():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = masked_info_nce(logits, torch.zeros(3, 5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_negatives_denominator_without_negatives_is_finite():
    logits = torch.randn(2, 3)
    pos = torch.ones(2, 3, dtype=torch.bool)
    loss = masked_info_nce(logits, pos, torch.zeros(2, 3, dtype=torch.bool), denominator="negatives")
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_overlapping_masks_are_refused():
    pos = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError):
        masked_info_nce(torch.zeros(2, 2), pos, pos)


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_scan_with_k0_and_no_in_batch_negatives_is_moco(tau):
    """Degenerate case K = 0: every slot is its own pseudo-class; in-batch negatives off -> MoCo exactly."""
    B, D, L = 6, 8, 11
    q, k, queue = _unit(B, D, seed=1), _unit(B, D, seed=2), _unit(L, D, seed=3)
    index = torch.arange(B) + 100
    group = torch.arange(B)  # K = 0: each anchor alone in its group
    pos_b, neg_b = contrast_masks(index, index, group, group, in_batch_negatives=False)
    logits = torch.cat([q @ k.T, q @ queue.T], 1) / tau
    pos = torch.cat([pos_b, torch.zeros(B, L, dtype=torch.bool)], 1)
    neg = torch.cat([neg_b, torch.ones(B, L, dtype=torch.bool)], 1)
    scan = masked_info_nce(logits, pos, neg)

    # MoCo as its paper/code writes it, computed independently in float64
    # (per anchor: logits [l_pos, l_neg(queue)...], the positive is slot 0, the denominator every slot)
    def anchor(i):
        row = [float(q[i] @ k[i]) / tau] + [float(q[i] @ z) / tau for z in queue]
        return row, [0], range(len(row))

    naive = naive_info_nce(anchor(i) for i in range(B))
    assert scan.item() == pytest.approx(naive, rel=1e-5)
    assert scan.item() == pytest.approx(moco_info_nce(q, k, queue, tau).item(), rel=1e-5)


def naive_supcon_out(q, k, labels, queue, queue_labels, tau):
    """Khosla et al.'s L_out with MoCo keys: for anchor i, positives = keys (batch and queue) of its class;
    denominator = all keys."""
    keys = torch.cat([k, queue]).double()
    key_labels = torch.cat([labels, queue_labels])

    def anchor(i):
        s = [float(q[i].double() @ kk) / tau for kk in keys]
        return s, [j for j in range(len(keys)) if key_labels[j] == labels[i]], range(len(keys))

    return naive_info_nce(anchor(i) for i in range(len(q)))


def test_scan_with_k_all_same_class_is_supcon():
    """Degenerate case K = infinity: pseudo-label = class -> SupCon L_out (with a label-blind queue)."""
    B, D, L, tau = 9, 8, 7, 0.1
    q, k, queue = _unit(B, D, seed=4), _unit(B, D, seed=5), _unit(L, D, seed=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    index = torch.arange(B)
    pos_b, neg_b = contrast_masks(index, index, labels, labels, in_batch_negatives=True)
    logits = torch.cat([q @ k.T, q @ queue.T], 1) / tau
    pos = torch.cat([pos_b, torch.zeros(B, L, dtype=torch.bool)], 1)
    got = masked_info_nce(logits, pos, ~pos)
    want = naive_supcon_out(q, k, labels, queue, torch.full((L,), -1), tau)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_same_image_twice_in_a_batch_is_a_positive():
    index = torch.tensor([5, 7, 5])
    group = torch.tensor([0, 1, 2])
    pos, neg = contrast_masks(index, index, group, group, True)
    assert pos[0, 2] and pos[2, 0] and not pos[0, 1]
    assert not (pos & neg).any()


@pytest.mark.parametrize("denominator", ["all", "negatives"])
@pytest.mark.parametrize("seed", range(4))
def test_a_queue_of_negatives_equals_its_columns_appended_with_masks(denominator, seed):
    """The fast path (``negatives=``, no [B, M + L] masks) against the masked loss over the concatenation:
    same value and same gradients, rows without a positive or without batch negatives included."""
    g = torch.Generator().manual_seed(seed)
    B, M, L = 7, 5, 40
    logits = (torch.randn(B, M, generator=g) * 3).requires_grad_()
    queue = (torch.randn(B, L, generator=g) * 3).requires_grad_()
    kind = torch.randint(0, 3, (B, M), generator=g)  # ignore / positive / negative
    kind[0] = 0  # an anchor with nothing in the batch part
    kind[1] = 2  # an anchor without a positive
    pos, neg = kind == 1, kind == 2
    fast = masked_info_nce(logits, pos, neg, denominator, negatives=queue)
    grads = torch.autograd.grad(fast, [logits, queue])
    ones, zeros = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    slow = masked_info_nce(
        torch.cat([logits, queue], 1), torch.cat([pos, zeros], 1), torch.cat([neg, ones], 1), denominator
    )
    want = torch.autograd.grad(slow, [logits, queue])
    torch.testing.assert_close(fast, slow)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref)
    # no positive anywhere: an exact zero that still has a gradient path; an empty queue changes nothing
    zero = masked_info_nce(logits, torch.zeros_like(pos), neg, denominator, negatives=queue)
    assert zero.item() == 0.0 and zero.requires_grad
    torch.testing.assert_close(
        masked_info_nce(logits, pos, neg, denominator, negatives=queue[:, :0]),
        masked_info_nce(logits, pos, neg, denominator),
    )
