"""Stage 1: per-class mining equals a brute-force N x N reference; tables carry and check provenance."""

import pytest
import torch
import torch.nn.functional as F

from scan_zoo.common.errors import UserError
from scan_zoo.core.neighbors import mine_neighbors
from scan_zoo.data.neighbor_table import load_neighbors, save_neighbors


def brute_force(features, labels, k):
    """Eq. 2-4 literally: Sim = Sim_S * Sim_A over all pairs, top-K j != i with Sim > 0."""
    a = F.normalize(features.double(), dim=1)
    sim_s = (labels[:, None] == labels[None, :]).double()
    sim = sim_s * (a @ a.T + 1) / 2  # [N, N]
    n = len(labels)
    idx = torch.full((n, k), -1, dtype=torch.long)
    val = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        cands = sorted((j for j in range(n) if j != i and sim[i, j] > 0), key=lambda j: (-float(sim[i, j]), j))
        for r, j in enumerate(cands[:k]):
            idx[i, r], val[i, r] = j, sim[i, j]
    return idx, val


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_mining_equals_brute_force(seed, k):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 60, (1,), generator=g))
    c = int(torch.randint(1, 8, (1,), generator=g))
    labels = torch.randint(0, c, (n,), generator=g)
    feats = torch.randn(n, 7, generator=g)
    got_idx, got_sim = mine_neighbors(feats, labels, k)
    want_idx, want_sim = brute_force(feats, labels, k)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_sim.double(), want_sim, atol=1e-6, rtol=1e-6)


def test_chunked_rows_give_the_same_table():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (50,), generator=g)
    feats = torch.randn(50, 5, generator=g)
    a = mine_neighbors(feats, labels, 3, chunk=4096)
    b = mine_neighbors(feats, labels, 3, chunk=3)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_small_classes_get_minus_one_and_neighbours_share_the_class():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    feats = torch.randn(6, 4)
    idx, sim = mine_neighbors(feats, labels, 2)
    assert idx[2].tolist() == [-1, -1]  # class 1 has one image
    assert (idx[0] == torch.tensor([1, -1])).all() and (idx[1] == torch.tensor([0, -1])).all()
    for i in range(6):
        for j in idx[i]:
            if j >= 0:
                assert labels[j] == labels[i] and j != i


def test_duplicate_images_are_each_others_nearest():
    feats = torch.randn(8, 4)
    feats[5] = feats[2]
    labels = torch.zeros(8, dtype=torch.long)
    idx, sim = mine_neighbors(feats, labels, 1)
    assert idx[2, 0] == 5 and idx[5, 0] == 2
    assert sim[2, 0] == pytest.approx(1.0)


def test_k_zero_is_an_empty_table():
    idx, sim = mine_neighbors(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 0)
    assert idx.shape == (4, 0) and sim.shape == (4, 0)


def test_provenance_round_trip_and_refusal(tmp_path):
    idx, sim = mine_neighbors(torch.randn(10, 3), torch.arange(10) % 2, 2)
    prov = {"num_images": 10, "num_classes": 2, "fingerprint": "abc", "k": 2, "appearance_model": "m"}
    path = save_neighbors(tmp_path / "nb.safetensors", idx, sim, prov)
    got_idx, got_sim, got_prov = load_neighbors(path, {"num_images": 10, "fingerprint": "abc", "k": 2})
    assert torch.equal(got_idx, idx) and got_prov == prov
    with pytest.raises(UserError, match="fingerprint"):
        load_neighbors(path, {"fingerprint": "other"})
    with pytest.raises(UserError, match="num_images"):
        load_neighbors(path, {"num_images": 11})
    with pytest.raises(UserError, match="not found"):
        load_neighbors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a table")
    with pytest.raises(UserError, match="not a neighbour file"):
        load_neighbors(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("order", ["by_class", "shuffled"])
def test_a_memory_mapped_file_gives_the_table_of_the_tensor(tmp_path, dtype, order):
    """The memmap path (one slice per class when rows are grouped by class, a gather otherwise) reads
    the same numbers as the in-memory tensor and so gives the same table, bit for bit."""
    import numpy as np

    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 5, (300,), generator=g)
    if order == "by_class":
        labels = labels.sort().values
    feats = (torch.randn(5, 16, generator=g)[labels] + torch.randn(300, 16, generator=g)).to(getattr(torch, dtype))
    path = tmp_path / "features.npy"
    np.save(path, feats.numpy())
    mapped = np.load(path, mmap_mode="r")
    for k, chunk in ((1, 4096), (3, 4096), (2, 7)):
        want = mine_neighbors(feats, labels, k, chunk=chunk)
        got = mine_neighbors(mapped, labels, k, chunk=chunk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    idx, _ = mine_neighbors(mapped, labels.numpy(), 2)  # labels as an array too
    assert torch.equal(idx, mine_neighbors(feats, labels, 2)[0])


@pytest.mark.parametrize("seed", range(20))
def test_top_k_equals_the_stable_sort_it_replaces(seed):
    """``_top_k`` against the reference it replaced: a stable descending sort cut at kk, on rows full of
    exact ties (small integers), ties across the cut included."""
    from scan_zoo.core.neighbors import _top_k

    g = torch.Generator().manual_seed(seed)
    cols = int(torch.randint(2, 40, (1,), generator=g))
    gram = torch.randint(-3, 4, (25, cols), generator=g).float()
    gram[torch.rand(25, cols, generator=g) < 0.1] = float("-inf")
    gram[:, 0] = 5.0  # at least one finite value per row
    for kk in range(1, cols):
        val, pos = _top_k(gram, kk)
        ref_val, ref_pos = torch.sort(gram, dim=1, descending=True, stable=True)
        assert torch.equal(pos, ref_pos[:, :kk]) and torch.equal(val, ref_val[:, :kk]), kk
