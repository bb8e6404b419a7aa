"""``dide-data``: dataset preparation.

    dide-data demo --out DIR [--train N --val N --tasks vqa,nlvr2,snli_ve,caption]
    dide-data inspect 'DIR/{00000..00009}.tar' ...

Converters (official files -> shards + sizes.json; resumable: re-run the same command
after an interruption; see dide_scale/data/convert/ for the choices made):

    dide-data coco --annotations captions_train2014.json captions_val2014.json --images COCO_DIR \\
        --karpathy dataset_coco.json --out DIR [--splits test]
    dide-data flickr30k --karpathy dataset_flickr30k.json --images flickr30k-images --out DIR [--splits test]
    dide-data vg --regions region_descriptions.json --image-data image_data.json --images VG_DIR --out DIR
    dide-data img2dataset CC3M_DIR                      # validate, write CC3M_DIR/sizes.json
    dide-data img2dataset CC3M_DIR --samples-per-shard N --out DIR   # re-shard
    dide-data vqa --questions Q.json --annotations A.json --images COCO_DIR --out DIR
        [--answers answers.json | --answers-from TEACHER]
    dide-data nlvr2 --data train.json --images NLVR2_IMAGES --out DIR
    dide-data snli_ve --data snli_ve_train.jsonl --images flickr30k_images --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..console import add_version, quiet_libraries
from ..models.sources import TOKENIZER_FILES, resolve_source


def cmd_demo(args) -> int:
    from .demo import generate_split, write_vocab
    from .shards import shard_pattern
    out = Path(args.out)
    for task in args.tasks.split(","):
        for split, n, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 10_000)):
            d = out / task / split
            generate_split(d, n, seed, task, size=args.size, samples_per_shard=args.per_shard,
                           progress=not args.no_progress)
            print(f"{d}: {n} samples, {shard_pattern(d)}")
    write_vocab(out / "tokenizer")
    return 0


def cmd_inspect(args) -> int:
    """One JSON line per shard on stdout, one error line per problem on stderr; exit 1 when
    any pattern or shard could not be read in full."""
    from .pipeline import expand_sources
    failed = False
    for pattern in args.shards:
        try:
            sources = expand_sources(pattern)
        except (FileNotFoundError, ValueError) as e:
            print(f"dide-data: error: {e}", file=sys.stderr)
            failed = True
            continue
        for s in sources:
            for i, url in enumerate(s.urls):
                expected = s.sizes[i] if s.sizes is not None else None
                failed |= not inspect_shard(url, expected)
    return 1 if failed else 0


def inspect_shard(url: str, expected: int | None) -> bool:
    """Count one shard's samples and members; False (after an error line) when it cannot be
    read to the end or holds another count than its sizes.json says."""
    from .pipeline import iter_raw_samples
    n, members = 0, set()
    try:
        for raw in iter_raw_samples(url):
            n += 1
            members.update(k for k in raw if not k.startswith("__"))
    except Exception as e:  # report it and go on with the next shard
        print(f"dide-data: error: {url}: unreadable after {n} samples: {e.__class__.__name__}: {e}", file=sys.stderr)
        return False
    print(json.dumps({"shard": url, "samples": n, "members": sorted(members)}), flush=True)
    if expected is not None and n != expected:
        print(f"dide-data: error: {url}: {n} samples, but sizes.json says {expected}", file=sys.stderr)
        return False
    return True


def _run_converter(fn, **kwargs) -> int:
    from .convert import InputError
    try:
        stats = fn(**kwargs)
    except InputError as e:
        print(f"dide-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1))
    return 0


def cmd_coco(args) -> int:
    from .convert import convert_coco
    return _run_converter(convert_coco, ann_json=args.annotations, image_dir=args.images, out_dir=args.out,
                          karpathy_json=args.karpathy, splits=tuple(args.splits.split(",")),
                          samples_per_shard=args.samples_per_shard, seed=args.seed, progress=not args.no_progress,
                          order=args.order)


def cmd_flickr30k(args) -> int:
    from .convert import convert_flickr30k
    return _run_converter(convert_flickr30k, karpathy_json=args.karpathy, image_dir=args.images, out_dir=args.out,
                          splits=tuple(args.splits.split(",")), samples_per_shard=args.samples_per_shard,
                          seed=args.seed, progress=not args.no_progress, order=args.order)


def cmd_vg(args) -> int:
    from .convert import convert_vg
    return _run_converter(convert_vg, region_json=args.regions, image_dir=args.images, out_dir=args.out,
                          image_data_json=args.image_data, karpathy_json=args.karpathy,
                          max_regions_per_image=args.max_regions_per_image, samples_per_shard=args.samples_per_shard,
                          seed=args.seed, progress=not args.no_progress)


def cmd_img2dataset(args) -> int:
    from .convert import convert_img2dataset
    if (args.samples_per_shard is None) != (args.out is None):
        print("dide-data: error: re-sharding needs both --samples-per-shard and --out (neither: validate in place)",
              file=sys.stderr)
        return 2
    return _run_converter(convert_img2dataset, in_dir=args.input, out_dir=args.out,
                          samples_per_shard=args.samples_per_shard, progress=not args.no_progress)


def teacher_answers(teacher: str) -> list[str]:
    """A VQA teacher's answers in its own output order: a model directory's config.json id2label
    (a local folder or a Hugging Face Hub id), or a JSON file naming them (ViLT's vqa_dict.json,
    which its own .ckpt files go with)."""
    from ..labels import read_label_file
    from ..models.hub import names_from_id2label
    if Path(teacher).is_file():
        return read_label_file(teacher, "--answers-from")
    teacher_dir = resolve_source(teacher, "--answers-from", TOKENIZER_FILES)
    cfg_file = Path(teacher_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--answers-from {teacher_dir}: no config.json (expected a model directory)")
    names = names_from_id2label(json.loads(cfg_file.read_text()).get("id2label"))
    if not names:
        raise ValueError(f"--answers-from {teacher_dir}: its config.json has no answer names (id2label)")
    return names


def cmd_vqa(args) -> int:
    from .convert import convert_vqa
    answers = args.answers
    if args.answers_from:
        if args.answers:
            print("dide-data: error: give --answers or --answers-from, not both", file=sys.stderr)
            return 2
        try:
            answers = teacher_answers(args.answers_from)
        except (FileNotFoundError, ValueError) as e:
            print(f"dide-data: error: {e}", file=sys.stderr)
            return 2
    return _run_converter(convert_vqa, questions_json=args.questions, image_dir=args.images, out_dir=args.out,
                          annotations_json=args.annotations, answer_vocab=answers, num_answers=args.num_answers,
                          samples_per_shard=args.samples_per_shard, progress=not args.no_progress)


def cmd_nlvr2(args) -> int:
    from .convert import convert_nlvr2
    return _run_converter(convert_nlvr2, data_jsonl=args.data, image_dir=args.images, out_dir=args.out,
                          samples_per_shard=args.samples_per_shard, progress=not args.no_progress)


def cmd_snli_ve(args) -> int:
    from .convert import convert_snli_ve
    return _run_converter(convert_snli_ve, data_jsonl=args.data, image_dir=args.images, out_dir=args.out,
                          samples_per_shard=args.samples_per_shard, progress=not args.no_progress)


def _converter(sub, name: str, help: str, fn, out_required: bool = True, per_shard_default: int | None = 1000):
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--out", required=out_required, help="output directory for the shards (re-run to resume)")
    p.add_argument("--samples-per-shard", type=int, default=per_shard_default, metavar="N",
                   help="samples per .tar shard" + (f" (default {per_shard_default})" if per_shard_default else ""))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=fn)
    return p


def _order_option(p) -> None:
    p.add_argument("--order", choices=("shuffle", "image"), default=None,
                   help="pairs shuffled (training) or each image's captions together (evaluation: a retrieval "
                        "evaluation split over ranks embeds each image once); default: shuffle when train or "
                        "restval is kept, else image")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dide-data", description="dataset preparation")
    add_version(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo_help = "write the procedural demo shards (scenes of coloured shapes with captions and questions)"
    d = sub.add_parser("demo", help=demo_help, description=demo_help + ": OUT/TASK/{train,val}/NNNNN.tar with "
                       "sizes.json, and the demo vocabulary in OUT/tokenizer. The debug config reads "
                       "runs/demo_data/vqa.")
    d.add_argument("--out", required=True, help="output folder (the debug config reads runs/demo_data)")
    d.add_argument("--train", type=int, default=20_000, metavar="N", help="training samples per task (default 20000)")
    d.add_argument("--val", type=int, default=2_000, metavar="N", help="held-out samples per task (default 2000)")
    d.add_argument("--tasks", default="vqa", help="comma-separated, of vqa (with captions, for ITM too), nlvr2, "
                                                   "snli_ve, caption (default vqa)")
    d.add_argument("--size", type=int, default=32, metavar="PX", help="image side in pixels (default 32)")
    d.add_argument("--per-shard", type=int, default=2_000, metavar="N", help="samples per .tar shard (default 2000)")
    d.add_argument("--seed", type=int, default=0, help="seed of the training split; the held-out split uses "
                                                       "seed + 10000 (default 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=cmd_demo)
    inspect_help = "count the samples and members of shards, checking each against its sizes.json"
    i = sub.add_parser("inspect", help=inspect_help, description=inspect_help + "; prints one JSON line per shard "
                       "and exits 1 when a shard is missing, a folder, unreadable or of another count")
    i.add_argument("shards", nargs="+", metavar="SHARDS",
                   help="shard files or brace patterns as training takes them, e.g. 'data/cc3m/{00000..00331}.tar' "
                        "(quote a pattern so the shell leaves it alone)")
    i.set_defaults(fn=cmd_inspect)

    c = _converter(sub, "coco", "COCO captions -> one sample per (image, caption) pair", cmd_coco)
    c.add_argument("--annotations", nargs="+", required=True, metavar="JSON",
                   help="official caption files (captions_train2014.json, captions_val2014.json)")
    c.add_argument("--images", required=True, help="image folder, searched recursively by file name")
    c.add_argument("--karpathy", help="Karpathy split file dataset_coco.json: keeps only --splits images")
    c.add_argument("--splits", default="train,restval", help="Karpathy splits to keep (default train,restval)")
    c.add_argument("--seed", type=int, default=0, help="seed of the pair shuffle")
    _order_option(c)
    f = _converter(sub, "flickr30k", "Flickr30K (Karpathy's split file) -> one sample per (image, caption) pair",
                   cmd_flickr30k)
    f.add_argument("--karpathy", required=True, help="Karpathy's dataset_flickr30k.json (splits and captions)")
    f.add_argument("--images", required=True, help="the flickr30k-images folder, searched recursively by file name")
    f.add_argument("--splits", default="train", help="Karpathy splits to keep (default train; test: the 1K test set)")
    f.add_argument("--seed", type=int, default=0, help="seed of the pair shuffle")
    _order_option(f)
    v = _converter(sub, "vg", "Visual Genome region descriptions -> one sample per (image, region phrase)", cmd_vg)
    v.add_argument("--regions", required=True, help="region_descriptions.json")
    v.add_argument("--image-data", help="image_data.json (sizes, coco ids)")
    v.add_argument("--images", required=True, help="folder with {image_id}.jpg, searched recursively")
    v.add_argument("--karpathy", help="dataset_coco.json: drop VG images that are COCO Karpathy val/test images")
    v.add_argument("--max-regions-per-image", type=int, help="keep at most K regions per image (seeded)")
    v.add_argument("--seed", type=int, default=0, help="seed of the pair shuffle")
    g = _converter(sub, "img2dataset", "validate img2dataset output (CC3M, SBU) and write sizes.json; "
                   "re-shard with --samples-per-shard and --out", cmd_img2dataset, out_required=False,
                   per_shard_default=None)
    g.add_argument("input", help="img2dataset output folder (NNNNN.tar shards)")
    q = _converter(sub, "vqa", "VQAv2 questions (+ annotations) -> one sample per question", cmd_vqa)
    q.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_{split}_questions.json")
    q.add_argument("--annotations", help="v2_mscoco_{split}_annotations.json (omit for test)")
    q.add_argument("--images", required=True, help="COCO image folder (COCO_{split}2014_{id:012d}.jpg)")
    q.add_argument("--answers", help="answers.json to use (train's, for val); default: build from --annotations")
    q.add_argument("--answers-from", metavar="TEACHER",
                   help="use a VQA teacher's answers in its own order (a model folder or Hub id: its config.json "
                        "id2label; or ViLT's vqa_dict.json), so the student's head and the teacher's soft labels "
                        "share one label space")
    q.add_argument("--num-answers", type=int, default=3129, help="vocabulary size when building it (default 3129)")
    n = _converter(sub, "nlvr2", "NLVR2 JSON lines + image pairs -> one sample per example", cmd_nlvr2)
    n.add_argument("--data", required=True, help="train.json / dev.json / test1.json (JSON lines)")
    n.add_argument("--images", required=True, help="image folder, searched recursively by file name")
    e = _converter(sub, "snli_ve", "SNLI-VE JSON lines over Flickr30K -> one sample per hypothesis", cmd_snli_ve)
    e.add_argument("--data", required=True, help="snli_ve_{train,dev,test}.jsonl")
    e.add_argument("--images", required=True, help="Flickr30K image folder ({Flickr30K_ID}.jpg)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
