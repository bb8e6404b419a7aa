"""ITM hard negatives mined over every rank's micro-batch (2 gloo ranks): the chosen rows come
from the other rank when they are the hardest, with their inputs, and gradients flow back
to the rank that owns them."""
import pytest
import torch
from dist_utils import run_ranks
from torch.overrides import TorchFunctionMode

B = 3


class HostSyncs(TorchFunctionMode):
    """Records the tensor calls that read a value back to the host (a device sync on a GPU)."""
    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "bincount",
             "masked_select"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.NAMES or (name == "__getitem__" and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def negatives_worker(args: dict) -> dict:
    import torch.distributed as dist

    from dide_scale.distributed import gather_rows
    from dide_scale.models.images import images_from_pixels
    from dide_scale.models.student import DualEncoder, TowerShape
    from dide_scale.negatives import HardNegatives, mine_hard_negatives
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # text i of rank 0 is identical to image i of rank 1 (and vice versa): the hardest negative
    # of every pair sits on the other rank, at the same row
    emb = 30.0 * torch.eye(4)[:B]
    neg_img, neg_txt, replaced = mine_hard_negatives(emb, emb, across_ranks=True, capacity=B)
    owned = (100.0 * rank + torch.arange(B, dtype=torch.float32))[:, None].repeat(1, 2).requires_grad_()
    ids = torch.arange(B) + 10 * rank
    flags = torch.tensor([True, False, rank == 1])
    got, got_ids, got_flags = gather_rows([owned, ids, flags], neg_img)
    (got[:, 0] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # row weights, seen by the owner
    local = mine_hard_negatives(emb, emb, across_ranks=False)
    # a capacity of 1 row per rank: one negative still comes from the other rank, the rest are
    # drawn from this rank's own rows instead (static exchange sizes, no host sync)
    capped, _, capped_frac = mine_hard_negatives(emb, emb, across_ranks=True, capacity=1,
                                                 generator=torch.Generator().manual_seed(0))
    (got_capped,) = gather_rows([owned.detach()], capped, capacity=1)

    # the real dual encoder: ITM rows, teacher inputs and attention of fetched negatives
    torch.manual_seed(0)
    shape = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)
    model = DualEncoder(shape, "itm", 2)
    g = torch.Generator().manual_seed(rank)
    pixels = torch.rand(B, 3, 32, 32, generator=g)
    input_ids = torch.randint(4, 128, (B, 8), generator=g)
    mask = torch.ones(B, 8, dtype=torch.long)
    images = images_from_pixels(pixels, 8)
    with HostSyncs() as syncs:  # the ITM micro-batch path reads nothing back to the host
        out = model(images, input_ids, mask, capture=True, negatives=HardNegatives())
        out.logits.sum().backward()
    all_pix = [torch.empty_like(images.patches) for _ in range(2)]
    dist.all_gather(all_pix, images.patches)
    every = torch.cat(all_pix)
    neg_rows = out.rows["images"].patches[B:2 * B]
    matches = [int(min(range(2 * B), key=lambda j: float((every[j] - neg_rows[i]).abs().sum()))) for i in range(B)]
    assert out.rows["images"].valid.all() and out.qk[0].image_mask.all()
    res = {"neg_img": neg_img.tolist(), "neg_txt": neg_txt.tolist(), "got": got[:, 0].tolist(),
           "got_ids": got_ids.tolist(), "got_flags": got_flags.tolist(), "grad": owned.grad[:, 0].tolist(),
           "local_neg": local[0].tolist(), "rows": out.logits.shape[0], "qk_rows": out.qk[0].q_image.shape[0],
           "neg_sources": matches, "syncs": syncs.calls, "replaced": float(replaced),
           "capped": capped.tolist(), "capped_frac": float(capped_frac), "got_capped": got_capped[:, 0].tolist(),
           "tower_grad": float(sum(p.grad.abs().sum() for p in model.image.parameters() if p.grad is not None))}
    dist.destroy_process_group()
    return res


@pytest.mark.distributed
def test_hard_negatives_are_mined_and_fetched_across_ranks(tmp_path):
    r0, r1 = run_ranks("test_negatives:negatives_worker", 2, {}, tmp_path, timeout=300)
    assert r0["neg_img"] == [3, 4, 5] and r1["neg_img"] == [0, 1, 2]  # global indices on the other rank
    assert r0["neg_txt"] == [3, 4, 5] and r1["neg_txt"] == [0, 1, 2]
    assert r0["got"] == [100.0, 101.0, 102.0] and r1["got"] == [0.0, 1.0, 2.0]
    assert r0["got_ids"] == [10, 11, 12] and r0["got_flags"] == [True, False, True]
    assert r1["got_flags"] == [True, False, False]
    # rank 1 asked for rank 0's rows 0, 1, 2 with weights 1, 2, 3: the gradient lands on rank 0
    assert r0["grad"] == [1.0, 2.0, 3.0] and r1["grad"] == [1.0, 2.0, 3.0]
    assert all(0 <= j < B for j in r0["local_neg"])  # 'local' never leaves the micro-batch
    for r, res in enumerate((r0, r1)):
        assert res["rows"] == 3 * B and res["qk_rows"] == 3 * B and res["tower_grad"] > 0
        assert all(0 <= j < 2 * B and j != r * B + i for i, j in enumerate(res["neg_sources"]))
    # near-uniform similarities of a fresh model: some negatives come from the other rank (fixed seeds)
    assert any(j // B != r for r, res in enumerate((r0, r1)) for j in res["neg_sources"])
    assert r0["syncs"] == [] and r1["syncs"] == [] and r0["replaced"] == 0.0
    for r, res in enumerate((r0, r1)):
        other = [j for j in res["capped"] if j // B != r]
        assert len(other) == 1 and res["capped_frac"] == pytest.approx(2 / 3)  # 2 of 3 choices replaced, each side
        assert all(j // B == r and j != r * B + i for i, j in enumerate(res["capped"]) if j // B == r)
        assert res["got_capped"] == [100.0 * (j // B) + j % B for j in res["capped"]]


def test_single_process_mining_stays_in_the_batch():
    from dide_scale.distributed import gather_rows
    from dide_scale.negatives import mine_hard_negatives
    torch.manual_seed(0)
    t, i = torch.randn(5, 8), torch.randn(5, 8)
    neg_img, neg_txt, _ = mine_hard_negatives(t, i)
    assert ((neg_img >= 0) & (neg_img < 5) & (neg_img != torch.arange(5))).all()
    assert ((neg_txt >= 0) & (neg_txt < 5) & (neg_txt != torch.arange(5))).all()
    x = torch.randn(5, 3)
    (got,) = gather_rows([x], neg_img)
    assert torch.equal(got, x[neg_img])
