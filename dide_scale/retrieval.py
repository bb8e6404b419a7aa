"""Image-text retrieval the way a dual encoder is deployed: every image and every caption is
embedded once, and the query's candidates are ranked from those embeddings.

Scorers (recall@1/5/10 both ways; an image is a hit for image-to-text when any of its
captions ranks in its top k, the COCO / Flickr30K convention of five captions per image):

* ``itc``: the cosine of the contrastive embeddings over every pair (an N x M matmul);
* ``rerank``: ALBEF's and BLIP's protocol: ``itc`` over every pair, then the top K
  candidates of each query (images of a caption, captions of an image) re-scored by the ITM
  head (the fusion MLP on the two pooled vectors).  A positive outside the top K is a miss;
  ``K`` of at least the candidate count ranks exactly as ``itm``;
* ``itm``: the ITM head over every pair.

Over several ranks each rank embeds its own share of the split (its shards, never the whole
split), the embeddings are gathered once, each rank ranks its share of the queries, and the
ranks are gathered: every rank returns what one process would.  Texts are ordered by sample
key and images by id before ranking, so the result does not depend on how the split was
dealt.  Under ZeRO-3 (``partitioned``) every module call gathers parameters collectively:
the ranks then make the same number of calls of each module (``lockstep``), padding with
calls whose output is dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .distributed import gather_objects, gather_uneven, lockstep_batches, max_over_ranks, rank, world_size
from .inference import DualEncoderInference
from .models.images import from_batch

SCORERS = ("rerank", "itc", "itm")
MISS = torch.iinfo(torch.int64).max
"""The rank of a query whose positive is not among its re-ranked candidates: a miss at every k."""


@dataclass
class Embedded:
    """Pooled vectors (the ITM head's inputs) and contrastive embeddings of a set of texts and
    images; ``text_image[j]`` is the index of text j's image."""

    text: torch.Tensor
    text_itc: torch.Tensor
    image: torch.Tensor
    image_itc: torch.Tensor
    text_keys: list[str]
    text_image_ids: list[str]
    image_ids: list[str]

    @property
    def text_image(self) -> torch.Tensor:
        index = {iid: i for i, iid in enumerate(self.image_ids)}
        return torch.tensor([index[iid] for iid in self.text_image_ids], dtype=torch.long,
                            device=self.text.device)


@dataclass
class Ranks:
    """The rank of each query's positive (0 = first; ``MISS`` when it was not a candidate):
    ``t2i`` per text, ``i2t`` per image (its best-ranked caption)."""

    t2i: torch.Tensor
    i2t: torch.Tensor
    candidates: dict[str, int]

    def recall(self, ks=(1, 5, 10)) -> dict[str, float]:
        out = {f"t2i_r@{k}": (self.t2i < k).float().mean().item() for k in ks}
        out.update({f"i2t_r@{k}": (self.i2t < k).float().mean().item() for k in ks})
        return out


@torch.inference_mode()
def embed_share(inf, loader, max_batches: int = 0, lockstep: bool = False, group=None) -> Embedded:
    """This rank's texts and images (each image once, by ``image_ids``, else the sample key),
    pooled and contrastive.  A batch without a new image still encodes one (and drops it), so
    every batch makes the same module calls."""
    model = inf.model
    texts, text_itc, images, image_itc = [], [], [], []
    keys, owners, image_ids, seen = [], [], [], set()
    for batch, counted in lockstep_batches(loader, max_batches, lockstep, group):
        ids = [str(i) for i in batch.get("image_ids", batch["keys"])]
        new = []
        for j, iid in enumerate(ids):
            if counted and iid not in seen:
                seen.add(iid)
                new.append(j)
        t = inf.encode_texts(batch["input_ids"], batch["attention_mask"])
        im = inf.encode_images(from_batch(batch)[new or [0]])
        t_itc, i_itc = model.contrastive_embeddings(t, im)
        if not counted:
            continue
        texts.append(t)
        text_itc.append(t_itc)
        keys += [str(k) for k in batch["keys"]]
        owners += ids
        if new:
            images.append(im)
            image_itc.append(i_itc)
            image_ids += [ids[j] for j in new]
    width, dim = model.shape.width, model.itc_text.out_features

    def cat(parts, d):
        return torch.cat(parts).float() if parts else torch.zeros(0, d, device=inf.device)
    return Embedded(cat(texts, width), cat(text_itc, dim), cat(images, width), cat(image_itc, dim), keys, owners,
                    image_ids)


def gather_embedded(share: Embedded, group=None) -> Embedded:
    """Every rank's share, in one all-gather of the vectors and one of the names; an image
    that several ranks embedded is kept once; texts ordered by key, images by id."""
    width = share.text.shape[1]
    rows = torch.cat([torch.cat([share.text, share.text_itc], 1), torch.cat([share.image, share.image_itc], 1)])
    rows = gather_uneven(rows)
    names = gather_objects((share.text_keys, share.text_image_ids, share.image_ids), group)
    t_rows, keys, owners, image_at = [], [], [], {}
    start = 0
    for r_keys, r_owners, r_images in names:
        m, n = len(r_keys), len(r_images)
        t_rows.append(torch.arange(start, start + m))
        keys += r_keys
        owners += r_owners
        for j, iid in enumerate(r_images):
            image_at.setdefault(iid, start + m + j)
        start += m + n
    t_order = sorted(range(len(keys)), key=keys.__getitem__)
    t_idx = torch.cat(t_rows)[t_order].to(rows.device)
    ids = sorted(image_at)
    i_idx = torch.tensor([image_at[i] for i in ids], dtype=torch.long, device=rows.device)
    texts, images = rows[t_idx], rows[i_idx]
    return Embedded(texts[:, :width], texts[:, width:], images[:, :width], images[:, width:],
                    [keys[i] for i in t_order], [owners[i] for i in t_order], ids)


def query_block(n: int, rank: int, world: int) -> range:
    """This rank's contiguous share of ``n`` queries (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


class _Scorer:
    """The ITM head over (text, image) index pairs, in calls of at most ``pairs_per_call``
    pairs; counts its calls so that lock-step ranks can pad to the same number."""

    def __init__(self, inf, emb: Embedded, pairs_per_call: int):
        self.inf, self.emb, self.pairs_per_call, self.calls = inf, emb, pairs_per_call, 0
        self.text, self.image = emb.text.to(inf.dtype), emb.image.to(inf.dtype)

    def __call__(self, text_idx: torch.Tensor, image_idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inf.match_scores(self.text[text_idx.reshape(-1)], self.image[image_idx.reshape(-1)]
                                     ).reshape(text_idx.shape)

    def pad_to(self, calls: int) -> None:
        """Calls whose scores are dropped, up to ``calls`` in all."""
        one = torch.zeros(1, dtype=torch.long, device=self.text.device)
        while self.calls < calls:
            self(one, one)

    def queries_per_call(self, candidates: int) -> int:
        return max(1, self.pairs_per_call // max(1, candidates))


def rank_of_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """[Q, C] scores, [Q, C] bool -> the rank of each query's best-scored positive (ties do
    not count against it), ``MISS`` where a query has no positive among its candidates."""
    best = scores.masked_fill(~positive, float("-inf")).amax(1)
    rank = (scores > best[:, None]).sum(1)
    return torch.where(positive.any(1), rank, torch.full_like(rank, MISS))


def _direction(emb: Embedded, t2i: bool, queries: range, scorer: str, k: int, itm: _Scorer) -> torch.Tensor:
    """Ranks of this block of queries: texts against every image (``t2i``) or images against
    every text."""
    q_itc, c_itc = (emb.text_itc, emb.image_itc) if t2i else (emb.image_itc, emb.text_itc)
    owner = emb.text_image
    n_cand = c_itc.shape[0]
    kk = n_cand if scorer == "itm" else min(k, n_cand)
    step = itm.queries_per_call(kk) if scorer != "itc" else 1024
    out = []
    for s in range(queries.start, queries.stop, step):
        q = torch.arange(s, min(s + step, queries.stop), device=q_itc.device)
        if scorer == "itm":
            cand = torch.arange(n_cand, device=q.device).expand(len(q), n_cand)
        else:
            sims = q_itc[q] @ c_itc.t()
            if scorer == "itc":
                cand = torch.arange(n_cand, device=q.device).expand(len(q), n_cand)
                scores = sims
            else:
                cand = sims.topk(kk, dim=1).indices
        if scorer != "itc":
            text_idx, image_idx = (q[:, None].expand_as(cand), cand) if t2i else (cand, q[:, None].expand_as(cand))
            scores = itm(text_idx, image_idx)
        positive = cand == owner[q][:, None] if t2i else owner[cand] == q[:, None]
        out.append(rank_of_positive(scores, positive))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=q_itc.device)


def itm_calls(emb: Embedded, scorer: str, k: int, t2i: range, i2t: range, itm: _Scorer) -> int:
    """The ITM-head calls ``_direction`` makes for these query blocks (known before any is made)."""
    if scorer == "itc":
        return 0
    calls = 0
    for queries, n_cand in ((t2i, emb.image.shape[0]), (i2t, emb.text.shape[0])):
        kk = n_cand if scorer == "itm" else min(k, n_cand)
        calls += math.ceil(len(queries) / itm.queries_per_call(kk))
    return calls


@torch.inference_mode()
def rank_queries(inf, emb: Embedded, scorer: str = "rerank", k: int = 128, lockstep: bool = False, group=None,
                 pairs_per_call: int = 16384) -> Ranks:
    """The rank of every query's positive, both directions, over every rank's embeddings;
    this rank scores its block of the queries and the blocks are gathered."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r} must be one of {', '.join(SCORERS)}")
    r, world = rank(), world_size()
    t2i_q = query_block(emb.text.shape[0], r, world)
    i2t_q = query_block(emb.image.shape[0], r, world)
    itm = _Scorer(inf, emb, pairs_per_call)
    calls = max_over_ranks(itm_calls(emb, scorer, k, t2i_q, i2t_q, itm), group) if lockstep else 0
    t2i = _direction(emb, True, t2i_q, scorer, k, itm)
    i2t = _direction(emb, False, i2t_q, scorer, k, itm)
    itm.pad_to(calls)
    n_img, n_txt = emb.image.shape[0], emb.text.shape[0]
    cands = {"t2i": n_img, "i2t": n_txt} if scorer != "rerank" else {"t2i": min(k, n_img), "i2t": min(k, n_txt)}
    return Ranks(gather_uneven(t2i), gather_uneven(i2t), cands)


def retrieval_ranks(model, loader, scorer: str = "rerank", k: int = 128, device="cpu", dtype=torch.float32,
                    max_batches: int = 0, prepare: bool = True, group=None, partitioned: bool = False
                    ) -> tuple[Ranks, Embedded]:
    """Embed this rank's share of the split, gather, rank: (ranks, the gathered embeddings).
    ``partitioned``: the model's parameters are ZeRO-3 partitioned (every module call gathers
    them: the ranks go in lock-step, and the towers' last blocks run whole)."""
    if not hasattr(model, "encode_image"):
        raise ValueError("retrieval evaluation needs a dual encoder (a fusion model would need one joint pass "
                         "per image-text pair)")
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r} must be one of {', '.join(SCORERS)}")
    if scorer == "rerank" and k < 1:
        raise ValueError(f"k={k}: re-ranking needs at least one candidate per query")
    inf = DualEncoderInference(model, device, dtype, prepare=prepare, cls_only=not partitioned)
    lockstep = partitioned and world_size() > 1
    emb = gather_embedded(embed_share(inf, loader, max_batches, lockstep, group), group)
    if not emb.image_ids:
        raise ValueError("the retrieval split is empty: no (image, caption) sample was read")
    return rank_queries(inf, emb, scorer, k, lockstep, group), emb
