"""Procedural product catalogues, one per dataset split, that never share a product.

A split's products are drawn from its own seed, carry IDs in its own namespace
(`train-0001`, `val-0001`, `test-0001`) and artwork seeds with the split in their top bits,
so the test split's products, artwork and damage-like prints are never seen in training or
validation. The test split also uses a print style the others never get
(`TEST_ONLY_PRINTS`), so the false-positive rate on unseen prints is measured on pictures
of a kind the models have not met.
"""

from __future__ import annotations

import colorsys
from typing import Literal

import numpy as np

from edge.catalogue import DAMAGE_PRINTS, Artwork, Catalogue, Packaging, Product

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
#: Confounder print styles held out for the test split.
TEST_ONLY_PRINTS: tuple[Artwork, ...] = ("hole_print",)
#: Share of a split's products that carry a damage-like print (at least one per style).
CONFOUNDER_PRODUCT_SHARE = 0.2
#: Items must fit the top-down camera's view (900 mm above the belt) with room for yaw:
#: length + 0.3 x width + height stays under this (mm).
_VIEW_BUDGET_MM = 840.0
_SPLIT_CODE: dict[Split, int] = {"train": 1, "val": 2, "test": 3}
_PACKAGING: tuple[Packaging, ...] = ("box", "mailer", "polybag", "multipack")
_PACKAGING_P = (0.45, 0.2, 0.15, 0.2)
_MULTIPACK_UNITS = (2, 3, 4, 6, 8, 9, 12)
#: material -> probability, per packaging
_MATERIALS = {
    "box": {"kraft": 0.6, "white": 0.15, "coloured": 0.15, "printed": 0.1},
    "multipack": {"kraft": 0.45, "white": 0.15, "coloured": 0.25, "printed": 0.15},
    "mailer": {"kraft": 0.35, "white": 0.35, "coloured": 0.3},
    "polybag": {"white": 0.3, "coloured": 0.5, "printed": 0.2},
}


def print_styles(split: Split) -> tuple[Artwork, ...]:
    """The damage-like print styles a split's confounder products carry."""
    if split == "test":
        return DAMAGE_PRINTS
    return tuple(s for s in DAMAGE_PRINTS if s not in TEST_ONLY_PRINTS)


def art_seed(split: Split, seed: int, index: int) -> int:
    """Artwork seed of product `index` of a split: the split code in bits 60-61, so two
    splits never share one, whatever their seeds."""
    return (_SPLIT_CODE[split] << 60) | ((seed & 0x0FFF_FFFF) << 32) | (index & 0xFFFF_FFFF)


def _colour(rng: np.random.Generator, material: str) -> tuple[int, int, int]:
    if material == "kraft":
        r = rng.uniform(150, 200)
        g, b = r * rng.uniform(0.72, 0.82), r * rng.uniform(0.45, 0.6)
    elif material == "white":
        r = g = b = rng.uniform(205, 245)
        r, b = r + rng.uniform(-6, 6), b + rng.uniform(-6, 6)
    else:
        sat = rng.uniform(0.4, 0.9)
        val = rng.uniform(0.5, 0.95) if material == "coloured" else rng.uniform(0.3, 0.55)
        r, g, b = (c * 255 for c in colorsys.hsv_to_rgb(rng.uniform(0, 1), sat, val))
    return (int(np.clip(b, 0, 255)), int(np.clip(g, 0, 255)), int(np.clip(r, 0, 255)))


def _dims(rng: np.random.Generator, packaging: Packaging, units: int
          ) -> tuple[float, float, float]:
    if packaging == "multipack":
        along, across = Product("", packaging, (1, 1, 1), units, "plain", (0, 0, 0)).unit_grid
        uw = rng.uniform(60, 150)
        ul = max(uw * across / along * rng.uniform(1.0, 1.3), rng.uniform(60, 150))
        length, width = min(600.0, along * ul), min(450.0, across * uw)
        width = min(width, length)
        height = rng.uniform(50, 200)
    elif packaging == "box":
        length = rng.uniform(150, 600)
        width = min(420.0, max(100.0, length * rng.uniform(0.5, 0.95)))
        height = rng.uniform(60, 350)
    elif packaging == "mailer":
        length = rng.uniform(120, 400)
        width = length * rng.uniform(0.6, 0.9)
        height = rng.uniform(20, 60)
    else:
        length = rng.uniform(150, 450)
        width = length * rng.uniform(0.55, 0.9)
        height = rng.uniform(30, 120)
    height = min(height, _VIEW_BUDGET_MM - length - 0.3 * width)
    return (round(float(length), 1), round(float(width), 1), round(float(height), 1))


def generate_catalogue(split: Split, count: int, seed: int) -> Catalogue:
    """`count` products of `split`, drawn from `seed`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    rng = np.random.default_rng([_SPLIT_CODE[split], seed, 0xCA7A])
    styles = print_styles(split)
    confounders = min(count // 2, max(len(styles), round(CONFOUNDER_PRODUCT_SHARE * count)))
    order = rng.permutation(count)
    style_order = list(rng.permutation(len(styles)))
    style_of = {int(order[k]): styles[style_order[k % len(styles)]] for k in range(confounders)}
    products = []
    for i in range(count):
        packaging = _PACKAGING[int(rng.choice(len(_PACKAGING), p=_PACKAGING_P))]
        units = int(rng.choice(_MULTIPACK_UNITS)) if packaging == "multipack" else 1
        materials = _MATERIALS[packaging]
        material = str(rng.choice(list(materials), p=list(materials.values())))
        artwork: Artwork = style_of.get(i) or ("brand" if rng.random() < 0.65 else "plain")
        products.append(Product(
            product_id=f"{split}-{i + 1:04d}",
            packaging=packaging,
            dims_mm=_dims(rng, packaging, units),
            units=units,
            artwork=artwork,
            colour_bgr=_colour(rng, material),
            art_seed=art_seed(split, seed, i),
        ))
    return Catalogue(tuple(products))
