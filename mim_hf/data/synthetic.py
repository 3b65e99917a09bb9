"""A small synthetic multimodal world with known ground truth (tests, and the image path).

Items have a shape, a colour and a pattern. Each item gets a PIL-rendered image showing
exactly those, and a title generated from the same attributes, so both modalities carry
the content. Users have hidden tastes over colours, shapes and patterns; each user sees a
stream of impressions (exposure favours popular items) and clicks with probability

    sigmoid(taste_colour + taste_shape + taste_pattern
            + complement_boost * [shape == complement(shape of the user's last click)]
            + popularity_effect * log(popularity) + bias)

The *complement* term is the "lamp -> bulb" effect C-SFT exists for: what a user wants
next is not what looks like their last click. Only ``category`` (= shape) is exposed as a
side feature; colour and pattern live in the content (title and image) alone.

Deterministic per ``seed``; :attr:`SyntheticWorld.truth` exposes everything hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from .tables import RecData, ValidationReport

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 20),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
NOUNS = ("badge", "sticker", "tile", "poster", "coaster", "pin")
ADJECTIVES = ("classic", "bold", "little", "bright", "vintage", "modern")


@dataclass
class SyntheticWorld(RecData):
    """:class:`RecData` plus ``truth``: the hidden attributes, tastes and click probabilities."""

    truth: dict | None = None


def _shape_mask(shape: str, size: int) -> PILImage.Image:
    mask = PILImage.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    lo, hi, mid = size * 0.15, size * 0.85, size / 2
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=255)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=255)
    elif shape == "triangle":
        draw.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=255)
    elif shape == "diamond":
        draw.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=255)
    else:  # cross
        arm = size * 0.12
        draw.rectangle([mid - arm, lo, mid + arm, hi], fill=255)
        draw.rectangle([lo, mid - arm, hi, mid + arm], fill=255)
    return mask


def _pattern_fill(pattern: str, rgb: tuple[int, int, int], size: int) -> PILImage.Image:
    fill = PILImage.new("RGB", (size, size), rgb)
    draw = ImageDraw.Draw(fill)
    step = max(size // 8, 2)
    if pattern == "striped":
        for x in range(0, size, 2 * step):
            draw.rectangle([x, 0, x + step // 2, size], fill=(255, 255, 255))
    elif pattern == "dotted":
        for x in range(step // 2, size, step * 2):
            for y in range(step // 2, size, step * 2):
                draw.ellipse([x, y, x + step // 2 + 1, y + step // 2 + 1], fill=(255, 255, 255))
    elif pattern == "checkered":
        dark = tuple(int(c * 0.45) for c in rgb)
        for x in range(0, size, step):
            for y in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    return fill


def render_item_image(shape: str, colour: str, pattern: str, size: int = 32) -> PILImage.Image:
    """An RGB ``size`` x ``size`` picture of a ``colour`` ``pattern`` ``shape`` on light grey."""
    canvas = PILImage.new("RGB", (size, size), (235, 235, 235))
    canvas.paste(_pattern_fill(pattern, COLOURS[colour], size), (0, 0), _shape_mask(shape, size))
    return canvas


def make_synthetic_world(
    n_users: int = 200,
    n_items: int = 300,
    seed: int = 0,
    image_size: int = 32,
    impressions_per_user: int = 40,
    complement_boost: float = 1.5,
    popularity_effect: float = 0.3,
    bias: float = -1.0,
) -> SyntheticWorld:
    """Generate the world. Same arguments -> identical tables and truth.

    Returns a :class:`SyntheticWorld` with items (``item_id``, ``title``, ``image``,
    ``category``) and interactions (``user_id``, ``item_id``, ``timestamp``, ``label``).
    """
    for name, value in (("n_users", n_users), ("n_items", n_items), ("image_size", image_size),
                        ("impressions_per_user", impressions_per_user)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rng = np.random.default_rng(seed)
    colour_names = list(COLOURS)
    item_shape = rng.integers(len(SHAPES), size=n_items)
    item_colour = rng.integers(len(colour_names), size=n_items)
    item_pattern = rng.integers(len(PATTERNS), size=n_items)
    # Zipf-like popularity over a random order of items.
    popularity = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.8
    popularity = popularity / popularity.sum()
    adjective = rng.integers(len(ADJECTIVES), size=n_items)
    noun = rng.integers(len(NOUNS), size=n_items)
    titles = [
        f"{ADJECTIVES[a]} {PATTERNS[p]} {colour_names[c]} {SHAPES[s]} {NOUNS[n]}"
        for a, p, c, s, n in zip(adjective, item_pattern, item_colour, item_shape, noun)
    ]
    images = [render_item_image(SHAPES[s], colour_names[c], PATTERNS[p], image_size)
              for s, c, p in zip(item_shape, item_colour, item_pattern)]
    item_ids = [f"i{i:05d}" for i in range(n_items)]

    taste_colour = rng.normal(0, 1.0, size=(n_users, len(colour_names)))
    taste_shape = rng.normal(0, 0.7, size=(n_users, len(SHAPES)))
    taste_pattern = rng.normal(0, 0.7, size=(n_users, len(PATTERNS)))
    # A random cycle over shapes: no shape is its own complement.
    cycle = rng.permutation(len(SHAPES))
    complement_shape = np.empty(len(SHAPES), dtype=np.int64)
    complement_shape[cycle] = np.roll(cycle, -1)

    # Exposure: mostly by popularity, partly uniform so long-tail items get seen at all.
    exposure = 0.7 * popularity + 0.3 / n_items
    shown = rng.choice(n_items, size=(n_users, impressions_per_user), p=exposure)
    gaps = rng.exponential(3600.0, size=(n_users, impressions_per_user)).astype(np.int64) + 1
    start = rng.integers(1_600_000_000, 1_600_000_000 + 30 * 86400, size=n_users)
    timestamps = start[:, None] + np.cumsum(gaps, axis=1)
    uniform = rng.random((n_users, impressions_per_user))

    users = np.arange(n_users)
    last_click_shape = np.full(n_users, -1)
    clicks = np.zeros((n_users, impressions_per_user), dtype=np.int8)
    probability = np.zeros((n_users, impressions_per_user))
    for step in range(impressions_per_user):  # sequential: the complement term depends on the last click
        item = shown[:, step]
        logit = (taste_colour[users, item_colour[item]] + taste_shape[users, item_shape[item]]
                 + taste_pattern[users, item_pattern[item]]
                 + complement_boost * (item_shape[item] == np.where(last_click_shape >= 0, complement_shape[last_click_shape], -2))
                 + popularity_effect * np.log(popularity[item] * n_items) + bias)
        probability[:, step] = 1.0 / (1.0 + np.exp(-logit))
        clicks[:, step] = uniform[:, step] < probability[:, step]
        last_click_shape = np.where(clicks[:, step] == 1, item_shape[item], last_click_shape)

    items = Dataset.from_dict(
        {"item_id": item_ids, "title": titles, "image": images, "category": [SHAPES[s] for s in item_shape]},
        features=Features({"item_id": Value("string"), "title": Value("string"), "image": Image(), "category": Value("string")}),
    )
    interactions = Dataset.from_dict({
        "user_id": np.repeat([f"u{u:05d}" for u in range(n_users)], impressions_per_user).tolist(),
        "item_id": np.asarray(item_ids)[shown.ravel()].tolist(),
        "timestamp": timestamps.ravel().astype(np.int64),
        "label": clicks.ravel(),
    })
    truth = {
        "item_shape": item_shape, "item_colour": item_colour, "item_pattern": item_pattern,
        "item_popularity": popularity, "complement_shape": complement_shape,
        "taste_colour": taste_colour, "taste_shape": taste_shape, "taste_pattern": taste_pattern,
        "click_probability": probability.ravel(),
        "shapes": SHAPES, "colours": tuple(colour_names), "patterns": PATTERNS,
    }
    return SyntheticWorld("synthetic", items, interactions, None, ValidationReport(), truth)
