"""The DiDE recipe of docs/REPRODUCE.md, rehearsed: every command between its recipe markers, read
from the document and run in order, at tiny shapes on CPU, from ViLT checkpoints of
dandelin/ViLT's layout written here, data in the official raw formats (real photos), through two
ranks (``slurm/*.sbatch`` under ``bash`` with a stand-in ``srun``), to exported students that
answer through ``Predictor``.

To each command the rehearsal adds only what makes it tiny (``tiny``): the student's shape, image
size, steps, batch, shard ranges cut to the shards the converters wrote.  A command of a kind it
does not know fails the test, so the document cannot drift from what was rehearsed.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import put_in_hub_cache
from native_vilt import native_state, vilt_config, write_lightning_ckpt
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "REPRODUCE.md"
ANSWERS = ["yes", "no", "cat", "rocket", "coffee", "2", "red", "man"]  # as VQA normalises them
WORDS = ("a an the is there what color of cat man rocket coffee cup photo in this picture two images both show left "
         "right animal space woman sits drinks flies sky table on red yes no").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
ARCH = (f"{{width: 32, depth: 2, heads: 2, mlp_ratio: 4.0, patch_size: 16, image_size: [64, 64], max_text_len: 16, "
        f"vocab_size: {len(VOCAB)}}}")
CAPTIONS = ["a cat sits on the table", "a man in space", "a red rocket flies in the sky", "a cup of coffee",
            "a woman drinks coffee", "two images of a cat"]
SRUN = r'''#!/usr/bin/env python3
"""srun stand-in: start --ntasks copies of the command as one SLURM step on this host; the step
ends when all have, or when one fails (--kill-on-bad-exit)."""
import os, subprocess, sys, time
args, n = sys.argv[1:], 1
while args and args[0].startswith("--"):
    a = args.pop(0)
    if a.startswith("--ntasks="):
        n = int(a.split("=", 1)[1])
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS=str(n),
                                         SLURM_STEP_ID="0", SLURM_NTASKS_PER_NODE=str(n),
                                         SLURM_JOB_NODELIST="localhost")) for r in range(n)]
while True:
    codes = [p.poll() for p in procs]
    if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
        break
    time.sleep(0.2)
for p in procs:
    if p.poll() is None:
        p.kill()
sys.exit(max(abs(p.wait()) for p in procs))
'''


# -- the document --------------------------------------------------------------------------------

def recipe() -> list[tuple[str, str]]:
    """(language, command or program) in document order: each bash command (continuations
    joined, comments dropped) and each python block, between the recipe markers."""
    text = DOC.read_text()
    body = text.split("<!-- recipe", 1)[1].split("<!-- /recipe -->", 1)[0]
    out = []
    for lang, block in re.findall(r"```(bash|python)\n(.*?)```", body, flags=re.S):
        if lang == "python":
            out.append(("python", block))
            continue
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #", 1)[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(("bash", cmd))
    return out


def shrink(pattern: str, work: Path) -> str:
    """Each '::' source's brace range cut to the shards present (the converters wrote fewer)."""
    def one(src: str) -> str:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", src)
        if not m:
            return src
        n = len(list((work / Path(src).parent).glob("*.tar")))
        assert n, f"no shards where the preset reads {src}"
        return src[:m.start()] + f"{{{m.group(1)}..{n - 1:0{len(m.group(2))}d}}}" + src[m.end():]
    return "::".join(one(s) for s in pattern.split("::"))


def tiny(config: str, work: Path) -> list[str]:
    """What the rehearsal adds to a training command: shapes, steps, batch, shards."""
    from dide_scale.config import load_config
    cfg = load_config(config)
    ov = [f"student.arch={ARCH}", "data.image_shorter=32", "data.image_longer=53", "data.num_workers=0",
          "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=1",
          "train.save_every=0", "train.eval_every=0", "train.probe_every=0",
          f"data.train_shards={shrink(cfg.data.train_shards, work)}"]
    if cfg.data.val_shards:
        ov.append(f"data.val_shards={shrink(cfg.data.val_shards, work)}")
    if cfg.train.task == "vqa":
        ov.append(f"data.num_answers={len(ANSWERS)}")
    return ov


# -- the files the recipe reads --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sources() -> tuple:
    return tuple(f() for f in (skimage_data.astronaut, skimage_data.coffee, skimage_data.chelsea, skimage_data.rocket))


def photo(i: int, fmt: str = "JPEG") -> bytes:
    """A real photo, cropped differently per index (landscape, portrait, square), at most 96 px."""
    a = _sources()[i % 4]
    h, w = a.shape[:2]
    ch, cw = [(h // 2, w // 2), (h // 2, w // 4), (h // 3, w // 3)][i % 3]
    y, x = (i * 37) % (h - ch), (i * 53) % (w - cw)
    im = Image.fromarray(a[y:y + ch, x:x + cw])
    im.thumbnail((96, 96))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def put(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def jsonl(rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def write_checkpoints(work: Path, tok) -> None:
    """ViLT's release at tiny shape: the MLM+ITM model (with itm_score), VQA (+ vqa_dict.json), NLVR2."""
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
                patch_size=16, max_position_embeddings=16, vocab_size=len(tok), initializer_range=0.2)
    (work / "pretrained").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    mlm = transformers.ViltForMaskedLM(transformers.ViltConfig(**base)).eval()
    sd = native_state(mlm)
    sd["itm_score.fc.weight"], sd["itm_score.fc.bias"] = torch.randn(2, 32) * 0.2, torch.zeros(2)
    write_lightning_ckpt(work / "pretrained" / "vilt_200k_mlm_itm.ckpt", sd, vilt_config(mlm))
    vqa = transformers.ViltForQuestionAnswering(transformers.ViltConfig(
        **base, id2label=dict(enumerate(ANSWERS)))).eval()
    write_lightning_ckpt(work / "pretrained" / "vilt_vqa.ckpt", native_state(vqa, "vqa"),
                         vilt_config(vqa, vqav2_label_size=len(ANSWERS)))
    put(work / "pretrained" / "vqa_dict.json", {str(i): a for i, a in enumerate(ANSWERS)})
    nlvr2 = transformers.ViltForImagesAndTextClassification(transformers.ViltConfig(
        **base, num_images=2, modality_type_vocab_size=3, id2label={0: "False", 1: "True"})).eval()
    write_lightning_ckpt(work / "pretrained" / "vilt_nlvr2.ckpt", native_state(nlvr2, "nlvr2"), vilt_config(nlvr2))


def write_coco_vg_web(work: Path) -> None:
    raw = work / "raw"
    split = {1: "train", 2: "train", 3: "train", 4: "train", 42: "val", 43: "restval", 44: "test"}
    anns = {"train2014": {"images": [], "annotations": []}, "val2014": {"images": [], "annotations": []}}
    karpathy = []
    for n, (iid, s) in enumerate(split.items()):
        sub = "train2014" if s == "train" else "val2014"
        name = f"COCO_{sub}_{iid:012d}.jpg"
        put(raw / "coco" / sub / name, photo(n))
        anns[sub]["images"].append({"id": iid, "file_name": name, "width": 1, "height": 1})
        for c in range(3):
            anns[sub]["annotations"].append({"id": 100 * iid + c, "image_id": iid, "caption": CAPTIONS[(n + c) % 6]})
        karpathy.append({"cocoid": iid, "split": s, "filename": name, "filepath": sub, "sentences": [{"raw": "x"}]})
    for iid in (100, 101, 102):
        put(raw / "coco" / "test2015" / f"COCO_test2015_{iid:012d}.jpg", photo(iid))
    for sub, a in anns.items():
        put(raw / "coco" / "annotations" / f"captions_{sub}.json", a)
    put(raw / "coco" / "dataset_coco.json", {"images": karpathy})
    regions, image_data = [], []
    for iid in range(1, 5):
        put(raw / "vg" / "VG_100K" / f"{iid}.jpg", photo(10 + iid))
        image_data.append({"image_id": iid, "url": "x", "width": 1, "height": 1, "coco_id": None})
        regions.append({"id": iid, "regions": [{"region_id": 10 * iid + r, "image_id": iid, "phrase": CAPTIONS[r],
                                                "x": 0, "y": 0, "width": 1, "height": 1} for r in range(3)]})
    put(raw / "vg" / "region_descriptions.json", regions)
    put(raw / "vg" / "image_data.json", image_data)
    for name, first in (("sbu", 20), ("cc3m", 40)):  # img2dataset's webdataset output
        (raw / name).mkdir(parents=True)
        with tarfile.open(raw / name / "00000.tar", "w") as tf:
            for i in range(10):
                key = f"{first + i:09d}"
                for suffix, data in (("jpg", photo(first + i)), ("txt", CAPTIONS[i % 6].encode()),
                                     ("json", json.dumps({"key": key, "caption": CAPTIONS[i % 6],
                                                          "status": "success"}).encode())):
                    ti = tarfile.TarInfo(f"{key}.{suffix}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        put(raw / name / "00000_stats.json", {"successes": 10, "count": 10})


def write_tasks(work: Path) -> None:
    raw = work / "raw"
    questions = ["is there a cat", "what is in the picture", "what color is the sky", "is there a man"]
    for split, ids, sub in (("train2014", [1, 2, 3, 4], "train2014"), ("val2014", [42, 43, 44], "val2014"),
                            ("test-dev2015", [100, 101, 102], "test2015")):
        qs, anns = [], []
        for i, iid in enumerate(ids):
            for k, q in enumerate(questions):
                qid = iid * 10 + k
                qs.append({"image_id": iid, "question": q, "question_id": qid})
                ans = [ANSWERS[(i + k) % len(ANSWERS)]] * 7 + [ANSWERS[(i + k + 1) % len(ANSWERS)]] * 3
                anns.append({"question_id": qid, "image_id": iid, "answer_type": "other", "question_type": q[:7],
                             "multiple_choice_answer": ans[0],
                             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                         for j, a in enumerate(ans)]})
        put(raw / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json", {"data_subtype": sub, "questions": qs})
        if split != "test-dev2015":
            put(raw / "vqa" / f"v2_mscoco_{split}_annotations.json", {"annotations": anns})
    for split, n in (("train", 16), ("dev", 8), ("test1", 8)):
        rows = []
        for i in range(n):
            pair = f"{split}-{i}-0"
            folder = raw / "nlvr2" / "images" / split / (str(i % 3) if split == "train" else "")
            put(folder / f"{pair}-img0.png", photo(i, "PNG"))
            put(folder / f"{pair}-img1.png", photo(i + 5, "PNG"))
            rows.append({"identifier": f"{pair}-{i}", "sentence": CAPTIONS[i % 6], "label": str(i % 2 == 0),
                         "left_url": "x", "right_url": "y"})
        put(raw / "nlvr2" / "data" / f"{split}.json", jsonl(rows))
    labels = ["entailment", "neutral", "contradiction"]
    for split, n in (("train", 16), ("dev", 8), ("test", 8)):
        rows = []
        for i in range(n):
            fid = f"{split}{i % 4}"
            put(raw / "flickr30k" / "flickr30k_images" / f"{fid}.jpg", photo(30 + i % 4))
            rows.append({"Flickr30K_ID": fid, "sentence1": "p", "sentence2": CAPTIONS[i % 6],
                         "gold_label": labels[i % 3], "pairID": f"{fid}.jpg#{i}"})
        put(raw / "snli_ve" / f"snli_ve_{split}.jsonl", jsonl(rows))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch directory holding everything the recipe reads, and a Hub cache with ViLT's
    tokenizer (bert-base-uncased, tiny here) read offline."""
    from huggingface_hub import constants

    from dide_scale.models import sources
    w = tmp_path / "work"
    tok_dir = put(tmp_path / "tok" / "vocab.txt", "\n".join(VOCAB) + "\n").parent
    tok = transformers.BertTokenizerFast.from_pretrained(str(tok_dir))
    tok.save_pretrained(tok_dir)
    put_in_hub_cache(tmp_path / "hub", "bert-base-uncased", tok_dir)
    write_checkpoints(w, tok)
    write_coco_vg_web(w)
    write_tasks(w)
    put(tmp_path / "bin" / "srun", SRUN).chmod(0o755)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(w)
    sources._resolve_cached.cache_clear()
    yield w
    sources._resolve_cached.cache_clear()


# -- running the recipe ----------------------------------------------------------------------------

def run_sbatch(argv: list[str], work: Path, job: int) -> str:
    """``sbatch [options] slurm/X.sbatch CONFIG [overrides]`` as bash + the srun stand-in, 2 ranks."""
    from dide_scale.distributed import free_port
    script = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
    config, overrides = argv[script + 1], argv[script + 2:]
    from dide_scale.distributed import TORCHRUN_VARS
    # a job starts clean: an in-process run earlier in this session exported torchrun's variables
    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    env = dict(clean, PATH=f"{work.parent / 'bin'}{os.pathsep}{os.environ['PATH']}", DIDE_TASKS_PER_NODE="2",
               SLURM_JOB_ID=str(job), SLURM_JOB_NUM_NODES="1", SLURM_CPUS_ON_NODE="2", DIDE_MASTER_ADDR="127.0.0.1",
               DIDE_MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(["bash", str(REPO / argv[script]), config, *overrides, *tiny(config, work)], cwd=work,
                         env=env, capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, f"{shlex.join(argv)} exited {res.returncode}:\n{(res.stdout + res.stderr)[-6000:]}"
    return res.stdout + res.stderr


def run_inprocess(fn, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fn(argv)
    assert rc == 0, f"{argv} exited {rc}: {out.getvalue()[-3000:]}"
    return out.getvalue()


def test_the_recipe_runs_as_written_from_native_checkpoints_to_answering_students(work):
    from dide_scale.data.cli import main as dide_data
    from dide_scale.evaluate import main as dide_eval
    from dide_scale.export import main as export_main
    steps = recipe()
    kinds = [shlex.split(c)[0] if lang == "bash" else "python" for lang, c in steps]
    assert kinds.count("sbatch") == 5 and kinds.count("dide-eval") == 3 and kinds.count("dide-data") >= 13
    printed, evals = "", {}
    for job, (lang, cmd) in enumerate(steps):
        if lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(cmd, str(DOC), "exec"), {"__name__": "__recipe__"})
            printed += out.getvalue()
            continue
        argv = shlex.split(cmd)
        if argv[0] == "dide-data":
            run_inprocess(dide_data, [*argv[1:], "--samples-per-shard", "4", "--no-progress"])
        elif argv[0] == "sbatch":
            log = run_sbatch(argv[1:], work, job)
            assert "world 2" in log, log[-3000:]  # two ranks, through srun's environment
        elif argv[0] == "dide-eval":
            argv = [shrink(a, work) if "{" in a else a for a in argv]
            evals[argv[argv.index("--model") + 1]] = json.loads(run_inprocess(dide_eval, argv[1:]))
        elif argv[0] == "dide-export":
            run_inprocess(export_main, argv[1:])
        elif argv[:3] == ["python", "-m", "dide_scale.export"]:
            run_inprocess(export_main, argv[3:])
        else:
            pytest.fail(f"docs/REPRODUCE.md has a recipe command the rehearsal does not know how to run: {cmd}")

    runs = work / "runs"
    # the teachers are the paper's: ViLT's own files, and the SNLI-VE teacher made in step 2
    import yaml
    seen = {d.name: yaml.safe_load((d / "config.yaml").read_text()) for d in runs.iterdir() if d.is_dir()}
    assert seen["pretrain_b32"]["teacher"]["kind"] == "vilt_ckpt"
    assert seen["pretrain_b32"]["student"]["init"] == "vilt:pretrained/vilt_200k_mlm_itm.ckpt"
    assert seen["finetune_vqa"]["teacher"]["path"] == "pretrained/vilt_vqa.ckpt"
    assert seen["finetune_snli_ve"]["teacher"]["path"] == "runs/finetune_snli_ve_teacher/best"
    assert json.loads((runs / "finetune_snli_ve_teacher" / "best" / "config.json").read_text())["model_type"] == \
        "dide_fusion"
    for name in ("pretrain_b32", "finetune_vqa", "finetune_nlvr2", "finetune_snli_ve"):
        hist = [json.loads(x) for x in (runs / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in hist] == [1, 2]
        for part in ("attn_t2i", "attn_i2t", "soft_label"):  # distilled from its teacher, every step
            assert all(torch.isfinite(torch.tensor(h[f"loss/{part}"])) for h in hist), (name, part)
        assert (runs / name / "logs" / "rank001.log").exists()
    # evaluation on the official splits: every sample counted once over the two ranks' shares
    assert evals["runs/finetune_nlvr2/best"]["n"] == 8 and evals["runs/finetune_snli_ve/best"]["n"] == 8
    assert 0.0 <= evals["runs/finetune_nlvr2/best"]["accuracy"] <= 1.0
    answers = json.loads((runs / "finetune_vqa" / "test-dev.json").read_text())
    assert sorted(a["question_id"] for a in answers) == sorted(iid * 10 + k for iid in (100, 101, 102)
                                                               for k in range(4))
    assert {a["answer"] for a in answers} <= set(ANSWERS)
    assert (work / "releases" / "dide-b32-vqa-last" / "model.safetensors").exists()
    # the exported VQA student answers through Predictor, in the teacher's answer names
    top = eval(printed.strip().splitlines()[-1])  # the recipe's print of predictor.answer(...)
    assert len(top) == 1 and len(top[0]) == 3 and all(a in ANSWERS and 0 <= p <= 1 for a, p in top[0])
    from dide_scale.inference import Predictor
    for task in ("nlvr2", "snli_ve"):
        p = Predictor.from_pretrained(f"runs/finetune_{task}/best")
        im = work / "raw" / "coco" / "val2014" / "COCO_val2014_000000000042.jpg"
        pair = [str(im)] if task == "snli_ve" else [str(im)]
        out = p.answer(pair, ["a cat sits on the table"], images2=pair if task == "nlvr2" else None)
        assert out[0][0][0] in (("False", "True") if task == "nlvr2" else ("entailment", "neutral", "contradiction"))
    assert sys.modules.get("pytorch_lightning") is None
