"""ITM rows, chosen on the training side.  The dual encoder's: hard negatives mined over
every rank's micro-batch and fetched with gradient (ALBEF's recipe, docs/METHOD.md); a
fusion student's: one random other image and one random other text per pair.

The student computes its contrastive embeddings and hands them, with the inputs and
states of each side, to the :class:`HardNegatives` it is given; this module decides which
rows it scores.  ``models/`` imports nothing from here.
"""
from __future__ import annotations

import torch

from .distributed import all_gather_nograd, exchange_capacity, gather_rows, rank, request_slots, world_size


class HardNegatives:
    """``(text_emb, image_emb, scale, image_side, text_side, generator)`` -> the negative
    image side and negative text side (each tensor of a side indexed by the chosen rows)
    and the fraction of choices replaced by local ones (``itm/local_fallback``).

    ``across_ranks`` (``loss.itm_negatives=global``): candidates from every rank, at most
    ``exchange_factor`` x an even share of rows asked of any one rank
    (``loss.itm_exchange_capacity``)."""

    def __init__(self, across_ranks: bool = True, exchange_factor: float = 2.0):
        self.across_ranks, self.exchange_factor = across_ranks, exchange_factor

    @classmethod
    def from_config(cls, loss_cfg) -> "HardNegatives":
        return cls(loss_cfg.itm_negatives == "global", loss_cfg.itm_exchange_capacity)

    def __call__(self, text_emb, image_emb, scale, image_side: list, text_side: list,
                 generator: torch.Generator | None = None):
        across = self.across_ranks
        cap = exchange_capacity(len(image_emb), world_size(), self.exchange_factor) if across else None
        neg_img, neg_txt, replaced = mine_hard_negatives(text_emb, image_emb, scale, across, generator, cap)
        if across:
            return gather_rows(image_side, neg_img, cap), gather_rows(text_side, neg_txt, cap), replaced
        return [t[neg_img] for t in image_side], [t[neg_txt] for t in text_side], replaced


@torch.no_grad()
def mine_hard_negatives(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor | float = 1.0,
                        across_ranks: bool = True, generator: torch.Generator | None = None,
                        capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each local pair, sample a hard negative image for its text and a hard negative text
    for its image, with probability softmax(similarity * scale), never the pair itself.
    ``scale`` is the contrastive loss's 1 / temperature (ALBEF's choice): with raw cosines in
    [-1, 1] the distribution over a large candidate set is nearly uniform.

    ``across_ranks``: candidates are the micro-batches of every rank (embeddings gathered
    without gradient; every rank's micro-batch has the same size, as training batches do);
    indices are then global (rank r's row i is ``r * B + i``) and
    :func:`~dide_scale.distributed.gather_rows` fetches the chosen rows.  ``capacity`` bounds
    the rows asked of each other rank (static all_to_all sizes, no host sync): a choice
    beyond it is replaced by a negative drawn the same way from this rank's own micro-batch.
    Returns (neg_image_idx [B], neg_text_idx [B], fraction of choices replaced)."""
    b, dev = text_emb.shape[0], text_emb.device
    offset, all_t, all_i = 0, text_emb, image_emb
    world = world_size() if across_ranks else 1
    if world > 1:
        all_t, all_i = all_gather_nograd(text_emb), all_gather_nograd(image_emb)
        offset = rank() * b
    if all_t.shape[0] < 2:
        raise ValueError("hard-negative mining needs at least 2 pairs")
    ar = torch.arange(b, device=dev)
    own = torch.zeros(b, all_t.shape[0], dtype=torch.bool, device=dev)
    own[ar, ar + offset] = True
    scale = torch.as_tensor(scale, device=dev).float()
    replaced = torch.zeros((), device=dev)
    out = []
    for q, keys in ((text_emb, all_i), (image_emb, all_t)):
        logits = (scale * q.float() @ keys.float().t()).masked_fill(own, -1e4)
        neg = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
        if world > 1 and capacity is not None:
            local = logits[:, offset:offset + b]  # the same distribution over this rank's own rows
            fallback = torch.multinomial(torch.softmax(local, 1), 1, generator=generator).squeeze(1) + offset
            owner = neg // b
            remote = owner != rank()
            over = remote & (request_slots(owner, remote, world) >= capacity)
            neg = torch.where(over, fallback, neg)
            replaced = replaced + over.float().mean() / 2
        out.append(neg)
    return out[0], out[1], replaced


def random_rows(b: dict, generator: torch.Generator | None = None) -> dict:
    """A fusion student's ITM rows from a device batch: ``images`` / ``input_ids`` /
    ``attention_mask`` of :func:`random_negative_rows`' 3B (text, image) pairs."""
    ids = b["input_ids"]
    t_idx, i_idx = random_negative_rows(ids.shape[0], ids.device, generator)
    return {"images": b["images"][i_idx], "input_ids": ids[t_idx], "attention_mask": b["attention_mask"][t_idx]}


def random_negative_rows(b: int, device, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_idx, image_idx) [3B]: B positives, B (text, another image), B (another text, image);
    "another" is uniform over the rest of the micro-batch, drawn on ``device`` from
    ``generator`` (on that device; the global RNG when None)."""
    if b < 2:
        raise ValueError("ITM negatives need a micro-batch of at least 2 pairs")
    ar = torch.arange(b, device=device)
    other_img = (ar + torch.randint(1, b, (b,), generator=generator, device=device)) % b
    other_txt = (ar + torch.randint(1, b, (b,), generator=generator, device=device)) % b
    return torch.cat([ar, ar, other_txt]), torch.cat([ar, other_img, ar])
