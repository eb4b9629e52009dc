"""DSC (Dense Semantic Contrast): each dense function against a naive loop, the keys come from the momentum
encoder (a test that fails on the DenseCL example whose momentum copy is updated but never used), MoCo as
the degenerate case, config errors, and real runs: one process, two processes, the acceptance command."""

import copy
import math
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import BIN, COMMON, cfg_for, free_port, launch, model_state, naive_info_nce, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import scan_zoo.methods.dsc as dsc_module
from scan_zoo.common.errors import UserError
from scan_zoo.core.dense import (
    dense_correspondence,
    dense_info_nce,
    kmeans_pp_init,
    pixel_supcon,
    sinkhorn,
    spherical_kmeans,
    swapped_prediction,
)
from scan_zoo.methods import DSC, MoCo, num_views
from scan_zoo.methods.blocks import update_momentum
from scan_zoo.methods.dsc import resolve_feature_layer
from scan_zoo.train.config import build_config


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ------------------------------------------------------------------------------- pure functions vs loops
@pytest.mark.parametrize("topk", [1, 3])
def test_correspondence_is_the_most_similar_key_pixel(topk):
    g = torch.Generator().manual_seed(1)
    f_q, f_k = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 2, 3, generator=g)  # H*W = 12, H'*W' = 6
    got = dense_correspondence(f_q, f_k, topk)
    assert got.shape == (2, 12, topk) and got.dtype == torch.int64
    for b in range(2):
        for i in range(12):
            qv = [f_q[b, c, i // 4, i % 4].item() for c in range(5)]
            sims = []
            for j in range(6):
                kv = [f_k[b, c, j // 3, j % 3].item() for c in range(5)]
                dot = sum(a * c for a, c in zip(qv, kv))
                sims.append(dot / math.sqrt(sum(a * a for a in qv)) / math.sqrt(sum(c * c for c in kv)))
            want = sorted(range(6), key=lambda j: -sims[j])[:topk]
            assert got[b, i].tolist() == want


def naive_dense_info_nce(q, k, match, queue, t):
    """Per pixel (b, n): positives = its matched key pixels, denominator = those and the queue."""

    def anchor(b, n):
        pos = [float(q[b, n] @ k[b, j]) / t for j in match[b, n].tolist()]
        row = pos + [float(q[b, n] @ z) / t for z in queue]
        return row, range(len(pos)), range(len(row))

    return naive_info_nce(anchor(b, n) for b in range(q.shape[0]) for n in range(q.shape[1]))


@pytest.mark.parametrize("topk", [1, 2])
def test_dense_info_nce_matches_a_loop(topk):
    q, k, queue = unit(3, 4, 8, seed=1), unit(3, 6, 8, seed=2), unit(10, 8, seed=3)
    match = torch.stack(
        [torch.randperm(6, generator=torch.Generator().manual_seed(i))[:topk] for i in range(12)]
    ).reshape(3, 4, topk)
    got = dense_info_nce(q, k, match, queue, 0.2)
    assert got.item() == pytest.approx(
        naive_dense_info_nce(q.double(), k.double(), match, queue.double(), 0.2), rel=1e-5
    )


def test_dense_info_nce_with_one_match_is_densecl_loss():
    """topk = 1: cross-entropy over [l_pos, l_neg(queue)] per pixel, DenseCL's form."""
    q, k, queue = unit(2, 5, 8, seed=4), unit(2, 5, 8, seed=5), unit(7, 8, seed=6)
    match = dense_correspondence(q.transpose(1, 2).reshape(2, 8, 5, 1), k.transpose(1, 2).reshape(2, 8, 5, 1))
    k_pos = torch.gather(k, 1, match.expand(-1, -1, 8))  # [2, 5, 8]
    l_pos = (q * k_pos).sum(-1).reshape(-1, 1)
    l_neg = q.reshape(-1, 8) @ queue.T
    ce = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / 0.2, torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(dense_info_nce(q, k, match, queue, 0.2), ce)


def naive_kmeans(points, k, iters, init):
    """Lists and loops: cosine assignment (first best on ties), normalised mean update, empty cluster stays."""

    def norm(v):
        s = math.sqrt(sum(a * a for a in v))
        return [a / s for a in v]

    pts = [norm(p) for p in points]
    cents = [list(pts[i]) for i in init]

    def assign():
        out = []
        for p in pts:
            sims = [sum(a * c for a, c in zip(p, cen)) for cen in cents]
            out.append(max(range(k), key=lambda j: (sims[j], -j)))
        return out

    for _ in range(iters):
        a = assign()
        for j in range(k):
            members = [p for p, c in zip(pts, a) if c == j]
            if members:
                cents[j] = norm([sum(col) for col in zip(*members)])
    return assign(), cents


@pytest.mark.parametrize("iters", [0, 1, 5])
def test_kmeans_matches_a_loop(iters):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(iters)).double()
    init = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:5]
    got, cents = spherical_kmeans(x, 5, iters, torch.Generator(), init=init)
    want, want_c = naive_kmeans(x.tolist(), 5, iters, init.tolist())
    assert got.tolist() == want
    torch.testing.assert_close(cents, torch.tensor(want_c, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_kmeans_pp_init_matches_a_loop():
    x = unit(30, 5, seed=11)
    got = kmeans_pp_init(x, 6, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    rows = [[float(v) for v in r] for r in x.double()]
    chosen = [int(torch.randint(30, (1,), generator=g))]
    for _ in range(5):
        w = [
            0.0 if i in chosen else max(0.0, min(2 - 2 * sum(a * b for a, b in zip(rows[i], rows[c])) for c in chosen))
            for i in range(30)
        ]
        chosen.append(int(torch.multinomial(torch.tensor(w, dtype=torch.float64), 1, generator=g)))
    assert got.tolist() == chosen and len(set(chosen)) == 6
    same = torch.ones(8, 4) / 2  # every point identical: distinct rows all the same
    assert sorted(kmeans_pp_init(same, 8, torch.Generator().manual_seed(0)).tolist()) == list(range(8))


def test_kmeans_finds_separated_groups_and_is_fixed_by_its_generator():
    centres = unit(3, 16, seed=8) * 10
    x = torch.cat(
        [centres[i] + 0.1 * torch.randn(20, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    )
    a1, _ = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(0))
    a2, _ = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(a1, a2)
    groups = [set(a1[i * 20 : (i + 1) * 20].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    with pytest.raises(ValueError):
        spherical_kmeans(x, 61, 1, torch.Generator())


def naive_sinkhorn(scores, eps, iters):
    n, k = len(scores), len(scores[0])
    top = max(max(r) for r in scores)
    q = [[math.exp((v - top) / eps) for v in row] for row in scores]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        cols = [sum(q[i][j] for i in range(n)) for j in range(k)]
        q = [[q[i][j] / cols[j] / k for j in range(k)] for i in range(n)]
        rows = [sum(r) for r in q]
        q = [[q[i][j] / rows[i] / n for j in range(k)] for i in range(n)]
    return [[v * n for v in row] for row in q]


def test_sinkhorn_matches_a_loop_and_balances():
    scores = unit(30, 8, seed=9) @ unit(4, 8, seed=10).T  # [30, 4]
    got = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(
        got, torch.tensor(naive_sinkhorn(scores.double().tolist(), 0.05, 3), dtype=torch.float32), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(got.sum(1), torch.ones(30))
    many = sinkhorn(scores, 0.05, 200)
    torch.testing.assert_close(many.sum(0), torch.full((4,), 30 / 4), rtol=1e-3, atol=1e-3)  # equipartition


def naive_supcon(a, k, ya, yk, t):
    """Per anchor: positives = keys of its class, denominator = every key; anchors without one skipped."""

    def anchor(i):
        return (
            [float(a[i] @ k[j]) / t for j in range(len(k))],
            [j for j in range(len(k)) if ya[i] == yk[j]],
            range(len(k)),
        )

    return naive_info_nce(anchor(i) for i in range(len(a)))


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(s=st.integers(1, 6), t=st.integers(1, 9), k=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_pixel_supcon_matches_a_loop(s, t, k, seed):
    g = torch.Generator().manual_seed(seed)
    a, keys = unit(s, 5, seed=seed), unit(t, 5, seed=seed + 1)
    ya, yk = torch.randint(0, k, (s,), generator=g), torch.randint(0, k, (t,), generator=g)
    got = pixel_supcon(a, keys, ya, yk, 0.1)
    want = (
        naive_supcon(a.double(), keys.double(), ya.tolist(), yk.tolist(), 0.1)
        if any(y in yk.tolist() for y in ya.tolist())
        else 0.0
    )
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_swapped_prediction_matches_a_loop():
    logits, codes = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    want = (
        -sum(
            sum(
                codes[i, j].item() * (logits[i, j].item() - math.log(sum(math.exp(v) for v in logits[i].tolist())))
                for j in range(3)
            )
            for i in range(4)
        )
        / 4
    )
    assert swapped_prediction(logits, codes).item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------ the method
def backbone(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=0)


def batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "views": [torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)],
        "index": torch.arange(B) * 3 + 1,
        "label": torch.arange(B) % 3,
        "group": torch.arange(B),
    }


def make(assign="kmeans", weights=(1.0, 1.0, 1.0), **kw):
    args = dict(
        proj_dim=16,
        dense_dim=16,
        queue_size=20,
        temperature=0.2,
        key_momentum=0.9,
        shuffle_bn=False,
        clusters=4,
        pixel_samples=40,
        assign=assign,
        weights=weights,
    )
    args.update(kw)
    return DSC(backbone(), feature_layer=2, **args)


def test_feature_layer_default_and_errors():
    bb = backbone()
    assert resolve_feature_layer(bb, 32, None) == 2  # layer2, 4x4: the last map (layer4) is 1x1 at 32 px
    assert resolve_feature_layer(bb, 16, None) == 1  # layer1, 4x4 at 16 px
    assert resolve_feature_layer(bb, 128, None) == 4  # the last map once it is 4x4
    assert resolve_feature_layer(bb, 32, -3) == 2
    with pytest.raises(UserError, match="1x1 at image_size 32"):
        resolve_feature_layer(bb, 32, -1)
    with pytest.raises(UserError, match="out of range"):
        resolve_feature_layer(bb, 32, 5)
    with pytest.raises(UserError, match="4x4 or larger"):
        resolve_feature_layer(bb, 4, None)
    r50 = timm.create_model("resnet50", num_classes=0)
    assert resolve_feature_layer(r50, 224, None) == len(r50.feature_info) - 1  # DSC's choice: the last map


def test_pooled_path_is_the_backbones_own():
    m = make()
    m.eval()
    x = batch()["views"][0]
    g, d, feats = m.encoder_q(x)
    torch.testing.assert_close(g, F.normalize(m.encoder_q.head(m.backbone(x)), dim=1))
    assert d.shape == (6, 16, 4, 4) and feats.shape == (6, 48, 4, 4)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(6, 4, 4))


def test_dense_weights_zero_is_moco_exactly():
    dsc = make(weights=(1.0, 0.0, 0.0))
    moco = MoCo(backbone(), proj_dim=16, queue_size=20, temperature=0.2, key_momentum=0.9, shuffle_bn=False)
    state = dsc.state_dict()
    moco.load_state_dict({k: state[k] for k in moco.state_dict()})
    b = batch()
    out_d, out_m = dsc(b), moco(b)
    torch.testing.assert_close(out_d["loss"], out_m["loss"])
    torch.testing.assert_close(out_d["loss_instance"], out_m["loss"].detach())
    torch.testing.assert_close(dsc.queue.keys, moco.queue.keys)
    for (n, p_d), p_m in zip(dsc.encoder_k.backbone.named_parameters(), moco.encoder_k.backbone.parameters()):
        torch.testing.assert_close(p_d, p_m, msg=n)


@pytest.mark.parametrize("assign", ["kmeans", "prototypes"])
def test_gradients_reach_every_query_parameter_and_never_the_key_encoder(assign):
    m = make(assign)
    m.train()
    out = m(batch())
    assert {"loss", "loss_instance", "loss_pixel", "loss_category", "clusters"} <= set(out)
    assert ("loss_prototype" in out) == (assign == "prototypes")
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in m.encoder_k.parameters())
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs every trained parameter used
    # (timm zero-initialises each block's last BN scale, so a block's first conv gets no gradient at step 0)
    for name in (
        "dense_head.conv1.weight",
        "head.fc1.weight",
        "backbone.conv1.0.weight",
        "backbone.layer2.0.bn2.weight",
        "backbone.layer4.0.bn2.weight",
    ):
        assert m.encoder_q.get_parameter(name).grad.abs().sum() > 0, name
    if assign == "prototypes":
        assert m.prototypes.grad.abs().sum() > 0


SPIED = ("spherical_kmeans", "dense_correspondence", "sinkhorn")


def spy(monkeypatch):
    """Record the arguments DSC passes to the clustering and correspondence functions."""
    seen = {}
    for name in SPIED:
        real = getattr(dsc_module, name)

        def wrapper(*a, _real=real, _name=name, **k):
            seen[_name] = [t.detach().clone() if torch.is_tensor(t) else t for t in a]
            return _real(*a, **k)

        monkeypatch.setattr(dsc_module, name, wrapper)
    return seen


def key_side(model, b, monkeypatch):
    """Everything DSC derives from the key view in one training step: the instance and dense queue entries,
    the clustering input and the key-side features of the correspondence; and the loss."""
    seen = spy(monkeypatch)
    out = model(b)
    B = len(b["index"])
    cluster_input = seen["spherical_kmeans"][0] if "spherical_kmeans" in seen else seen["sinkhorn"][0]
    return {
        "queue": model.queue.keys[:B].clone(),
        "dense_queue": model.dense_queue.keys[:B].clone(),
        "clustered": cluster_input,
        "correspondence_keys": seen["dense_correspondence"][1],
    }, out["loss"]


def key_sources(model, monkeypatch):
    """(keys change with the query encoder alone, keys change with the key encoder alone), with m = 1 so the
    momentum step moves nothing and each encoder can be perturbed on its own."""
    model.key_momentum = 1.0
    model.train()
    b = batch()

    def perturbed(which):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in getattr(m, which).parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        return key_side(m, b, monkeypatch)

    base, loss0 = key_side(copy.deepcopy(model), b, monkeypatch)
    by_q, loss_q = perturbed("encoder_q")
    by_k, _ = perturbed("encoder_k")
    assert not torch.isclose(loss0, loss_q)  # the query perturbation was real
    changed_by_q = {n: not torch.equal(base[n], by_q[n]) for n in base}
    changed_by_k = {n: not torch.allclose(base[n], by_k[n], atol=1e-4) for n in base}
    return changed_by_q, changed_by_k


@pytest.mark.parametrize("assign", ["kmeans", "prototypes"])
def test_every_key_comes_from_the_momentum_encoder(assign, monkeypatch):
    changed_by_q, changed_by_k = key_sources(make(assign), monkeypatch)
    assert not any(changed_by_q.values()), changed_by_q  # the query encoder does not touch any key
    assert all(changed_by_k.values()), changed_by_k  # the key encoder makes every one of them


class DenseCLExampleBug(DSC):
    """The widely copied DenseCL example's bug: the momentum copy is updated every step but the keys are
    computed by the query encoder."""

    @torch.no_grad()
    def _keys(self, x):
        return self.encoder_q(x)


def test_the_key_source_test_catches_the_densecl_example_bug(monkeypatch):
    m = DenseCLExampleBug(
        backbone(),
        feature_layer=2,
        proj_dim=16,
        dense_dim=16,
        queue_size=20,
        shuffle_bn=False,
        clusters=4,
        pixel_samples=40,
    )
    changed_by_q, changed_by_k = key_sources(m, monkeypatch)
    assert all(changed_by_q.values()) and not any(changed_by_k.values())  # what the test above rejects


def test_a_step_moves_the_key_encoder_by_the_momentum_rule_and_keys_are_its_outputs(monkeypatch):
    m = make()
    m.train()
    with torch.no_grad():  # make the two encoders clearly different
        for p in m.encoder_k.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    q_before, k_expected = copy.deepcopy(m.encoder_q), copy.deepcopy(m.encoder_k)
    update_momentum(q_before, k_expected, 0.9)  # theta_k <- m theta_k + (1 - m) theta_q, before the keys
    b = batch()
    got, _ = key_side(m, b, monkeypatch)
    for p_got, p_want in zip(m.encoder_k.parameters(), k_expected.parameters()):
        torch.testing.assert_close(p_got, p_want)
    k, k_dense, f_k = k_expected(b["views"][1])  # train-mode BN, same batch: the same statistics
    torch.testing.assert_close(got["queue"], k)
    torch.testing.assert_close(got["dense_queue"], F.normalize(k_dense.flatten(2).mean(2), dim=1))
    torch.testing.assert_close(got["clustered"], k_dense.flatten(2).transpose(1, 2).reshape(-1, 16))
    torch.testing.assert_close(got["correspondence_keys"], f_k)
    q_k, _, _ = q_before(b["views"][1])
    assert not torch.allclose(got["queue"], q_k, atol=1e-3)


def test_each_term_depends_on_the_key_encoder():
    """Eval mode (no state change): scaling the key encoder's weights changes every term of the loss."""
    m = make()
    m.eval()
    b = batch()
    before = m(b)
    with torch.no_grad():
        for p in m.encoder_k.parameters():
            p.mul_(1.5)
    after = m(b)
    for term in ("loss_instance", "loss_pixel", "loss_category"):
        assert not torch.isclose(before[term], after[term]), term


def test_losses_are_float32_and_finite_under_bf16_autocast():
    m = make("prototypes")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_config_fields_and_errors():
    cfg = build_config({"method": "dsc"})
    assert num_views("dsc") == 2 and cfg.group_size == 1 and cfg.dsc_assign == "kmeans"
    for bad, needle in (
        ({"dsc_assign": "spectral"}, "dsc_assign"),
        ({"dsc_clusters": 1}, "dsc_clusters"),
        ({"dsc_weight_pixel": -1}, "loss weights"),
        ({"dsc_pixel_samples": 0}, "dsc_pixel_samples"),
        ({"dsc_weight_instance": 0, "dsc_weight_pixel": 0, "dsc_weight_category": 0}, "not all 0"),
        ({"dsc_sinkhorn_eps": 0}, "dsc_sinkhorn_eps"),
        ({"dsc_topk": 0}, "dsc_topk"),
    ):
        with pytest.raises(UserError, match=needle):
            build_config({"method": "dsc", **bad})


# ---------------------------------------------------------------------------------------- training runs
def test_train_resume_exact_and_export_loads_strictly(tiny_data, tmp_path):
    from scan_zoo.experiments.pipeline import run_training

    kw = dict(method="dsc", max_steps=3, dsc_clusters=4, dsc_pixel_samples=32)
    full = run_training(cfg_for(tiny_data, tmp_path / "full", **kw))
    assert full["finished"]
    run_training(cfg_for(tiny_data, tmp_path / "part", stop_after_steps=2, **kw))
    run_training(cfg_for(tiny_data, tmp_path / "part", resume="latest", **kw))
    a, b = model_state(tmp_path / "full"), model_state(tmp_path / "part")
    assert {"dense_queue.keys", "dense_queue.ptr", "encoder_k.dense_head.conv1.weight"} <= a.keys()
    assert int(a["dense_queue.ptr"]) == 3 * 8 % 16
    assert all(torch.equal(a[k], b[k]) for k in a)  # k-means and pixel sampling are seeded by step: exact
    weights = load_file(full["weights"])
    model = timm.create_model("test_resnet", num_classes=0)
    model.load_state_dict(weights, strict=True)  # the backbone alone, plain timm keys
    from scan_zoo.models.loading import load_backbone
    from scan_zoo.train.checkpoints import list_checkpoints

    from_ckpt, _ = load_backbone(str(list_checkpoints(tmp_path / "full")[-1]))  # dense head, queues dropped
    assert all(torch.equal(from_ckpt.state_dict()[k], weights[k]) for k in weights)
    import json

    rows = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss_instance", "loss_pixel", "loss_category", "clusters"} <= row.keys() for row in rows)


def test_prototype_run_with_topk(tiny_data, tmp_path):
    from scan_zoo.experiments.pipeline import run_training

    r = run_training(
        cfg_for(
            tiny_data,
            tmp_path / "pm",
            method="dsc",
            max_steps=2,
            dsc_assign="prototypes",
            dsc_topk=2,
            dsc_clusters=4,
            dsc_queue_size=12,
        )
    )
    assert r["finished"]
    assert model_state(tmp_path / "pm")["prototypes"].shape == (4, 128)


def _worker(rank, world, port, out):
    """Half of one batch per process, eval mode (BatchNorm per image): the gathered clustering input, the
    clusters and the instance and pixel losses must be what one process computes on the whole batch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seen = {}
    real = dsc_module.spherical_kmeans

    def spy_kmeans(x, *a, **k):
        res = real(x, *a, **k)
        seen["x"], seen["assign"] = x.clone(), res[0].clone()
        return res

    dsc_module.spherical_kmeans = spy_kmeans
    m = make(shuffle_bn=True)
    m.eval()
    b = batch(B=8)
    half = {
        k: ([t[rank * 4 : (rank + 1) * 4] for t in v] if k == "views" else v[rank * 4 : (rank + 1) * 4])
        for k, v in b.items()
    }
    o = m(half)
    torch.save(
        {"x": seen["x"], "assign": seen["assign"], "inst": o["loss_instance"], "pix": o["loss_pixel"]},
        os.path.join(out, f"r{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_processes_cluster_the_global_batch_alike(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    seen = spy(monkeypatch)
    m = make(shuffle_bn=True)
    m.eval()
    one = m(batch(B=8))
    single_x = seen["spherical_kmeans"][0]
    for i in range(2):
        torch.testing.assert_close(r[i]["x"], single_x)
        assert torch.equal(r[i]["assign"], r[0]["assign"])
    assert torch.equal(r[0]["assign"], spherical_kmeans(single_x, 4, 10, m._generator(1))[0])
    torch.testing.assert_close((r[0]["inst"] + r[1]["inst"]) / 2, one["loss_instance"])
    torch.testing.assert_close((r[0]["pix"] + r[1]["pix"]) / 2, one["loss_pixel"])


def test_two_process_dsc_run(tiny_data, tmp_path):
    p = launch(
        [
            "--method",
            "dsc",
            "--data",
            str(tiny_data),
            "--batch-size",
            "8",
            "--queue-size",
            "40",
            "--dsc-clusters",
            "4",
            "--dsc-pixel-samples",
            "32",
            "--max-steps",
            "3",
            "--output-dir",
            str(tmp_path / "dsc"),
            *COMMON,
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ckpts = sorted((tmp_path / "dsc" / "checkpoints").glob("step_*"))
    ck = load_file(str(ckpts[-1] / "model.safetensors"))
    assert int(ck["queue.ptr"]) == int(ck["dense_queue.ptr"]) == (3 * 16) % 40  # both processes' keys, each step
    weights = load_file(str(tmp_path / "dsc" / "model.safetensors"))
    timm.create_model("test_resnet", num_classes=0).load_state_dict(weights, strict=True)


def test_accelerate_launch_dsc_on_the_digits_default(digits_root, tmp_path):
    """The acceptance command: `accelerate launch train.py --method dsc --max-steps 5` (digits, every default)."""
    env = {"SCAN_ZOO_CACHE": str(Path(digits_root).parent)}
    p = run_cli(
        [
            str(BIN / "accelerate"),
            "launch",
            "--num_processes",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "train.py",
            "--method",
            "dsc",
            "--max-steps",
            "5",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "exported backbone" in p.stdout
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    timm.create_model("test_resnet", num_classes=0).load_state_dict(weights, strict=True)
