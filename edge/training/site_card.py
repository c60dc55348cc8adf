"""The candidate's damage model card: what it was fine-tuned on and how it compares."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from edge.durable import write_atomic
from edge.infer.inspector import DAMAGE
from edge.infer.manifest import Manifest
from edge.training.fit_head import DEPTH_DROPOUT

CARD = "MODEL_CARD.md"


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100.0 * v:.1f}%"


def _num(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.4f}"


def comparison_table(held: dict[str, Any]) -> str:
    cur, cand = held["current"], held["candidate"]
    two = cand["two_fold"]
    rows = [
        "| model | thresholds | recall | false-positive rate | AUROC | sideline rate |",
        "|---|---|---|---|---|---|",
        f"| current {cur['version']} | {cur['thresholds']} | {_pct(cur['recall'])} | "
        f"{_pct(cur['false_positive_rate'])} | {_num(cur['auroc'])} | "
        f"{_pct(cur['sideline_rate'])} |",
        f"| candidate {cand['version']} | {cand['thresholds']} (fitted on these items) | "
        f"{_pct(cand['recall'])} | {_pct(cand['false_positive_rate'])} | {_num(cand['auroc'])} "
        f"| {_pct(cand['sideline_rate'])} |",
        f"| candidate, two-fold (thresholds fitted on the other half) | | "
        f"{_pct(two['recall'])} | {_pct(two['false_positive_rate'])} | | "
        f"{_pct(two['sideline_rate'])} |",
    ]
    return "\n".join(rows)


def combination_table(held: dict[str, Any]) -> str:
    """Held-out items per input combination: what each one's fusion weights and threshold
    were fitted on."""
    rows = ["| inputs | items | damaged | intact |", "|---|---|---|---|"]
    for combo, n in held["candidate"]["by_combination"].items():
        rows.append(f"| {combo} | {n['items']} | {n['damaged']} | {n['intact']} |")
    return "\n".join(rows)


def _target(metrics: dict[str, Any]) -> str:
    target = metrics["target_fpr"]
    asked = metrics.get("requested_target_fpr", target)
    if target == asked:
        return f"target false-positive rate {_pct(target)}"
    return (f"target false-positive rate {_pct(target)}, not the {_pct(asked)} asked for: the "
            "intact held-out items cannot tell lower rates apart")


def _gallery(metrics: dict[str, Any]) -> str:
    gallery = metrics.get("gallery", "shipped")
    if gallery == "shipped":
        return "the shipped reference views only (no node gallery given)"
    return f"the node's reference gallery `{gallery}`"


def _warnings(metrics: dict[str, Any]) -> str:
    said = metrics.get("warnings") or []
    if not said:
        return ""
    return "## Warnings\n\n" + "\n".join(f"- {w}" for w in said) + "\n\n"


def write_site_cards(folder: Path, metrics: dict[str, Any], current: Manifest) -> None:
    """`damage/MODEL_CARD.md` of the candidate in `folder` (the embedding's is the current
    one, copied: that model did not change)."""
    held = metrics["held_out"]
    labels = metrics["labels"]
    card = f"""# Model card: damage (version {metrics['version']})

Fine-tuned by `edge-node train` from the damage head of {metrics['base_version']}, on this
site's labelled audit snapshots (`{metrics['data']}`). The backbone (`embedding`) is the one of
{metrics['base_version']}, unchanged and frozen: the reference gallery stays valid. The
architecture, inputs and outputs are those of the base model; see its card for them.

{_warnings(metrics)}## Training data

- Labelled items: {labels['items']} ({labels['damaged']} damaged, {labels['intact']} intact),
  by source: {', '.join(f'{k} {v}' for k, v in sorted(labels['by_source'].items()))}.
  `confirmed_damage` feedback is damaged; `false_positive`, `packaging_changed` and sampled
  passes nobody contradicted are intact; sidelined items nobody reviewed are left out
  ({labels['skipped'].get('unreviewed_sideline', 0)} of them), and so are passes kept only
  for a shadow disagreement nobody reviewed ({labels['skipped'].get('unreviewed_shadow', 0)}).
- Split by item ID (both views of an item on one side): training
  {labels['train']['damaged']} damaged / {labels['train']['intact']} intact; held out
  {labels['held_out']['damaged']} damaged / {labels['held_out']['intact']} intact.
- Synthetic items mixed into training: {metrics['synthetic_items']} (half damaged, with
  per-type labels and damage masks; weighted so that they count no more than the site's).
- {metrics['epochs']} epochs from the base head's weights, each crop also turned by 180
  degrees, depth dropped for {DEPTH_DROPOUT:.0%} of the samples; losses per epoch:
  {', '.join(f'{x:.3f}' for x in metrics['losses'])}.

## Held-out site items

Fusion weights and thresholds ({_target(metrics)}) were refitted on
the held-out items; both models were then run on them, each at its own thresholds, against
{_gallery(metrics)}. With {held['intact']} intact
items there, a false-positive rate below {_pct(1.0 / (held['intact'] + 1))} cannot be told
apart from it. The labelled items are not a
random sample of the line (every sidelined item can be labelled, passes only as sampled), so
the sideline rate here is not the line's: the shadow record on the device measures that.

{comparison_table(held)}

Held-out items by the inputs they were scored with (each combination's fusion weights and
threshold are fitted on its own items):

{combination_table(held)}

Damaged held-out items the current models passed: {held['current_misses']}, of which the
candidate sidelines {held['current_misses_caught_by_candidate']}.

Made in {metrics['training_seconds']:.0f} s ({metrics['items_per_second']} items/s; stages:
{', '.join(f'{k} {v} s' for k, v in metrics['timings_s'].items())}).
"""
    path = folder / current.model(DAMAGE).path.relative_to(current.path.parent).parent / CARD
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, card)


def set_card_section(path: Path, heading: str, body: str) -> None:
    """Put `## heading` with `body` into the card, replacing a section of that heading."""
    text = path.read_text(encoding="utf-8")
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    write_atomic(path, text)
