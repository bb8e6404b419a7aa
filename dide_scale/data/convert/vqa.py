"""VQAv2 questions + annotations -> one sample per question, with soft answer scores."""
from __future__ import annotations

import collections
import functools
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..shards import sample
from .common import (
    InputError,
    PathLike,
    Skip,
    _check_unique,
    _clean_text,
    _index_by_id,
    _list_field,
    _load_json,
    _need,
    image_bytes,
    write_shards,
)

_CONTRACTIONS = dict(p.split(":") for p in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
    "howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've "
    "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
    "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
    "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
    "somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's "
    "theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas "
    "wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're "
    "whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd "
    "whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're "
    "whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've "
    "yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've "
    "youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've").split())
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # the official "(?!<=\d)(\.)(?!\d)": its look-behind is a typo
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(ans: str) -> str:
    """The official VQA answer normalisation (vqaEval.py processPunctuation + processDigitArticle)."""
    text = str(ans).replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:  # dropped when spaced or in "1,000"-like text, else replaced by a space
        out = out.replace(p, "" if (p + " " in text or " " + p in text or _COMMA_STRIP.search(text)) else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Official VQA accuracy of each distinct (normalised) human answer: the mean over the
    n leave-one-out subsets of ``min(1, matches / 3)``; with 10 answers 1/2/3/4+ matches
    give 0.3/0.6/0.9/1.0."""
    n, counts = len(answers), collections.Counter(answers)
    if n < 2:
        return {a: round(min(1.0, k / 3), 4) for a, k in counts.items()}
    return {a: round((k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n, 4) for a, k in counts.items()}


def build_answer_vocab(annotations: Iterable[dict], num_answers: int = 3129) -> list[str]:
    """The ``num_answers`` most frequent normalised ``multiple_choice_answer`` (ties: alphabetical)."""
    counts = collections.Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations
                                 if a.get("multiple_choice_answer") is not None)
    counts.pop("", None)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_answers]]


_VQA_Q_EXPECTED = "VQA questions JSON: {'questions': [{image_id, question, question_id}]}"
_VQA_A_EXPECTED = "VQA annotations JSON: {'annotations': [{question_id, image_id, answers: [{answer, ...}], " \
                  "multiple_choice_answer}]}"


def convert_vqa(questions_json: PathLike, image_dir: PathLike, out_dir: PathLike,
                annotations_json: PathLike | None = None, answer_vocab: PathLike | Sequence[str] | None = None,
                num_answers: int = 3129, samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """VQAv2 -> one sample per question (file order), json: question, question_id,
    answers {answer: soft score}, qtype. Without annotations (test) no answers are written.

    The answer vocabulary is ``answer_vocab`` (a list or an ``answers.json``; use train's
    for val) or, when None, built from ``annotations_json`` (train); it is written to
    ``out_dir/answers.json``. Images: COCO files under ``image_dir`` found by the numeric id
    in their name (``COCO_train2014_000000000009.jpg``).
    """
    qdoc = _load_json(questions_json, _VQA_Q_EXPECTED)
    questions = _list_field(qdoc, "questions", questions_json, _VQA_Q_EXPECTED)
    for i, q in enumerate(questions):
        _need(q, ("image_id", "question", "question_id"), f"{questions_json}: questions[{i}]", _VQA_Q_EXPECTED)
    _check_unique((q["question_id"] for q in questions), questions_json, "question_id")
    anns: dict | None = None
    if annotations_json:
        adoc = _load_json(annotations_json, _VQA_A_EXPECTED)
        alist = _list_field(adoc, "annotations", annotations_json, _VQA_A_EXPECTED)
        for i, a in enumerate(alist):
            _need(a, ("question_id", "answers"), f"{annotations_json}: annotations[{i}]", _VQA_A_EXPECTED)
            if not isinstance(a["answers"], list) or not all(isinstance(x, dict) and "answer" in x
                                                             for x in a["answers"]):
                raise InputError(f"{annotations_json}: annotations[{i}].answers is not a list of {{answer, ...}}; "
                                 f"expected {_VQA_A_EXPECTED}")
        anns = {a["question_id"]: a for a in alist}
    if answer_vocab is None and anns is not None:
        vocab = build_answer_vocab(anns.values(), num_answers)
    elif isinstance(answer_vocab, (str, os.PathLike)):
        vocab = _load_json(answer_vocab, "an answers.json: a JSON list of answer strings")
        if not isinstance(vocab, list) or not all(isinstance(a, str) for a in vocab):
            raise InputError(f"{answer_vocab}: expected a JSON list of answer strings")
    else:
        vocab = list(answer_vocab) if answer_vocab is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab is not None:
        (out / "answers.json").write_text(json.dumps(vocab))

    # images: by numeric id; when train and val folders are both there, prefer the subtype's
    subtype = str(qdoc.get("data_subtype", "")).replace("test-dev", "test")
    by_id = _index_by_id(image_dir)

    def image_path(iid: int) -> Path | None:
        paths = by_id.get(iid, [])
        if len(paths) > 1:
            paths = [p for p in paths if subtype and subtype in p.name] or paths
        return paths[0] if paths else None

    vocab_set = set(vocab or ())
    metas, no_ann, unanswerable = [], 0, 0
    for q in questions:
        meta = {"question": q["question"], "question_id": q["question_id"], "image_id": q["image_id"]}
        if anns is not None:
            a = anns.get(q["question_id"])
            if a is None:
                no_ann += 1
                continue
            scores = vqa_soft_scores([normalize_answer(x["answer"]) for x in a["answers"]])
            scores.pop("", None)
            meta.update(answers=scores, qtype=a.get("answer_type", ""), question_type=a.get("question_type"),
                        multiple_choice_answer=normalize_answer(a.get("multiple_choice_answer", "")))
            unanswerable += not (vocab_set & set(scores))
        metas.append(meta)

    def build(meta: dict) -> dict:
        text = _clean_text(meta["question"])
        if not text:
            raise Skip("empty_question")
        return sample(str(meta["question_id"]), image_bytes(image_path(int(meta["image_id"]))), text, meta)

    items = ((str(m["question_id"]), functools.partial(build, m)) for m in metas)
    info = {"dataset": "vqa", "questions": len(metas), "answers": len(vocab) if vocab is not None else None,
            "questions_without_annotation": no_ann, "no_answer_in_vocab": unanswerable if anns is not None else None}
    return write_shards(items, out, samples_per_shard, desc="vqa", total=len(metas), info=info, progress=progress)
