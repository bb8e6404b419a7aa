"""Captioning (train.task=caption): the seq2seq mask, Oscar's caption-token masking, decoding
with and without the cache, beam search against brute force, the COCO metrics on captions
checked by hand, distillation under the mask, the demo's references, and a captioning run
that is preempted and resumed, evaluated, exported and served."""
import hashlib
import itertools
import json
import math
import random
import shutil

import pytest
import torch

from dide_scale import losses
from dide_scale.config import ConfigError, load_config
from dide_scale.data.transforms import CaptionMasking
from dide_scale.models.caption import FullStepper, Generation, SpecialTokens, generate, seq2seq_mask
from dide_scale.models.fusion import FusionEncoder
from dide_scale.models.images import images_from_pixels
from dide_scale.models.saved import save_pretrained
from dide_scale.models.student import TowerShape

ARCH = "{width: 32, depth: 2, heads: 2, patch_size: 8, image_size: [32, 32], max_text_len: 24, vocab_size: 128}"
SHAPE = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=24, vocab_size=128)
TEACHER = TowerShape(width=32, depth=4, heads=2, patch_size=8, image_size=[32, 32], max_text_len=24, vocab_size=128)
TOKENS = SpecialTokens(bos=2, eos=3, pad=0, mask=4)  # the demo vocabulary's ids
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption metrics run on Java")


def images(n=3, seed=0, width=32):
    g = torch.Generator().manual_seed(seed)
    return images_from_pixels(torch.rand(n, 3, 32, width, generator=g), 8, max_patches=16)


def peaked(model, scale=8.0):
    """A random captioner whose next-token distributions are far from uniform and depend on the
    image (at initialisation every block is close to the identity and the image barely reaches
    the caption): greedy and beam search take different paths and ties do not happen."""
    with torch.no_grad():
        model.head.decoder.weight.mul_(scale)
        for blk in model.vit.blocks:
            for w in (blk.attn.qkv.weight, blk.attn.proj.weight, blk.mlp.fc1.weight, blk.mlp.fc2.weight):
                w.mul_(20 ** 0.5)
        model.vit.embeds.proj.weight.mul_(20)
    return model.eval()


# -- the seq2seq mask ----------------------------------------------------------------------------

def test_seq2seq_mask_follows_oscars_rules():
    text = torch.tensor([[1, 1, 1, 0]])
    image = torch.tensor([[1, 1, 0]])
    got = seq2seq_mask(text, image)[0]
    for q in range(7):
        for k in range(7):
            qt, kt = q < 4, k < 4
            q_ok, k_ok = (text[0, q] if qt else image[0, q - 4]).item(), (text[0, k] if kt else image[0, k - 4]).item()
            if qt and q_ok:  # a caption token: earlier/own caption tokens and the image
                want = bool(k_ok) and (not kt or k <= q)
            else:  # image tokens and padded caption slots: the image only
                want = bool(k_ok) and not kt
            assert bool(got[q, k]) == want, (q, k)


def test_the_model_is_causal_over_the_caption_and_the_image_never_sees_it():
    torch.manual_seed(0)
    model = FusionEncoder(SHAPE, "caption", 128).eval()
    im = images(2)
    ids = torch.randint(5, 60, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[:, 12:] = 0

    def states(ids, im):
        with torch.no_grad():
            return model(im, ids, mask, layers=(1,)).states[0].hidden[0]
    base = states(ids, im)
    later = ids.clone()
    later[:, 7] = 61  # a later caption token changes only itself and what comes after it
    diff = (states(later, im) - base).abs().amax(-1)
    assert diff[:, :7].max() < 1e-6 and diff[:, 7:12].min() > 1e-4 and diff[:, 24:].max() < 1e-6
    other = images(2, seed=1)  # another image changes every caption token
    assert (states(ids, other) - base)[:, :12].abs().amax(-1).min() > 1e-4


# -- Oscar's masking -------------------------------------------------------------------------------

def test_caption_masking_follows_oscar():
    m = CaptionMasking(0.15, 3, mask_id=4, vocab_size=64)
    ids = torch.arange(10, 40).repeat(400, 1)
    valid = torch.zeros_like(ids)
    lengths = [random.Random(i).randint(2, 30) for i in range(400)]
    for i, n in enumerate(lengths):
        valid[i, :n] = 1
    masked, targets = m(ids, valid, list(range(400)))
    outcomes = []
    for i, n in enumerate(lengths):
        picked = (targets[i] >= 0).nonzero().flatten().tolist()
        assert len(picked) == min(max(round(0.15 * n), 1), 3, n - 1)
        assert all(1 <= p < n for p in picked)  # never [CLS], never padding; [SEP] (n - 1) may be
        assert torch.equal(targets[i, picked], ids[i, picked])
        outcomes += ["mask" if masked[i, p] == 4 else "kept" if masked[i, p] == ids[i, p] else "random"
                     for p in picked]
        assert torch.equal(masked[i, targets[i] < 0], ids[i, targets[i] < 0])
    share = {k: outcomes.count(k) / len(outcomes) for k in ("mask", "kept", "random")}
    assert abs(share["mask"] - 0.8) < 0.05 and abs(share["random"] - 0.1) < 0.04 and abs(share["kept"] - 0.1) < 0.04
    again = m(ids, valid, list(range(400)))  # the sample's seed decides: a resumed run masks alike
    assert torch.equal(again[0], masked) and torch.equal(again[1], targets)


# -- decoding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_equals_uncached(beam):
    torch.manual_seed(1)
    model = peaked(FusionEncoder(SHAPE, "caption", 128))
    im = images(3)
    s = Generation(beam, 14, 0.7)
    cached = generate(model, im, TOKENS, s, cached=True)
    full = generate(model, im, TOKENS, s, cached=False)
    assert [c for c, _ in cached] == [f for f, _ in full]
    assert [sc for _, sc in cached] == pytest.approx([sc for _, sc in full], abs=1e-5)
    assert len({tuple(c) for c, _ in cached}) > 1  # the images get different captions


def test_cached_step_log_probs_equal_the_full_forward_at_every_position():
    from dide_scale.models.caption import CachedStepper
    torch.manual_seed(2)
    model = peaked(FusionEncoder(SHAPE, "caption", 128))
    im = images(2, width=24)  # 4 x 3 grids: padded patch slots too
    cached, full = CachedStepper(model, im, 1, TOKENS), FullStepper(model, im, 1, TOKENS)
    seq = torch.full((2, 1), TOKENS.bos)
    with torch.no_grad():
        for _ in range(10):
            a, b = cached.step(seq), full.step(seq)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            seq = torch.cat([seq, torch.randint(5, 60, (2, 1))], 1)


def test_beam_search_is_exhaustive_with_enough_beams_and_greedy_is_beam_one():
    """Vocabulary of 8, captions of at most 3 tokens: with 400 beams beam search keeps every
    prefix, so it must return the best of all 8^3 sequences (length penalty 0: the summed
    log-probability), which brute force scores with the uncached model."""
    torch.manual_seed(3)
    shape = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=6, vocab_size=8)
    model = peaked(FusionEncoder(shape, "caption", 8), 4.0)
    im = images(1)
    best, best_ids = -math.inf, None
    for length in (1, 2, 3):
        for tail in itertools.product(range(8), repeat=length):
            if TOKENS.eos in tail[:-1]:
                continue
            stepper, seq, total = FullStepper(model, im, 1, TOKENS), torch.tensor([[TOKENS.bos]]), 0.0
            with torch.no_grad():
                for tok in tail:
                    total += float(stepper.step(seq)[0, tok])
                    seq = torch.cat([seq, torch.tensor([[tok]])], 1)
            if (tail[-1] == TOKENS.eos or length == 3) and total > best:
                best, best_ids = total, [t for t in tail if t != TOKENS.eos]
    (ids, score), = generate(model, im, TOKENS, Generation(400, 3, 0.0))
    assert ids == best_ids and score == pytest.approx(best, abs=1e-5)
    # beam size 1 is greedy: the most likely token at every step, until [SEP]
    stepper, seq, want = FullStepper(model, im, 1, TOKENS), torch.tensor([[TOKENS.bos]]), []
    with torch.no_grad():
        while len(want) < 5 and (not want or want[-1] != TOKENS.eos):
            want.append(int(stepper.step(seq).argmax()))
            seq = torch.cat([seq, torch.tensor([[want[-1]]])], 1)
    assert generate(model, im, TOKENS, Generation(1, 5, 1.0))[0][0] == [t for t in want if t != TOKENS.eos]


def test_a_caption_longer_than_the_text_positions_is_refused():
    model = FusionEncoder(SHAPE, "caption", 128).eval()
    with pytest.raises(ValueError, match="max_length=24"):
        generate(model, images(1), TOKENS, Generation(1, 24, 1.0))


# -- the metrics -------------------------------------------------------------------------------------

@pytest.mark.slow  # METEOR's Java start-up
@needs_java
def test_coco_metrics_on_hand_checked_captions():
    """Image 1: reference 'a red circle and a blue square', candidate 'a red circle and a square'.
    BLEU-4 is counted over the corpus: image 1 matches 6 of 6 1-grams, 4 of 5 2-grams, 3 of 4
    3-grams, 2 of 3 4-grams; image 2 (exact, 3 words) 3/3, 2/2, 1/1, 0/0; so precisions 9/9,
    6/7, 4/5, 2/3 and brevity penalty exp(1 - 10/9): 0.73580.  ROUGE-L: LCS 6, P 1, R 6/7, beta 1.2:
    2.44 * 6/7 / (6/7 + 1.44) = 0.91045.  CIDEr-D: two images with no n-gram in common, so
    every n-gram has the same idf (log 2) and the cosines are of counts: 1-grams 8/(sqrt 8 * 3),
    2-grams 4/sqrt 30, 3-grams 3/sqrt 20, 4-grams 2/sqrt 12; mean 0.730319, times the length
    penalty exp(-1/72) (CIDEr-D counts length in bigrams: 5 vs 6), times 10: 7.20246.
    Image 2 ('two green triangles', exact): 1-, 2-, 3-gram cosines 1, no 4-gram: 7.5.
    Punctuation and case go through the PTB tokenizer."""
    from dide_scale.captions import score_captions
    refs = {"1": ["A red circle and a blue square."], "2": ["two green triangles"]}
    got = score_captions({"1": "a red circle and a square", "2": "Two green triangles ."}, refs)
    assert got["bleu4"] == pytest.approx(math.exp(1 - 10 / 9) * (6 / 7 * 4 / 5 * 2 / 3) ** 0.25, abs=1e-6)
    assert got["rouge_l"] == pytest.approx((0.91045 + 1.0) / 2, abs=1e-5)
    assert got["cider"] == pytest.approx((7.20246 + 7.5) / 2, abs=1e-4)
    assert 0 < got["meteor"] < 1
    exact = score_captions({"1": "a red circle and a blue square", "2": "two green triangles"}, refs)
    assert exact["meteor"] == pytest.approx(1.0) and exact["rouge_l"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no reference"):
        score_captions({"3": "x"}, refs)


# -- distillation under the mask ---------------------------------------------------------------------

def test_attention_mse_under_the_seq2seq_mask_counts_only_the_attention_a_position_has():
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 7, 4
    tq, tk, sq, sk = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    text, image = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    allowed = seq2seq_mask(text, image)
    mask = torch.cat([text, image], 1).bool()
    got = losses.attention_mse(tq, tk, sq, sk, mask, "per_head", allowed)
    total, rows = 0.0, 0
    for b in range(B):
        for q in range(N):
            if not mask[b, q]:
                continue
            keys = [k for k in range(N) if allowed[b, q, k]]
            for h in range(H):
                def p(qq, kk):
                    s = torch.tensor([float(qq[b, h, q] @ kk[b, h, k]) / 2.0 for k in keys], dtype=torch.float64)
                    return torch.softmax(s, 0)
                total += float(((p(tq, tk) - p(sq, sk)) ** 2).sum())
                rows += 1
    assert float(got) == pytest.approx(total / rows, abs=1e-6)
    # without the mask every real token would count as a key of every query: another figure
    assert float(losses.attention_mse(tq, tk, sq, sk, mask, "per_head")) != pytest.approx(float(got))
    sk2 = sk.clone()
    sk2[1, :, 2] += 5.0  # a padded caption slot is no key of anyone
    assert float(losses.attention_mse(tq, tk, sq, sk2, mask, "per_head", allowed)) == pytest.approx(float(got))


def test_the_caption_task_distils_the_masked_tokens_and_the_mask_restricted_attention():
    from dide_scale.config import LossConfig
    from dide_scale.objective import DistillObjective
    torch.manual_seed(0)
    teacher, student = FusionEncoder(TEACHER, "caption", 128).eval(), FusionEncoder(SHAPE, "caption", 128)
    student.add_distill_projections(2, 32)
    ids = torch.randint(5, 60, (3, 24))
    mask = torch.zeros(3, 24, dtype=torch.long)
    mask[:, :10] = 1
    targets = torch.full_like(ids, -100)
    targets[:, [2, 5]] = ids[:, [2, 5]]
    b = {"images": images(3), "input_ids": ids, "attention_mask": mask, "caption_targets": targets}
    obj = DistillObjective(student, teacher, LossConfig(attn_t2i=0, attn_i2t=0, soft_label=1.0, ground_truth=1.0,
                                                    attn_mse=1.0, token_nce=1.0), "caption")
    out = obj.training_forward(b)
    assert out.logits.shape == (6, 128) and torch.equal(out.labels, ids[:, [2, 5]].flatten())
    assert set(out.parts) == {"soft_label", "ground_truth", "attn_mse", "token_nce"}
    assert all(torch.isfinite(v) for v in out.parts.values())
    s = obj.student_forward(b, False, layers=obj.s_layers)
    assert s.states[0].attn_mask is not None and not s.states[0].attn_mask[:, 24:, :24].any()
    out.loss.backward()


# -- configuration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (["student.kind=dual"], "student.kind=fusion"),
    (["loss.attn_t2i=1.0", "teacher.path=/x"], "attn_mse"),
    (["loss.soft_label=1.0", "teacher.path=/x", "teacher.kind=hf_vilt"], "teacher.kind=fusion"),
    (["caption.max_length=24"], "max_text_len=24"),
    (["caption.metrics=[bleu4]"], "'cider'"),
    (["caption.beam_size=0"], "caption.beam_size"),
])
def test_caption_settings_that_cannot_work_are_refused(bad, match):
    base = ["train.task=caption", "student.kind=fusion", f"student.arch={ARCH}"]
    with pytest.raises(ConfigError, match=match):
        load_config("debug", base + bad)


def test_compress_caption_is_distillvlms_setting_at_the_papers_shapes():
    """MiniVLM's 12 x 384 fusion student with 12 heads (so attention maps compare head by head)
    distilled from the caption_coco teacher (ViLT-B/32's 12 x 768) one block to one, by attention
    MSE and token NCE over a 4,096-token queue plus the masked tokens' ground truth, on
    caption_coco's data, schedule and decoding."""
    from dide_scale.models.attention import resolve_layer_map
    cfg, coco = load_config("compress_caption"), load_config("caption_coco")
    s, t = cfg.student.arch, cfg.teacher.arch
    assert (cfg.train.task, cfg.student.kind, cfg.teacher.kind) == ("caption", "fusion", "fusion")
    assert (s.depth, s.width, s.heads) == (12, 384, 12) and (t.depth, t.width, t.heads) == (12, 768, 12)
    assert t == coco.student.arch and cfg.teacher.path == f"{coco.train.output_dir}/best"
    assert (s.patch_size, s.image_size, s.max_text_len, s.vocab_size) == \
        (t.patch_size, t.image_size, t.max_text_len, t.vocab_size)  # the visual tokens line up one to one
    lo = cfg.loss
    assert (lo.attn_mse, lo.token_nce, lo.ground_truth, lo.nce_queue_size) == (1.0, 1.0, 1.0, 4096)
    assert lo.attn_t2i == lo.attn_i2t == lo.soft_label == 0.0 and lo.head_map == "per_head"
    assert resolve_layer_map(lo.layer_map, t.depth, s.depth) == (list(range(12)), list(range(12)))
    assert (cfg.data.train_shards, cfg.data.val_shards, cfg.caption, cfg.train.max_steps) == \
        (coco.data.train_shards, coco.data.val_shards, coco.caption, coco.train.max_steps)


# -- the demo's references ---------------------------------------------------------------------------

def members_digest(d) -> str:
    from dide_scale.data.pipeline import iter_raw_samples
    h = hashlib.sha256()
    for shard in sorted(d.glob("*.tar")):
        for raw in iter_raw_samples(str(shard)):
            for k in sorted(k for k in raw if not k.startswith("__") or k == "__key__"):
                h.update(k.encode() + (raw[k] if isinstance(raw[k], bytes) else str(raw[k]).encode()))
    return h.hexdigest()


# what the generator wrote for each task before captioning existed (seed 0, 24 samples)
DIGESTS = {"vqa": "e97b8fddecea4b2310680a44bb43c11ebedc2465d3a07bc332938133d4917d62",
           "nlvr2": "2970370b3fafe95ef9dcf13f58510e4786a6401e3b9ecf212b9e937ca53a85e9",
           "snli_ve": "d54c1d247f9eb35fa876b660b74a2fb89337fd4ba9bf6f231b44b7a8e638fda3"}


@pytest.mark.parametrize("task", list(DIGESTS))
def test_the_demo_tasks_write_what_they_wrote_before(task, tmp_path):
    from dide_scale.data.demo import generate_split
    assert members_digest(generate_split(tmp_path / task, 24, 0, task, samples_per_shard=10)) == DIGESTS[task]


def test_demo_caption_samples_carry_five_references_in_the_demo_vocabulary(tmp_path):
    from dide_scale.data.demo import VOCAB, generate_split
    from dide_scale.data.pipeline import iter_raw_samples
    a = generate_split(tmp_path / "a", 30, 0, "caption", samples_per_shard=30)
    b = generate_split(tmp_path / "b", 30, 0, "caption", samples_per_shard=30)
    assert members_digest(a) == members_digest(b)  # seeded
    assert len(VOCAB) == 64  # the vocabulary of the demo teachers is unchanged
    for raw in iter_raw_samples(str(a / "00000.tar")):
        meta = json.loads(raw["json"])
        refs = meta["references"]
        assert len(refs) == 5 and refs[0] == raw["txt"].decode() and len(set(refs)) >= 4
        assert meta["image_id"] == raw["__key__"]
        assert all(w in VOCAB for r in refs for w in r.split())


# -- end to end: train, kill, resume, evaluate, export, serve ----------------------------------------

@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    from dide_scale.data.demo import generate_split
    root = tmp_path_factory.mktemp("caption")
    generate_split(root / "train", 128, 0, "caption", samples_per_shard=64)
    generate_split(root / "val", 24, 1, "caption", samples_per_shard=64)
    torch.manual_seed(0)
    save_pretrained(FusionEncoder(TEACHER, "caption", 128), root / "teacher")
    return root


def caption_args(root, out, **extra) -> list[str]:
    """A small fusion captioner distilled with every loss (attention MSE under the mask, token
    NCE with its queue, soft targets on the masked tokens, ground truth), evaluated at the end."""
    ov = {"student.kind": "fusion", "student.arch": ARCH, "teacher.arch": ARCH.replace("depth: 2", "depth: 4"),
          "teacher.path": str(root / "teacher"), "train.task": "caption",
          "data.train_shards": f"{root}/train/{{00000..00001}}.tar", "data.val_shards": f"{root}/val/00000.tar",
          "data.tokenizer": "builtin:demo", "data.num_workers": 1, "data.image_shorter": 32, "data.image_longer": 32,
          "loss.attn_mse": 1.0, "loss.token_nce": 1.0, "loss.soft_label": 1.0, "loss.ground_truth": 1.0,
          "loss.nce_queue_size": 256, "caption.beam_size": 2, "caption.max_length": 10,
          "caption.metrics": "[bleu4, rouge_l, cider]", "train.output_dir": str(out), "train.max_steps": 4,
          "train.save_every": 2, "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.log_every": 1}
    ov.update(extra)
    return ["--config", "debug", *[f"{k}={v}" for k, v in ov.items()]]


def history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_captioning_run_killed_and_relaunched_gives_the_same_losses_and_serves(caption_data, tmp_path):
    import signal
    import time

    from PIL import Image
    from test_checkpoint import launch, wait_all

    from dide_scale.evaluate import main as eval_main
    from dide_scale.inference import Predictor
    from dide_scale.train import main
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(caption_args(caption_data, straight)) == 0
    (proc,) = launch(caption_args(caption_data, killed), nproc=1)
    marker = killed / "checkpoints" / "step_00000002" / "COMPLETE.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    for code, out in wait_all(launch(caption_args(caption_data, killed), nproc=1)):
        assert code == 0, out[-3000:]
    a, b = history(straight), history(killed)
    assert [h["step"] for h in a] == [1, 2, 3, 4] and [h["step"] for h in b][-2:] == [3, 4]
    for x, y in zip(a[2:], b[-2:]):  # the steps after the kill: masking, queue and data resumed exactly
        for k in ("loss/loss", "loss/attn_mse", "loss/token_nce", "loss/soft_label", "loss/ground_truth"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (x["step"], k)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["eval"]["n"] == 24 and set(summary["eval"]["per_type"]) == {"bleu4", "rouge_l", "cider"}
    assert summary["eval"]["accuracy"] == summary["eval"]["per_type"]["cider"]
    exported = json.loads((straight / "export" / "config.json").read_text())
    assert exported["task"] == "caption" and exported["generation"] == {
        "beam_size": 2, "max_length": 10, "length_penalty": 1.0}
    # served from the folder alone: its tokenizer, geometry and decoding defaults
    predictor = Predictor.from_pretrained(str(straight / "export"))
    pics = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "white")]
    caps = predictor.caption(pics)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    assert predictor.caption(pics, beam=1, max_length=3) != caps or all(len(c.split()) <= 3 for c in caps)
    # dide-eval on the caption shards: the scores and the COCO results file
    results = tmp_path / "captions.json"
    assert eval_main(["--model", str(straight / "export"), "--shards", f"{caption_data}/val/00000.tar",
                      "--captions-json", str(results), "caption.metrics=[bleu4,rouge_l,cider]"]) == 0
    rows = json.loads(results.read_text())
    assert len(rows) == 24 and set(rows[0]) == {"image_id", "caption"}


@pytest.mark.slow
def test_captioning_trains_and_evaluates_at_zero_stage_3(caption_data, tmp_path):
    """ZeRO-3 gathers each module's parameters as it is called: the cached decoder calls the
    blocks' submodules one by one, so evaluation must run through those gathers."""
    from dide_scale.train import main
    out = tmp_path / "z3"
    assert main(caption_args(caption_data, out, **{"train.zero_stage": 3, "train.max_steps": 2,
                                                   "loss.token_nce": 0.0})) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["n"] == 24 and math.isfinite(summary["eval"]["accuracy"])


@pytest.mark.parametrize("layout", ["transformers", "dandelin"])
def test_a_captioner_starts_from_a_vilt_mlm_checkpoint_weight_for_weight(layout, tmp_path, monkeypatch):
    """student.init=vilt:PATH on a fusion captioner: the encoder and the MLM head of a
    transformers ViltForMaskedLM, or of the same weights as dandelin/ViLT's own .ckpt (its MLM
    head's bias named ``mlm_score.bias``).  Read with ViLT's own bidirectional mask instead of
    the seq2seq one, the captioner's token logits are the checkpoint's."""
    from native_vilt import native_state, vilt_config, write_lightning_ckpt
    from transformers import ViltConfig, ViltForMaskedLM

    import dide_scale.models.fusion as fusion
    from dide_scale.build import build_student
    torch.manual_seed(0)
    vcfg = ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      image_size=32, patch_size=8, max_position_embeddings=24, vocab_size=128)
    ViltForMaskedLM(vcfg).eval().save_pretrained(tmp_path / "vilt")
    hf = ViltForMaskedLM.from_pretrained(tmp_path / "vilt").eval()
    with torch.no_grad():  # a bias that is not zero, so a head read without it fails below
        hf.mlm_score.decoder.bias.normal_()
    src = tmp_path / "vilt"
    if layout == "dandelin":
        sd = native_state(hf)
        sd["mlm_score.bias"] = sd.pop("mlm_score.decoder.bias")  # dandelin/ViLT's MLMHead: its own bias
        src = tmp_path / "vilt.ckpt"
        write_lightning_ckpt(src, sd, vilt_config(hf))
    else:
        hf.save_pretrained(src)
    cfg = load_config("debug", ["train.task=caption", "student.kind=fusion", f"student.arch={ARCH}",
                                f"student.init=vilt:{src}"])
    model = build_student(cfg).eval()
    torch.testing.assert_close(model.head.decoder.weight, hf.mlm_score.decoder.weight)
    g = torch.Generator().manual_seed(1)
    px = torch.rand(2, 3, 32, 32, generator=g)
    ids = torch.randint(5, 100, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    monkeypatch.setattr(fusion, "seq2seq_mask", lambda t, i: torch.cat([t, i], 1).bool()[:, None, :].expand(
        -1, t.shape[1] + i.shape[1], -1))
    with torch.no_grad():
        ours = model(images_from_pixels(px, 8), ids, mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=(px - 0.5) / 0.5,
                    pixel_mask=torch.ones(2, 32, 32, dtype=torch.long)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-4)


def caption_eval_worker(args: dict) -> dict:
    """Each rank decodes its share of the split's shards in lock-step; rank 0 scores."""
    import torch.distributed as dist

    from dide_scale.captions import evaluate_captions
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.data.transforms import load_tokenizer
    world = int(args.get("world", 1))
    if world > 1:
        dist.init_process_group("gloo")
    r = dist.get_rank() if world > 1 else 0
    cfg = load_config("caption_demo", [f"data.val_shards={args['val']}", "data.num_workers=1", f"student.arch={ARCH}"])
    torch.manual_seed(0)
    model = peaked(FusionEncoder(SHAPE, "caption", 128))
    res = evaluate_captions(model, build_loader(cfg, "val", r, world, batch_size=5), load_tokenizer("builtin:demo"),
                            Generation(2, 8, 1.0), "cpu", metrics=("bleu4", "rouge_l", "cider"))
    if world > 1:
        dist.destroy_process_group()
    return res


@pytest.mark.distributed
@needs_java
def test_caption_evaluation_split_over_ranks_equals_one_process(tmp_path):
    """3 shards over 2 ranks (the second runs out first and decodes its last batch again,
    uncounted): the same captions and scores as one process on the whole split."""
    from dist_utils import run_ranks

    from dide_scale.data.demo import generate_split
    val = generate_split(tmp_path / "val", 3 * 7, 4, "caption", samples_per_shard=7)
    args = {"val": f"{val}/{{00000..00002}}.tar"}
    one = caption_eval_worker(args)
    two = run_ranks("test_caption:caption_eval_worker", 2, {**args, "world": 2}, tmp_path)
    assert one["n"] == 21
    for res in two:
        assert res["n"] == 21 and res["predictions"] == one["predictions"]
        assert res["per_type"] == pytest.approx(one["per_type"], abs=1e-9)
