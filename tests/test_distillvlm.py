"""Compression into a small fusion student (DistillVLM): the layer-to-layer attention MSE and
the token-wise NCE against naive references, the teacher-token queue (ring, checkpoint,
ranks), visual-token alignment, and both training stages end to end."""
import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import labelled, tiny_overrides
from dist_utils import run_ranks
from safetensors.torch import load_file

from dide_scale import losses
from dide_scale.build import build_student, build_teacher
from dide_scale.config import ConfigError, LossConfig, load_config
from dide_scale.models.attention import resolve_layer_map
from dide_scale.models.fusion import FusionEncoder
from dide_scale.models.images import images_from_pixels
from dide_scale.models.saved import load_pretrained, save_pretrained
from dide_scale.models.student import TowerShape
from dide_scale.objective import DistillObjective
from dide_scale.train import REQUEUE_EXIT_CODE, StopSignal

TEACHER = TowerShape(width=32, depth=4, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)
STUDENT_ARCH = "{width: 16, depth: 2, heads: 2, patch_size: 8, image_size: [32, 32], max_text_len: 16, vocab_size: 128}"
STUDENT = TowerShape(width=16, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)


# -- losses against naive references ----------------------------------------------------------

def naive_attention_mse(tq, tk, sq, sk, mask, mean_heads):
    """Loops: softmax over valid keys per row; squared differences summed over valid keys,
    averaged over valid query rows and heads."""
    B, H, N, _ = tq.shape

    def probs(q, k, b, h, i):
        valid = [j for j in range(N) if mask[b, j]]
        logits = torch.tensor([float(q[b, h, i] @ k[b, h, j]) / math.sqrt(q.shape[-1]) for j in valid],
                              dtype=torch.float64)
        return dict(zip(valid, torch.softmax(logits, 0).tolist()))
    total, count = 0.0, 0
    for b in range(B):
        for i in range(N):
            if not mask[b, i]:
                continue
            pt = [probs(tq, tk, b, h, i) for h in range(H)]
            ps = [probs(sq, sk, b, h, i) for h in range(sq.shape[1])]
            if mean_heads:
                pt = [{j: sum(p[j] for p in pt) / len(pt) for j in pt[0]}]
                ps = [{j: sum(p[j] for p in ps) / len(ps) for j in ps[0]}]
            for a, c in zip(pt, ps):
                total += sum((a[j] - c[j]) ** 2 for j in a)
                count += 1
    return total / count


@pytest.mark.parametrize("head_map", ["per_head", "mean"])
def test_attention_mse_matches_naive_reference_with_padding(head_map):
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 3, 2, 7, 4
    tq, tk, sq, sk = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1, 1, 0, 0, 1, 1, 1]]).bool()
    got = losses.attention_mse(tq, tk, sq, sk, mask, head_map)
    want = naive_attention_mse(tq, tk, sq, sk, mask, head_map == "mean")
    assert abs(float(got) - want) < 1e-6
    # padded positions carry no information: changing them changes nothing
    sq2 = sq.clone()
    sq2[1, :, 5:] = 100.0
    assert torch.allclose(losses.attention_mse(tq, tk, sq2, sk, mask, head_map), got)
    # a student that copies the teacher has zero loss, and the gradient reaches the student only
    sq.requires_grad_(True)
    losses.attention_mse(tq, tk, sq, sk, mask, head_map).backward()
    assert sq.grad.abs().sum() > 0
    assert float(losses.attention_mse(tq, tk, tq, tk, mask, head_map)) < 1e-12


def test_attention_mse_refuses_unmappable_heads():
    x = torch.randn(1, 2, 5, 4)
    y = torch.randn(1, 3, 5, 4)
    with pytest.raises(ValueError, match="head_map=mean"):
        losses.attention_mse(x, x, y, y, torch.ones(1, 5, dtype=torch.bool), "per_head")
    with pytest.raises(ValueError, match="same text tokens and image patches"):
        losses.attention_mse(x, x, x[:, :, :4], x[:, :, :4], torch.ones(1, 5, dtype=torch.bool))


def test_token_nce_matches_naive_reference():
    g = torch.Generator().manual_seed(1)
    B, N, C, K, tau = 2, 5, 6, 9, 0.1
    s, t = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    queue = F.normalize(torch.randn(K, C, generator=g), dim=-1)
    got = losses.token_nce(s, t, mask, queue, tau)
    terms = []
    for b in range(B):
        for i in range(N):
            if not mask[b, i]:
                continue
            sv = s[b, i].double() / s[b, i].double().norm()
            tv = t[b, i].double() / t[b, i].double().norm()
            pos = math.exp(float(sv @ tv) / tau)
            neg = sum(math.exp(float(sv @ queue[k].double()) / tau) for k in range(K))
            terms.append(-math.log(pos / (pos + neg)))
    assert abs(float(got) - sum(terms) / len(terms)) < 1e-5
    assert float(losses.token_nce(s, t, mask, queue[:0], tau)) == 0.0  # empty queue: no negatives yet


def test_token_queue_is_a_fifo_ring_with_a_state_dict():
    q = losses.TokenQueue(n_pairs=2, size=5)
    assert q.negatives(0, torch.zeros(1, 3)).shape == (0, 3)
    pushed = []
    for m in (2, 4, 1, 7):
        rows = torch.randn(2, m, 3)
        q.push([rows[0], rows[1]])
        pushed.append(F.normalize(rows, dim=-1))
    everything = torch.cat(pushed, dim=1)
    newest = everything[:, -5:]  # the last 5 tokens survive, whatever their positions in the ring
    for p in range(2):
        got = q.negatives(p, torch.zeros(1, 3))
        assert got.shape == (5, 3)
        assert sorted(got.sum(-1).tolist()) == pytest.approx(sorted(newest[p].sum(-1).tolist()))
    st = q.state_dict()
    q2 = losses.TokenQueue(2, 5)
    q2.load_state_dict(st)
    assert torch.equal(q2.buf, q.buf) and (q2.ptr, q2.filled) == (q.ptr, q.filled)
    with pytest.raises(ValueError, match="nce_queue_size"):
        losses.TokenQueue(2, 6).load_state_dict(st)
    # a ring restored on the CPU follows the tokens to their device before it is used
    assert q2.negatives(0, torch.zeros(1, 3, device="meta")).device.type == "meta"


def test_layer_map_default_and_errors():
    assert resolve_layer_map([], 12, 6) == ([1, 3, 5, 7, 9, 11], [0, 1, 2, 3, 4, 5])
    assert resolve_layer_map([], 4, 2) == ([1, 3], [0, 1])
    assert resolve_layer_map([[-1, -1], [0, 0]], 4, 2) == ([3, 0], [1, 0])
    with pytest.raises(ValueError, match=r"layer_map\[0\]\[1\]"):
        resolve_layer_map([[0, 5]], 4, 2)
    with pytest.raises(ValueError, match="explicitly"):
        resolve_layer_map([], 2, 4)


# -- the models' joint states -------------------------------------------------------------------

def batch(n=4, nt=10, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, nt, dtype=torch.long)
    for i in range(n):
        mask[i, 3 + (i * 3) % (nt - 3):] = 0
    images = images_from_pixels(torch.rand(n, 3, size, size, generator=g), 8)
    return {"images": images, "input_ids": torch.randint(4, 128, (n, nt), generator=g),
            "attention_mask": mask, "labels": torch.rand(n, 16, generator=g)}


def test_fusion_joint_states_are_the_blocks_own_attention_and_outputs():
    torch.manual_seed(0)
    model = FusionEncoder(TEACHER, "vqa", 16).eval()
    b = batch()
    with torch.no_grad():
        out = model(b["images"], b["input_ids"], b["attention_mask"], layers=(1, 3))
        plain = model(b["images"], b["input_ids"], b["attention_mask"])
    assert torch.equal(out.logits, plain.logits)
    (st,) = out.states
    assert st.mask.shape == (4, 10 + 1 + 16) and torch.equal(st.mask[:, :10], b["attention_mask"].bool())
    # recompute block 1's attention input by hand: q/k are that block's own projections
    with torch.no_grad():
        text = model.text_embeddings(input_ids=b["input_ids"]) + model.token_type.weight[0]
        x = torch.cat([text, model.embed_image(b["images"], 1)], 1)
        from dide_scale.models.attention import additive_mask
        add = additive_mask(st.mask, x.dtype)
        x = model.vit.blocks[0](x, attn_mask=add)
        qkv = model.vit.blocks[1].attn.qkv(model.vit.blocks[1].norm1(x))
        q = qkv.view(4, 27, 3, 2, 16).permute(2, 0, 3, 1, 4)[0]
        x1 = model.vit.blocks[1](x, attn_mask=add)
    torch.testing.assert_close(st.q[0], q, rtol=0, atol=1e-6)
    torch.testing.assert_close(st.hidden[0], x1, rtol=0, atol=1e-6)


# -- visual-token alignment ------------------------------------------------------------------

def test_a_teacher_with_another_position_table_takes_the_students_grid():
    """A fusion teacher whose table covers 6x6 positions (48x48 at patch 8) interpolates it to
    the student's 4x4 grids: its image tokens are the student's, one to one."""
    torch.manual_seed(0)
    teacher = FusionEncoder(TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[48, 48],
                                       max_text_len=16, vocab_size=128), "vqa", 16).eval()
    student = FusionEncoder(STUDENT, "vqa", 16)
    obj = DistillObjective(student, teacher, LossConfig(attn_t2i=1.0, attn_i2t=1.0, soft_label=1.0), "vqa")
    out = obj.training_forward(batch())
    assert all(torch.isfinite(v) for v in out.parts.values())
    t = obj.teacher_forward(batch(), None, capture=True)
    assert t.qk[0].k_image.shape[2] == 1 + 16
    load_config("debug", ["teacher.path=/x", "loss.soft_label=1.0",
                          "teacher.arch={width: 32, depth: 2, heads: 2, patch_size: 8, image_size: [48, 48]}"])


def test_teacher_with_larger_patches_sees_the_same_regions_resampled(tmp_path):
    """Teacher: patch 16 (4x4 table over 64x64); student: patch 8 at 32x32 (4x4 grid). The task
    hands the teacher each of the student's patches resampled to 16 px; token counts line up and
    the losses are finite."""
    torch.manual_seed(0)
    t_shape = TowerShape(width=32, depth=4, heads=2, patch_size=16, image_size=[64, 64], max_text_len=16,
                         vocab_size=128)
    teacher = FusionEncoder(t_shape, "vqa", 16).eval()
    student = FusionEncoder(STUDENT, "vqa", 16)
    student.add_distill_projections(2, 32)
    seen = {}

    def spy(module, args):
        seen["patch"], seen["n"] = args[0].patch_size, args[0].patches.shape[1]
    teacher.register_forward_pre_hook(spy)
    obj = DistillObjective(student, teacher, LossConfig(attn_mse=1.0, token_nce=1.0, attn_t2i=1.0, soft_label=1.0),
                           "vqa")
    assert obj.teacher_patch == 16
    out = obj.training_forward(batch())
    assert seen == {"patch": 16, "n": 16}
    assert all(torch.isfinite(v) for v in out.parts.values())
    out.loss.backward()


# -- the queue across ranks ------------------------------------------------------------------

def _pair_models():
    torch.manual_seed(0)
    teacher = FusionEncoder(TEACHER, "vqa", 16).eval()
    student = FusionEncoder(STUDENT, "vqa", 16)
    student.add_distill_projections(2, 32)
    return student, teacher


def queue_after_steps(args: dict) -> dict:
    """On this process's rank: micro-batches of the same global batches; returns the queue."""
    import torch.distributed as dist
    rank, world = 0, 1
    if args["world"] > 1:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher = _pair_models()
    obj = DistillObjective(student, teacher, LossConfig(attn_t2i=0, attn_i2t=0, soft_label=0, token_nce=1.0,
                                                    nce_queue_size=args["size"]), "vqa")
    obj.train()
    nce = []
    for step in range(3):
        full = batch(n=4, seed=step)
        per = 4 // world
        local = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}  # Images slice like tensors
        out = obj.training_forward(local)
        nce.append(out.parts["token_nce"].detach().item())
    st = obj.queue.state_dict()
    if world > 1:
        dist.destroy_process_group()
    return {"buf": st["buf"].tolist(), "ptr": st["ptr"], "filled": st["filled"], "nce": nce}


@pytest.mark.distributed
def test_two_rank_queue_equals_one_rank_queue_on_the_same_global_batch(tmp_path):
    args = {"size": 64}  # smaller than one global batch's 4 x ~20 valid tokens: the ring wraps
    one = queue_after_steps({**args, "world": 1})
    two = run_ranks("test_distillvlm:queue_after_steps", 2, {**args, "world": 2}, tmp_path, timeout=300)
    assert one["filled"] == 64
    for r in two:
        assert (r["ptr"], r["filled"]) == (one["ptr"], one["filled"])
        torch.testing.assert_close(torch.tensor(r["buf"]), torch.tensor(one["buf"]), rtol=0, atol=1e-6)
    # each rank's loss covers its own tokens; at step 0 the queue is empty on both
    assert one["nce"][0] == 0.0 and two[0]["nce"][0] == 0.0


# -- end to end through dide-pretrain / dide-finetune -------------------------------------------

@pytest.fixture(scope="module")
def big_teachers(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("distillvlm")
    for task, n in (("vqa", 16), ("itm", 2)):
        save_pretrained(labelled(FusionEncoder(TEACHER, task, n)), root / task)
    return root


def compress_overrides(shards, out, teacher, **extra):
    return tiny_overrides(shards, out, **{
        "student.kind": "fusion", "student.arch": STUDENT_ARCH,
        "teacher.arch": "{width: 32, depth: 4, heads: 2, patch_size: 8, image_size: [32, 32], max_text_len: 16, "
                        "vocab_size: 128}",
        "teacher.path": str(teacher), "loss.attn_mse": 1.0, "loss.token_nce": 0.5, "loss.soft_label": 1.0,
        "loss.nce_queue_size": 256, **extra})


class StopAtStep(StopSignal):
    """A preemption signal that arrives right after optimizer step ``step``."""

    def __init__(self, step: int):
        super().__init__()
        self._asked, self._step = 0, step

    @property
    def received(self):
        self._asked += 1  # the loop asks once per step, before it
        return signal.SIGUSR1 if self._asked > self._step else None

    @received.setter
    def received(self, value):
        pass


def test_finetune_compression_end_to_end_and_queue_survives_resume(demo_shards, big_teachers, tmp_path):
    from dide_scale.finetune import main as finetune_main
    from dide_scale.train import main
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert finetune_main(["--config", "debug", *compress_overrides(demo_shards, straight, big_teachers / "vqa",
                                                                   **{"train.save_every": 2})]) == 0
    hist = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["loss/attn_mse"]) and math.isfinite(h["loss/token_nce"]) for h in hist)
    assert hist[0]["loss/token_nce"] < hist[-1]["loss/token_nce"]  # step 1 starts with an empty queue
    # the queue is in the checkpoint: preempt after 2 steps, resume, and match the straight run
    assert main(["--config", "debug", *compress_overrides(demo_shards, resumed, big_teachers / "vqa")],
                stop=StopAtStep(2)) == REQUEUE_EXIT_CODE
    state = torch.load(resumed / "checkpoints" / "step_00000002" / "dide_rank00000.pt", weights_only=True)
    assert state["state"]["token_queue"]["filled"] > 0
    assert main(["--config", "debug", *compress_overrides(demo_shards, resumed, big_teachers / "vqa")]) == 0
    again = [json.loads(line) for line in (resumed / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in again] == [1, 2, 3, 4]
    for a, b in zip(hist, again, strict=True):
        assert a["step"] == b["step"]
        assert a["loss/token_nce"] == b["loss/token_nce"] and a["loss/loss"] == b["loss/loss"]
    q_a = torch.load(straight / "checkpoints" / "step_00000004" / "dide_rank00000.pt", weights_only=True)
    q_b = torch.load(resumed / "checkpoints" / "step_00000004" / "dide_rank00000.pt", weights_only=True)
    assert torch.equal(q_a["state"]["token_queue"]["buf"], q_b["state"]["token_queue"]["buf"])
    # the export is a plain small fusion model: no distillation projections
    weights = load_file(str(straight / "export" / "model.safetensors"))
    assert not any(k.startswith("distill_proj.") for k in weights)
    exported = load_pretrained(straight / "export")
    assert isinstance(exported, FusionEncoder) and exported.shape.width == 16


def test_pretraining_compression_itm_end_to_end(demo_shards, big_teachers, tmp_path):
    from dide_scale.train import main
    out = tmp_path / "itm"
    assert main(["--config", "debug", *compress_overrides(demo_shards, out, big_teachers / "itm", **{
        "train.task": "itm", "data.val_shards": "", "loss.ground_truth": 1.0})]) == 0
    hist = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["loss/loss"]) for h in hist) and "loss/attn_mse" in hist[-1]
    model = load_pretrained(out / "export")
    assert model.task == "itm"


def test_layerwise_losses_need_a_fusion_student_and_a_fitting_map(big_teachers):
    base = ["train.task=vqa", "data.num_answers=16", f"teacher.path={big_teachers / 'vqa'}"]
    with pytest.raises(ConfigError, match="student.kind=fusion"):
        load_config("debug", base + ["loss.attn_mse=1.0"])
    cfg = load_config("debug", base + ["loss.attn_mse=1.0", "student.kind=fusion", "loss.layer_map=[[9, 0]]",
                                       f"student.arch={STUDENT_ARCH}"])
    with pytest.raises(ValueError, match="teacher block"):
        build_teacher(cfg)
    cfg = load_config("debug", base + ["loss.token_nce=1.0", "student.kind=fusion", f"student.arch={STUDENT_ARCH}"])
    student = build_student(cfg)
    assert len(student.distill_proj) == 2 and student.distill_proj[0].out_features == 32
