"""Parity with transformers' own pipeline: real photos of six aspect ratios (scikit-image's
sample images, cropped), JPEG bytes written into webdataset shards, read back through our
shard reader, decoder, collate and ViLT adapter, give the logits of ``ViltProcessor`` + the
transformers model on the same bytes and text, for every task head, one photo at a time
and in a batch that mixes orientations.

The tiny checkpoints use a large init range so their outputs depend on the input (checked),
and the old stretched geometry is shown to miss (so the comparison can fail).
"""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")

from dide_scale.config import load_config  # noqa: E402
from dide_scale.data.pipeline import build_loader  # noqa: E402
from dide_scale.data.shards import ShardWriter  # noqa: E402
from dide_scale.models.hf_vilt import HFViltTeacher  # noqa: E402
from dide_scale.objective import batch_to_device  # noqa: E402

SHORTER, PATCH = 64, 16
LONGER = int(1333 / 800 * SHORTER)  # the processor's own cap: 106
WORDS = "a an the is there what color of cat man rocket coffee cup stars sky photo in this picture two images " \
        "both show left right true false animal space object".split()
TEXTS = ["is there a cat in this picture", "what color is the sky", "two images both show a rocket",
         "the left photo is of space", "is the man an animal", "what is in the cup"]
TASKS = {"vqa": "ViltForQuestionAnswering", "itm": "ViltForImageAndTextRetrieval",
         "nlvr2": "ViltForImagesAndTextClassification", "snli_ve": "ViltForQuestionAnswering"}


def photos() -> list[bytes]:
    """Six photos as JPEG bytes: square, 4:3 landscape, 3:4 portrait, 16:9, a 3:1 panorama and
    a 1:2 tall crop."""
    crops = [skimage_data.astronaut()[:, :],                 # 512 x 512
             skimage_data.coffee()[:, :533],                 # 400 x 533
             skimage_data.astronaut()[:, 64:448],            # 512 x 384
             skimage_data.rocket()[:360, :],                 # 360 x 640
             skimage_data.hubble_deep_field()[:300, :900],   # 300 x 900
             skimage_data.chelsea()[:, 100:250]]             # 300 x 150
    out = []
    for a in crops:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def tiny_vilt(task: str, vocab_size: int):
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SHORTER,
               patch_size=PATCH, max_position_embeddings=16, vocab_size=vocab_size, initializer_range=0.5,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if task == "vqa":
        cfg.update(id2label={i: a for i, a in enumerate(["yes", "no", "cat", "blue", "two", "coffee"])})
    elif task == "snli_ve":
        cfg.update(id2label={0: "contradiction", 1: "entailment", 2: "neutral"})
    elif task == "nlvr2":
        cfg.update(num_images=2, modality_type_vocab_size=3, id2label={0: "False", 1: "True"})
    torch.manual_seed(0)
    return getattr(transformers, TASKS[task])(transformers.ViltConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Per task: a checkpoint directory (model + ViltProcessor) and shards of the six photos."""
    root = tmp_path_factory.mktemp("parity")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizerFast.from_pretrained(str(root))
    proc = transformers.ViltProcessor(
        transformers.ViltImageProcessor(size={"shortest_edge": SHORTER}, size_divisor=PATCH), tok)
    jpegs = photos()
    out = {"jpegs": jpegs}
    for task in TASKS:
        d = root / task
        tiny_vilt(task, len(tok)).save_pretrained(d)
        proc.save_pretrained(d)
        with ShardWriter(root / f"{task}_shards", samples_per_shard=100) as w:
            for i, (jpg, text) in enumerate(zip(jpegs, TEXTS)):
                meta = {"vqa": {"question": text, "answers": {"yes": 1.0}}, "itm": {},
                        "nlvr2": {"sentence": text, "label": i % 2 == 0},
                        "snli_ve": {"hypothesis": text, "label": "neutral"}}[task]
                sample = {"__key__": f"{i:04d}", "jpg": jpg, "txt": text, "json": json.dumps(meta).encode()}
                if task == "nlvr2":
                    sample["image2.jpg"] = jpegs[(i + 1) % len(jpegs)]
                w.write(sample)
        out[task] = d
    (root / "answers.json").write_text(json.dumps(["yes", "no", "cat", "blue", "two", "coffee"]))
    out["root"] = root
    return out


def ours(world, task: str, batch_size: int, resize: str = "vilt") -> torch.Tensor:
    """The teacher's logits through the project's data path, in shard order."""
    root = world["root"]
    cfg = load_config(None, [
        f"train.task={task}", f"data.val_shards={root}/{task}_shards/00000.tar", f"data.tokenizer={world[task]}",
        f"data.image_shorter={SHORTER}", f"data.image_longer={LONGER if resize == 'vilt' else 96}",
        f"data.image_resize={resize}", "data.num_workers=0", f"data.answer_vocab={root}/answers.json",
        "data.num_answers=6", "student.arch={width: 32, depth: 2, heads: 2, patch_size: 16, image_size: [64, 64], "
        "max_text_len: 16, vocab_size: 64}", "loss.ground_truth=1", "loss.attn_t2i=0", "loss.attn_i2t=0",
        "loss.soft_label=0"])
    return logits_through_data_path(cfg, HFViltTeacher.from_pretrained(world[task], task), batch_size)


def logits_through_data_path(cfg, teacher, batch_size: int) -> torch.Tensor:
    """``teacher``'s logits on cfg's val split read by the project's loader, in shard order."""
    rows = []
    with torch.no_grad():
        for batch in build_loader(cfg, "val", batch_size=batch_size):
            b = batch_to_device(batch, torch.device("cpu"), torch.float32)
            rows.append(teacher(b["images"], b["input_ids"], b["attention_mask"], b.get("images2")).logits)
    return torch.cat(rows)


def theirs(world, task: str, idx: list[int]) -> torch.Tensor:
    """transformers' ViltProcessor + model on the same JPEG bytes and texts."""
    proc = transformers.ViltProcessor.from_pretrained(world[task])
    model = getattr(transformers, TASKS[task]).from_pretrained(world[task]).eval()
    jpegs = world["jpegs"]
    images = [Image.open(io.BytesIO(jpegs[i])) for i in idx]
    enc = proc(images=images, text=[TEXTS[i] for i in idx], return_tensors="pt", padding=True)
    with torch.no_grad():
        if task != "nlvr2":
            return model(**enc).logits
        second = proc.image_processor([Image.open(io.BytesIO(jpegs[(i + 1) % len(jpegs)])) for i in idx],
                                      return_tensors="pt")
        h = max(enc["pixel_values"].shape[-2], second["pixel_values"].shape[-2])
        w = max(enc["pixel_values"].shape[-1], second["pixel_values"].shape[-1])

        def pad(x):
            return torch.nn.functional.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
        pixel_values = torch.stack([pad(enc["pixel_values"]), pad(second["pixel_values"])], 1)
        pixel_mask = torch.stack([pad(enc["pixel_mask"]), pad(second["pixel_mask"])], 1)
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixel_values,
                     pixel_mask=pixel_mask).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("task", list(TASKS))
def test_teacher_logits_through_our_data_path_equal_transformers_pipeline(world, task):
    n = len(world["jpegs"])
    batched = ours(world, task, batch_size=n)  # one batch of every orientation
    single = ours(world, task, batch_size=1)
    ref = torch.cat([theirs(world, task, [i]) for i in range(n)])
    ref_batched = theirs(world, task, list(range(n)))
    assert rel_err(single, ref) <= 1e-4, (single, ref)
    assert rel_err(batched, ref_batched) <= 1e-4, (batched, ref_batched)
    # the check has teeth: the outputs depend on the photo, and the old stretch misses
    spread = (ref - ref.mean(0)).abs().max() / ref.abs().max()
    assert spread > 1e-2
    assert rel_err(ours(world, task, batch_size=n, resize="stretch"), ref) > 1e-3


def test_geometry_follows_vilts_rule_for_every_orientation(world):
    """Each photo's patch grid is the processor's resized size / patch, long side kept where it
    was (a portrait stays tall)."""
    from dide_scale.data.pipeline import iter_raw_samples
    from dide_scale.data.transforms import Geometry, SampleDecoder
    proc = transformers.ViltImageProcessor(size={"shortest_edge": SHORTER}, size_divisor=PATCH)
    dec = SampleDecoder("itm", Geometry("vilt", SHORTER, LONGER, PATCH))
    raws = list(iter_raw_samples(f"{world['root']}/itm_shards/00000.tar"))
    grids = []
    for raw, jpg in zip(raws, world["jpegs"]):
        _, gh, gw = dec(raw)["image"]
        h, w = proc(images=[Image.open(io.BytesIO(jpg))], return_tensors="pt")["pixel_values"].shape[-2:]
        assert (gh * PATCH, gw * PATCH) == (h, w)
        grids.append((gh, gw))
    assert grids[2][0] > grids[2][1] and grids[5][0] > grids[5][1]  # portraits stay portrait
    assert grids[4][1] >= 3 * grids[4][0] - 1  # the panorama keeps its shape, capped by LONGER
