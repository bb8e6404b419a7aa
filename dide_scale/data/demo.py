"""The procedural demo dataset: scenes of coloured shapes with captions and questions.

Everything is drawn by the project, seeded and reproducible, and written as real
webdataset shards in the img2dataset layout, so the demo needs no download.

Question types are graded in difficulty: existence and attributes are learned first,
counting later.  Every answer needs the image *and* the text.  Accuracy is reported per
type.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .shards import ShardWriter, jpeg_bytes, sample

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
          "purple": (165, 60, 210), "white": (235, 235, 235)}
SHAPES = ("square", "circle", "triangle")
SIZES = ("small", "large")
COUNTS = ("zero", "one", "two", "three", "four")
ANSWERS = ("yes", "no", *COLORS, *SHAPES, *COUNTS)
# VQA question types.  'relation' ("is the X left of the Y ?") is not asked: a fusion teacher
# of the demo's sizes stayed at chance on it (and on "is the X in the left half ?") after
# 3000-6000 steps, and a teacher that cannot answer a question has nothing to distil about it.
QTYPES = ("exist", "color", "shape", "count")
QTYPE_WEIGHTS = (0.3, 0.25, 0.25, 0.2)
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
NEUTRAL_PROPS = ("heavy", "wooden", "new", "old")
_WORDS = ("a an the is there what color shape object objects how many are left right of above below in "
          "image images both contain contains exactly one has and , . ? first second no not made "
          "statement true false").split()
VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         *dict.fromkeys([*_WORDS, *COLORS, *SHAPES, *SIZES, *COUNTS, *ANSWERS, *NEUTRAL_PROPS]))


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def make_scene(rng: random.Random, grid: int = 4, n_min: int = 2, n_max: int = 4) -> list[Obj]:
    cells = rng.sample(range(grid * grid), rng.randint(n_min, n_max))
    return [Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIZES), c // grid, c % grid) for c in cells]


def render(scene: list[Obj], size: int = 32, grid: int = 4, rng: random.Random | None = None) -> Image.Image:
    """Draw at 4x and downsample (anti-aliased shapes); light background noise."""
    s = 4
    cell = size * s // grid
    img = Image.new("RGB", (size * s, size * s), (28, 28, 32))
    d = ImageDraw.Draw(img)
    for o in scene:
        pad = cell * (0.08 if o.size == "large" else 0.28)
        x0, y0 = o.col * cell + pad, o.row * cell + pad
        x1, y1 = (o.col + 1) * cell - pad, (o.row + 1) * cell - pad
        fill = COLORS[o.color]
        if o.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        elif o.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    img = img.resize((size, size), Image.LANCZOS)
    if rng is not None:  # a little sensor noise so the task is not pixel-exact
        px = img.load()
        for _ in range(size * size // 8):
            x, y = rng.randrange(size), rng.randrange(size)
            r, g, b = px[x, y]
            n = rng.randint(-12, 12)
            px[x, y] = (max(0, min(255, r + n)), max(0, min(255, g + n)), max(0, min(255, b + n)))
    return img


def caption(scene: list[Obj]) -> str:
    objs = sorted(scene, key=lambda o: (o.row, o.col))
    names = [f"a {o.size} {o.color} {o.shape}" for o in objs]
    return (" , ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + " ."


def _listing(objs: list[Obj], sizes: bool = True) -> str:
    names = [f"a {o.size} {o.color} {o.shape}" if sizes else f"a {o.color} {o.shape}" for o in objs]
    return " , ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def references(scene: list[Obj], rng: random.Random) -> list[str]:
    """Five captions of a scene, as COCO has five per image: :func:`caption` (objects in
    reading order) and four paraphrases in the demo's own vocabulary (other openings, other
    orders, one without sizes).  ``rng`` must be a stream of its own (the scene's stream
    stays as it is), and picks the orders of the shuffled paraphrases."""
    rows = sorted(scene, key=lambda o: (o.row, o.col))
    cols = sorted(scene, key=lambda o: (o.col, o.row))
    shuffled = rng.sample(rows, len(rows))
    n = len(scene)
    there = f"there are {COUNTS[n]} objects in the image" if n > 1 else "there is one object in the image"
    return [caption(scene),
            f"there is {_listing(rng.sample(rows, n))} .",
            f"the image has {_listing(cols)} .",
            f"{_listing(shuffled)} {'are' if n > 1 else 'is'} in the image .",
            f"{there} , {_listing(rows, sizes=False)} ."]


def _unique(scene, key) -> list[Obj]:
    vals = [key(o) for o in scene]
    return [o for o in scene if vals.count(key(o)) == 1]


def question(scene: list[Obj], rng: random.Random, qtype: str | None = None) -> tuple[str, str, str]:
    """(question, answer, qtype); falls back to 'exist' when a type has no valid subject."""
    qtype = qtype or rng.choices(QTYPES, QTYPE_WEIGHTS)[0]
    if qtype == "color" and (u := _unique(scene, lambda o: o.shape)):
        o = rng.choice(u)
        return f"what color is the {o.shape} ?", o.color, qtype
    if qtype == "shape" and (u := _unique(scene, lambda o: o.color)):
        o = rng.choice(u)
        return f"what shape is the {o.color} object ?", o.shape, qtype
    if qtype == "count":
        c = rng.choice([o.color for o in scene] + list(COLORS)[:2])
        n = sum(o.color == c for o in scene)
        return f"how many {c} objects are there ?", COUNTS[n], qtype
    if qtype == "relation" and len(u := _unique(scene, lambda o: o.name)) >= 2:
        a, b = rng.sample(u, 2)
        true_rels = [r for r, (dr, dc) in RELATIONS.items()
                     if (dr and (b.row - a.row) * dr < 0) or (dc and (b.col - a.col) * dc < 0)]
        false_rels = [r for r in RELATIONS if r not in true_rels]
        # yes and no equally often, so a model that ignores the image scores 50%, not a majority
        rel = rng.choice(true_rels if true_rels and (rng.random() < 0.5 or not false_rels) else false_rels)
        return f"is the {a.name} {rel} the {b.name} ?", "yes" if rel in true_rels else "no", qtype
    # existence, balanced yes/no
    if rng.random() < 0.5:
        o = rng.choice(scene)
        return f"is there a {o.name} ?", "yes", "exist"
    present = {o.name for o in scene}
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    return f"is there a {rng.choice(absent)} ?", "no", "exist"


def nlvr2_statement(left: list[Obj], right: list[Obj], rng: random.Random) -> tuple[str, bool]:
    kind = rng.randrange(3)
    if kind == 0:
        side, scene = rng.choice([("left", left), ("right", right)])
        o = rng.choice(left + right)
        return f"the {side} image has a {o.name} .", any(x.name == o.name for x in scene)
    if kind == 1:
        c = rng.choice([o.color for o in left + right])
        return f"both images contain a {c} object .", any(o.color == c for o in left) and any(
            o.color == c for o in right)
    s = rng.choice(SHAPES)
    n = sum(any(o.shape == s for o in sc) for sc in (left, right))
    return f"exactly one image contains a {s} .", n == 1


def snli_hypothesis(scene: list[Obj], rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        o = rng.choice(scene)
        return f"the {o.name} is {rng.choice(NEUTRAL_PROPS)} .", "neutral"
    if kind == 1:
        o = rng.choice(scene)
        return f"there is a {o.name} .", "entailment"
    present = {o.name for o in scene}
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    return f"there is a {rng.choice(absent)} .", "contradiction"


def generate_split(out_dir: str | Path, n: int, seed: int, task: str = "vqa", size: int = 32, grid: int = 4,
                   samples_per_shard: int = 1000, progress: bool = False) -> Path:
    """Write ``n`` samples of ``task`` ('vqa' also carries captions for ITM; 'nlvr2'; 'snli_ve';
    'caption': the scene's caption with four paraphrases as its references, drawn from a
    stream of their own per sample); ``progress`` shows a bar (it draws nothing from ``rng``)."""
    from tqdm import tqdm
    out = Path(out_dir)
    rng = random.Random(f"dide-demo/{task}/{seed}")
    with ShardWriter(out, samples_per_shard) as w:
        for i in tqdm(range(n), desc=str(out), unit=" samples", disable=not progress, leave=True):
            key = f"{i // samples_per_shard:05d}{i % samples_per_shard:04d}"
            scene = make_scene(rng, grid)
            img = jpeg_bytes(render(scene, size, grid, rng))
            cap = caption(scene)
            scene_meta = [o.__dict__ for o in scene]
            if task == "vqa":
                q, a, qt = question(scene, rng)
                w.write(sample(key, img, cap, {"question": q, "answers": {a: 1.0}, "qtype": qt,
                                              "scene": scene_meta}))
            elif task == "nlvr2":
                right = make_scene(rng, grid)
                text, label = nlvr2_statement(scene, right, rng)
                w.write(sample(key, img, cap, {"sentence": text, "label": label, "qtype": "nlvr2"},
                               **{"image2.jpg": jpeg_bytes(render(right, size, grid, rng))}))
            elif task == "snli_ve":
                hyp, label = snli_hypothesis(scene, rng)
                w.write(sample(key, img, cap, {"hypothesis": hyp, "label": label, "qtype": label}))
            elif task == "caption":
                refs = references(scene, random.Random(f"dide-demo/caption-references/{seed}/{i}"))
                w.write(sample(key, img, cap, {"image_id": key, "references": refs, "scene": scene_meta}))
            else:
                raise ValueError(f"unknown demo task {task!r}")
    return out


def write_vocab(d: str | Path) -> Path:
    """Write the demo word-piece vocabulary (loadable by BertTokenizerFast) and the answer list."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (d / "answers.json").write_text(json.dumps(list(ANSWERS)))
    return d
