"""Method invariants: the key path uses the momentum encoder, no gradient reaches it, the queue is a FIFO,
and the method classes reduce to each other where docs/method.md says they do."""

import copy

import pytest
import timm
import torch

from scan_zoo.methods import SCAN, MoCo, SupCon
from scan_zoo.methods.blocks import LabeledQueue, update_momentum


def backbone():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=0)


def batch(B=6, seed=0, labels=None, groups=None):
    g = torch.Generator().manual_seed(seed)
    return {
        "views": [torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)],
        "index": torch.arange(B) * 3 + 1,
        "label": torch.as_tensor(labels if labels is not None else [i % 3 for i in range(B)]),
        "group": torch.as_tensor(groups if groups is not None else list(range(B))),
    }


def common(**kw):
    return dict(proj_dim=16, queue_size=20, temperature=0.2, key_momentum=0.9, **{"shuffle_bn": False, **kw})


@pytest.mark.parametrize("cls", [MoCo, SupCon, SCAN])
def test_no_gradient_reaches_the_key_encoder(cls):
    m = cls(backbone(), **common())
    m.train()
    out = m(batch())
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in m.encoder_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder_q.parameters())


@pytest.mark.parametrize("cls", [MoCo, SupCon, SCAN])
def test_keys_come_from_the_momentum_encoder(cls):
    m = cls(backbone(), **common())
    m.train()
    with torch.no_grad():  # make the two encoders clearly different
        for p in m.encoder_k.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    k_before = copy.deepcopy(m.encoder_k)
    q_before = copy.deepcopy(m.encoder_q)
    b = batch()
    m(b)
    # the momentum update happens first: theta_k <- m theta_k + (1 - m) theta_q
    update_momentum(q_before, k_before, 0.9)
    for p_got, p_want in zip(m.encoder_k.parameters(), k_before.parameters()):
        torch.testing.assert_close(p_got, p_want)
    expected = k_before(b["views"][1])  # same train-mode BN statistics
    B = len(b["index"])
    torch.testing.assert_close(m.queue.keys[:B], expected)
    from_query = q_before(b["views"][1])
    assert not torch.allclose(m.queue.keys[:B], from_query, atol=1e-3)
    assert torch.equal(m.queue.labels[:B], b["label"])
    assert int(m.queue.ptr) == B


def test_loss_depends_on_key_encoder_not_query_encoder_keys():
    """Changing only the key encoder changes the loss (so keys are really used)."""
    m = MoCo(backbone(), **common())
    m.eval()  # no state change during the two forwards
    b = batch()
    l1 = m(b)["loss"]
    with torch.no_grad():
        for p in m.encoder_k.parameters():
            p.mul_(1.5)
    l2 = m(b)["loss"]
    assert not torch.isclose(l1, l2)


def test_queue_is_a_fifo_with_wraparound():
    q = LabeledQueue(5, 2)
    for step in range(4):
        keys = torch.full((3, 2), float(step))
        q.push(keys, torch.full((3,), step))
    # 12 pushes into 5 slots: slots hold pushes 7..11 -> steps [3, 3, 2, 3, 2]? compute by hand
    expect = [None] * 5
    for n in range(12):
        expect[n % 5] = n // 3
    assert q.labels.tolist() == expect
    assert q.keys[:, 0].tolist() == [float(e) for e in expect]
    assert int(q.ptr) == 12 % 5


def test_scan_k0_equals_moco_model():
    """The SCAN class with K = 0 (unique groups) and in-batch negatives off gives MoCo's loss and updates."""
    moco = MoCo(backbone(), **common())
    scan = SCAN(backbone(), in_batch_negatives=False, **common())
    scan.load_state_dict(moco.state_dict())
    b = batch()
    lm, ls = moco(b)["loss"], scan(b)["loss"]
    torch.testing.assert_close(lm, ls, rtol=0, atol=0)
    torch.testing.assert_close(moco.queue.keys, scan.queue.keys, rtol=0, atol=0)


def test_scan_groups_as_classes_and_supcon_agree_with_label_blind_queue():
    """SCAN with pseudo-label = class equals SupCon when the queue carries no labels (all -1)."""
    sup = SupCon(backbone(), **common())
    scan = SCAN(backbone(), **common())
    scan.load_state_dict(sup.state_dict())
    labels = [0, 1, 0, 2, 1, 0]
    b = batch(labels=labels, groups=labels)
    torch.testing.assert_close(sup(b)["loss"], scan(b)["loss"])


def test_supcon_queue_entries_of_the_same_class_are_positives():
    sup = SupCon(backbone(), **common())
    sup.eval()
    b = batch(labels=[0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        sup.queue.labels[:] = -1
        l_blind = sup(b)["loss"]
        sup.queue.labels[:4] = 0
        l_labelled = sup(b)["loss"]
    assert not torch.isclose(l_blind, l_labelled)


def test_scan_negatives_denominator_differs_and_is_finite():
    a = SCAN(backbone(), denominator="all", **common())
    n = SCAN(backbone(), denominator="negatives", **common())
    n.load_state_dict(a.state_dict())
    b = batch(groups=[0, 0, 0, 1, 1, 1])
    la, ln = a(b)["loss"], n(b)["loss"]
    assert torch.isfinite(ln) and ln < la  # leaving positives out of the denominator lowers the loss


def test_single_process_split_bn_gives_each_image_its_own_key():
    """With BN in eval mode the batch composition cannot matter: shuffled sub-batch keys must equal plain keys,
    image by image (so the unshuffle is right); in train mode they differ (the statistics really are split)."""
    m = MoCo(backbone(), **common(shuffle_bn=True, key_bn_splits=2))
    x = batch(B=8)["views"][1]
    m.encoder_k.eval()
    torch.testing.assert_close(m._keys(x), m.encoder_k(x))
    m.encoder_k.train()
    assert not torch.allclose(m._keys(x), m.encoder_k(x), atol=1e-4)


def test_logits_are_float32_under_bf16_autocast(monkeypatch):
    import scan_zoo.methods.contrast as contrast

    seen = {}
    real = contrast.masked_info_nce

    def spy(logits, *a, **k):
        seen["dtype"] = logits.dtype
        return real(logits, *a, **k)

    monkeypatch.setattr(contrast, "masked_info_nce", spy)
    m = SCAN(backbone(), **common())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(batch())
    assert seen["dtype"] == torch.float32


def test_methods_fit_backbones_whose_pooled_width_is_not_num_features():
    """MobileNetV3 keeps a conv head with num_classes=0: its output is head_hidden_size wide, not num_features."""
    from types import SimpleNamespace

    from scan_zoo.methods import build_method
    from scan_zoo.models.backbones import create_backbone, pooled_dim

    backbone = create_backbone("mobilenetv3_small_050")
    assert pooled_dim(backbone) != backbone.num_features
    x = torch.randn(4, 3, 32, 32)
    assert backbone(x).shape == (4, pooled_dim(backbone))
    for method in ("supervised", "moco"):
        cfg = SimpleNamespace(
            method=method,
            proj_dim=16,
            queue_size=8,
            temperature=0.2,
            key_momentum=0.99,
            shuffle_bn=False,
            key_bn_splits=1,
            seed=0,
        )
        m = build_method(cfg, create_backbone("mobilenetv3_small_050"), num_classes=3)
        batch = {
            "views": [x, x.clone()],
            "label": torch.tensor([0, 1, 2, 0]),
            "index": torch.arange(4),
            "group": torch.arange(4),
        }
        assert torch.isfinite(m(batch)["loss"])


@pytest.mark.parametrize("cls", [MoCo, SCAN])
def test_the_queue_without_masks_gives_the_masked_loss(cls):
    """MoCo and SCAN hand the queue to the loss as negatives without [B, L] masks; the same model with
    explicit all-negative queue masks gives the same loss, gradients and queue."""

    class Masked(cls):
        def masks(self, batch, keys):
            pos_b, neg_b, _, _ = super().masks(batch, keys)
            pos_q = torch.zeros(len(pos_b), len(keys["queue_label"]), dtype=torch.bool)  # [B, L]
            return pos_b, neg_b, pos_q, ~pos_q

    fast, slow = cls(backbone(), **common()), Masked(backbone(), **common())
    slow.load_state_dict(fast.state_dict())
    b = batch(groups=[0, 0, 1, 1, 2, 2])
    lf, ls = fast(b)["loss"], slow(b)["loss"]
    torch.testing.assert_close(lf, ls)
    lf.backward()
    ls.backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(fast.queue.keys, slow.queue.keys, rtol=0, atol=0)
