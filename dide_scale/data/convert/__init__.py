"""Dataset converters: official annotation files + image folders -> shards.

Every converter writes numbered ``.tar`` shards in the img2dataset layout (``{key}.jpg``,
``{key}.txt``, ``{key}.json``; NLVR2 adds ``{key}.image2.jpg``) plus ``sizes.json`` (sample
counts and each sample's byte offset, for range reads), shows a tqdm bar, and returns a
stats dict (also saved as ``convert_stats.json`` in the output).

Choices:

* **Resumable.** Inputs are put in a deterministic order and every sample gets a unique,
  stable key. Shards are written atomically by :class:`ShardWriter`, and with each
  complete shard ``convert_stats.json`` records how many input items it accounts for and
  the skip counts so far. A re-run with the same ``out_dir`` skips that many items without
  reading their images, checks that the last one has the key of the last sample of the
  last complete shard (else: "another conversion" error), and continues at shard
  ``done_shards(out_dir)``; an interrupted conversion thus ends with the same samples, in
  the same shards, and the same counts as an uninterrupted one. (Counting items, not
  ``sum(sizes)`` samples, stays exact when items were skipped. If the stats file lags
  behind ``sizes.json`` the last key is searched for instead.) A re-run of a finished
  conversion changes nothing; use an empty ``out_dir`` for other inputs or options.
* **Image bytes.** JPEG files are copied byte for byte (no re-encoding); anything else (PNG,
  NLVR2's images) is decoded and re-encoded with :func:`jpeg_bytes` (alpha over white).
  Missing images, JPEGs without an end-of-image marker and undecodable files are skipped
  and counted (``missing_image``, ``truncated_image``, ``bad_image``).
* **Caption datasets (COCO, Flickr30K, VG): one sample per (image, caption) pair**, as ViLT's
  pre-training does; the pairs are shuffled with a fixed seed so that the captions of one
  image are spread over the shards (in-batch ITM/ITC negatives must not be the same image).
  The image is stored once per pair. COCO keeps only Karpathy ``train``+``restval`` images
  when a Karpathy split file is given (``splits`` chooses others, e.g. ``("test",)`` for a
  retrieval set). Flickr30K reads Karpathy's ``dataset_flickr30k.json`` (splits and the five
  captions of each image) and the image folder. An evaluation split (no ``train`` or
  ``restval`` kept) is written image by image instead (``order``): a retrieval evaluation
  split over ranks then embeds each image on the one rank that reads its captions. VG
  keeps the region box in the json; ``max_regions_per_image`` bounds the storage (VG has
  ~50 regions per image), and with a Karpathy file the VG images that are COCO Karpathy
  val/test images are dropped too.
* **Task datasets** keep the input file's order; ``.txt`` holds the text the task reads
  (question, sentence, hypothesis) and ``.json`` the fields ``SampleDecoder`` reads.
* **VQAv2 answers**: normalised like the official evaluation (``vqaEval.py``:
  punctuation, lower case, number words -> digits, articles dropped, contractions), soft
  score = the official accuracy, i.e. the mean over the 10 leave-one-annotator-out subsets
  of ``min(1, matches/3)`` (0.3/0.6/0.9/1.0 for 1/2/3/4+ of 10 annotators: the values ViLT
  uses); ``answer_confidence`` is ignored, as by the official metric. The vocabulary is the
  ``num_answers`` most frequent normalised ``multiple_choice_answer`` of the given (train)
  annotations, ties broken alphabetically, written to ``answers.json``. Every normalised
  human answer is stored with its score; the decoder keeps those in the vocabulary.
  ``qtype`` = ``answer_type`` (yes/no, number, other) for per-type accuracy.
* **img2dataset output (CC3M, SBU)** is used as is: the tars are scanned (headers, in
  order, as the training reader groups them), truncated/unreadable shards are reported,
  and ``sizes.json`` (readable shards only, with their sample offsets) is written next to
  them: running it on shards that have no offsets yet adds them. With
  ``samples_per_shard`` it is re-sharded into ``out_dir`` instead: complete samples (image
  and caption) keep their key and all members; the readable part of a broken shard is kept.
"""
from .coco import convert_coco, karpathy_splits
from .common import STATS, InputError, Skip, image_bytes, write_shards
from .flickr30k import convert_flickr30k
from .img2dataset import convert_img2dataset, scan_tar
from .nlvr2 import convert_nlvr2
from .snli_ve import convert_snli_ve
from .vg import convert_vg
from .vqa import build_answer_vocab, convert_vqa, normalize_answer, vqa_soft_scores

__all__ = ["STATS", "InputError", "Skip", "build_answer_vocab", "convert_coco", "convert_flickr30k",
           "convert_img2dataset", "convert_nlvr2", "convert_snli_ve", "convert_vg", "convert_vqa", "image_bytes",
           "karpathy_splits", "normalize_answer", "scan_tar", "vqa_soft_scores", "write_shards"]
