"""Pre-training's data and evaluation: the items' text views (pre-tokenised), their pooled tower
outputs when the towers are frozen (``cached_towers``), the train / held-out split of the catalogue,
and held-out title -> attributes (or image) alignment recall."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from mim_hf.modeling.processing_mim_encoder import MIMContentProcessor, rows_to_records

RECALL_KS = (1, 10)


class ItemViews:
    """Pre-tokenised text views (and lazily processed images) of catalogue rows.

    ``rows`` are positions in ``items``; ``texts[view]`` / ``token_ids[view]`` align with them.
    """

    def __init__(self, items, rows: list[int], processor: MIMContentProcessor, views: tuple[str, ...],
                 with_images: bool):
        self.items, self.rows, self.processor, self.with_images = items, rows, processor, with_images
        text_columns = [c for c in items.column_names if c != processor.image_field]
        records = rows_to_records(items.select_columns(text_columns).select(rows)[:]) if rows else []
        self.texts = {view: processor.build_texts(records, view=view) if records else [] for view in views}
        self.token_ids = {
            view: processor.tokenize(texts, padding=False, return_tensors=None)["input_ids"] if texts else []
            for view, texts in self.texts.items()
        }

    def __len__(self) -> int:
        return len(self.rows)

    def pad(self, view: str, positions: list[int]) -> dict[str, torch.Tensor]:
        padded = self.processor.tokenizer.pad({"input_ids": [self.token_ids[view][p] for p in positions]},
                                              return_tensors="pt")
        return {f"{view}_input_ids": padded["input_ids"], f"{view}_attention_mask": padded["attention_mask"]}

    def images(self, positions: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(pixel_values (B, C, H, W) or None, image_mask (B,)) for ``positions``."""
        rows = [self.rows[p] for p in positions]
        return self.processor.process_images(self.items.select(rows)[self.processor.image_field])

    def collate(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """DataLoader collate: positions in this view set -> a padded training batch."""
        batch = {"item_index": torch.tensor([self.rows[p] for p in positions], dtype=torch.long)}
        for view in self.token_ids:
            batch.update(self.pad(view, positions))
        if self.with_images:
            pixel_values, image_mask = self.images(positions)
            batch["image_mask"] = image_mask
            if pixel_values is not None:
                batch["pixel_values"] = pixel_values
        return batch


def split_items(prepared, config) -> tuple[list[int], list[int], dict]:
    """Catalogue positions for training and for held-out evaluation, plus a description.

    Held out = catalogue items not in ``train_item_ids``; if fewer than ``eval_min_items``, a
    seeded ``eval_holdout_fraction`` of the train items is withheld from training as well."""
    item_ids = prepared.items["item_id"]
    allowed = set(prepared.train_item_ids)
    train_rows = [row for row, item_id in enumerate(item_ids) if item_id in allowed]
    unseen_rows = [row for row, item_id in enumerate(item_ids) if item_id not in allowed]
    info = {"unseen_items": len(unseen_rows), "withheld_train_items": 0,
            "source": "catalogue items not in train_item_ids"}
    eval_rows = list(unseen_rows)
    if len(unseen_rows) < config.eval_min_items:
        rng = np.random.default_rng([config.seed, 7])
        n_withheld = max(1, round(config.eval_holdout_fraction * len(train_rows)))
        withheld = set(rng.choice(len(train_rows), size=n_withheld, replace=False).tolist())
        eval_rows += [row for k, row in enumerate(train_rows) if k in withheld]
        train_rows = [row for k, row in enumerate(train_rows) if k not in withheld]
        info.update(withheld_train_items=n_withheld, source=(
            f"only {len(unseen_rows)} catalogue items are outside train_item_ids (< eval_min_items="
            f"{config.eval_min_items}); a seeded {config.eval_holdout_fraction:.0%} of train items "
            f"({n_withheld}) was withheld from pre-training and evaluated with them"))
    if not train_rows:
        raise ValueError(f"no catalogue item is in train_item_ids ({len(allowed)} ids): nothing to pre-train on")
    return sorted(train_rows), sorted(eval_rows), info


def _relevance_keys(views: ItemViews, view: str, pixel_values: torch.Tensor | None) -> list[str]:
    """Candidates with the same key have identical content (same text / same image pixels)."""
    if view == "image":
        return [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in pixel_values]
    return list(views.texts[view])


@torch.inference_mode()
def alignment_recall(encoder, views: ItemViews, candidate_view: str, batch_size: int,
                     device: torch.device, ks=RECALL_KS) -> dict:
    """Title -> ``candidate_view`` ("attributes" or "image") retrieval among the held-out items.

    Returns ``{"recall@K": ..., "n": N}``. A query counts as a hit at K when a candidate with
    *the same content* as its own (identical text or identical image; catalogues repeat
    attribute strings such as "genres: Drama | year: 1996") ranks in the top K.
    """
    n_items = len(views)
    if n_items == 0:
        return {f"recall@{k}": None for k in ks} | {"n": 0}
    was_training = encoder.training
    encoder.eval()
    queries, candidates, pixels = [], [], []
    try:
        for start in range(0, n_items, batch_size):
            positions = list(range(start, min(start + batch_size, n_items)))
            title = {k: v.to(device) for k, v in views.pad("title", positions).items()}
            queries.append(F.normalize(encoder.encode_text(title["title_input_ids"], title["title_attention_mask"]), dim=-1))
            if candidate_view == "image":
                pixel_values, image_mask = views.images(positions)
                if pixel_values is None or not bool(image_mask.all()):
                    raise ValueError(f"{int((~image_mask).sum())} held-out items have no readable image; "
                                     "image alignment evaluation needs one per item")
                pixels.append(pixel_values)
                candidates.append(F.normalize(encoder.encode_image(pixel_values.to(device)), dim=-1))
            else:
                inputs = {k: v.to(device) for k, v in views.pad(candidate_view, positions).items()}
                candidates.append(F.normalize(encoder.encode_text(
                    inputs[f"{candidate_view}_input_ids"], inputs[f"{candidate_view}_attention_mask"]), dim=-1))
    finally:
        encoder.train(was_training)
    scores = (torch.cat(queries) @ torch.cat(candidates).T).float().cpu()
    keys = _relevance_keys(views, candidate_view, torch.cat(pixels) if pixels else None)
    _, key_index = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    key_index = torch.as_tensor(key_index)
    relevant = key_index[None, :] == key_index[:, None]  # (N, N): candidate j has query i's content
    best_relevant = scores.masked_fill(~relevant, float("-inf")).max(dim=1).values
    # Rank of the best relevant candidate = irrelevant candidates scoring strictly higher.
    rank = ((scores > best_relevant[:, None]) & ~relevant).sum(dim=1)
    return {f"recall@{k}": float((rank < k).float().mean()) for k in ks} | {"n": n_items}


class CachedViews:
    """Pooled outputs of the frozen towers for every row of an :class:`ItemViews` (``cached_towers``).

    Each text view runs through the text tower once (and the images, when the title view carries
    them, through the vision tower), in eval mode, without gradients
    (:meth:`mim_hf.csft.cache.TowerCache.build`); :meth:`collate` then gives a batch of pooled
    outputs (``<view>_pooled``, ``image_pooled`` + ``image_mask``) that
    ``PretrainingObjectives`` projects, so a step runs only the projections.
    """

    def __init__(self, encoder, views: ItemViews, batch_size: int, device):
        from mim_hf.csft.cache import TowerCache

        self.views = views

        def inputs(view: str, with_images: bool):
            def encoder_inputs(positions: torch.Tensor) -> dict:
                positions = positions.tolist()
                padded = views.pad(view, positions)
                out = {"input_ids": padded[f"{view}_input_ids"], "attention_mask": padded[f"{view}_attention_mask"]}
                if encoder.vision_model is not None:
                    pixel_values, image_mask = (views.images(positions) if with_images
                                                else (None, torch.zeros(len(positions), dtype=torch.bool)))
                    out["image_mask"] = image_mask
                    if pixel_values is not None:
                        out["pixel_values"] = pixel_values
                return out
            return encoder_inputs

        self.caches = {view: TowerCache.build(encoder, inputs(view, views.with_images and view == "title"),
                                              len(views), batch_size, device)
                       for view in views.token_ids}

    def collate(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """DataLoader collate: positions -> ``item_index``, ``<view>_pooled`` and, with images,
        ``image_pooled`` (B, H_vision; zero rows where ``image_mask`` is False) + ``image_mask``."""
        index = torch.tensor(positions, dtype=torch.long)
        batch = {"item_index": torch.tensor([self.views.rows[p] for p in positions], dtype=torch.long)}
        for view, cache in self.caches.items():
            batch[f"{view}_pooled"] = cache.text[index]
        title = self.caches["title"]
        if self.views.with_images and title.image is not None:
            batch["image_pooled"], batch["image_mask"] = title.image[index], title.image_mask[index]
        return batch
