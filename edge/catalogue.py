"""The product catalogue: what each product ID should look like on the belt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from edge.config import ConfigError

DEFAULT_CATALOGUE = Path(__file__).resolve().parent / "defaults" / "catalogue.yaml"

Packaging = Literal["box", "mailer", "polybag", "multipack"]
Artwork = Literal["plain", "brand", "crack_print", "stain_print", "hole_print", "tear_print",
                  "splash_print"]
_PACKAGING = ("box", "mailer", "polybag", "multipack")
#: Artwork that pictures damage on intact packaging (the confounders), one name per style.
DAMAGE_PRINTS: tuple[Artwork, ...] = ("crack_print", "stain_print", "hole_print", "tear_print",
                                      "splash_print")
_ARTWORK = ("plain", "brand", *DAMAGE_PRINTS)


@dataclass(frozen=True, slots=True)
class Product:
    product_id: str
    packaging: Packaging
    dims_mm: tuple[float, float, float]  # length >= width, height
    units: int
    artwork: Artwork
    colour_bgr: tuple[int, int, int]
    #: seed of a procedurally drawn look (`edge.sim.products`); None: the fixed look of `artwork`
    art_seed: int | None = None

    @property
    def damage_like_print(self) -> bool:
        return self.artwork in DAMAGE_PRINTS

    @property
    def unit_grid(self) -> tuple[int, int]:
        """Units along the length and across the width of a multipack."""
        if self.units <= 1:
            return (1, 1)
        for across in (2, 3, 1):
            if self.units % across == 0 and self.units // across >= across:
                return (self.units // across, across)
        return (self.units, 1)


@dataclass(frozen=True, slots=True)
class Catalogue:
    products: tuple[Product, ...]

    def get(self, product_id: str) -> Product | None:
        for p in self.products:
            if p.product_id == product_id:
                return p
        return None

    def ids(self) -> tuple[str, ...]:
        return tuple(p.product_id for p in self.products)


def _product(raw: object, i: int) -> Product:
    where = f"products[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, "a mapping")
    try:
        dims = tuple(float(v) for v in raw["dims_mm"])
        colour = tuple(int(v) for v in raw.get("colour", (128, 128, 128)))
        pid = str(raw["product_id"])
        units = int(raw.get("units", 1))
        art_seed = raw.get("art_seed")
    except KeyError as exc:
        raise ConfigError(f"{where}.{exc.args[0]}", None, "a value") from None
    except (TypeError, ValueError):
        raise ConfigError(where, raw, "product_id, dims_mm [l, w, h], units, colour") from None
    if len(dims) != 3 or min(dims) <= 0 or dims[0] < dims[1]:
        raise ConfigError(f"{where}.dims_mm", raw.get("dims_mm"), "[length, width, height] > 0, "
                          "length >= width")
    if raw.get("packaging") not in _PACKAGING:
        raise ConfigError(f"{where}.packaging", raw.get("packaging"), f"one of {_PACKAGING}")
    if raw.get("print", "plain") not in _ARTWORK:
        raise ConfigError(f"{where}.print", raw.get("print"), f"one of {_ARTWORK}")
    if units < 1 or len(colour) != 3:
        raise ConfigError(where, raw, "units >= 1 and colour [b, g, r]")
    if art_seed is not None and (not isinstance(art_seed, int) or isinstance(art_seed, bool)
                                 or art_seed < 0):
        raise ConfigError(f"{where}.art_seed", art_seed, "an integer >= 0, or absent")
    return Product(pid, raw["packaging"], (dims[0], dims[1], dims[2]), units,
                   raw.get("print", "plain"), (colour[0], colour[1], colour[2]), art_seed)


def load_catalogue(path: Path | None = None) -> Catalogue:
    p = path or DEFAULT_CATALOGUE
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("catalogue", str(p), f"a readable catalogue YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("products"), list):
        raise ConfigError("catalogue.products", data, "a list of products")
    products = tuple(_product(r, i) for i, r in enumerate(data["products"]))
    if len({p.product_id for p in products}) != len(products):
        raise ConfigError("catalogue.products", [p.product_id for p in products], "unique IDs")
    return Catalogue(products)


def catalogue_yaml(catalogue: Catalogue, header: str = "") -> str:
    """`catalogue` in the YAML form `load_catalogue` reads (one flow mapping per product)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append("products:")
    for p in catalogue.products:
        dims = ", ".join(f"{v:g}" for v in p.dims_mm)
        colour = ", ".join(str(c) for c in p.colour_bgr)
        seed = "" if p.art_seed is None else f", art_seed: {p.art_seed}"
        lines.append(f"  - {{product_id: {p.product_id}, packaging: {p.packaging}, "
                     f"dims_mm: [{dims}], units: {p.units}, print: {p.artwork}, "
                     f"colour: [{colour}]{seed}}}")
    return "\n".join(lines) + "\n"
