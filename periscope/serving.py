"""The Lambda merge: batch view + speed view = the answer a full recompute would give.

``combined_views`` is what the dashboard shows and what the tests check:

    combined = current batch version
             + aggregates of speed rows whose offset is above that version's
               watermark for their partition

Batch and speed views hold the same integer aggregates (``periscope.views``),
so the sum is exact. Trips the batch version already covers (offset at or
below its watermark) are excluded from the speed part, so nothing counts
twice; trips it does not cover yet come from the speed layer, so nothing is
missing.

The batch pointer is read before and after the speed files: if a new version
was published (and the speed view pruned) in between, the read is repeated,
so a reader never combines an old batch version with an already-pruned speed
view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from periscope import speed_view, storage, views


@dataclass
class Combined:
    """The merged views and where each part came from."""

    views: dict[str, pd.DataFrame]
    batch_views: dict[str, pd.DataFrame]
    speed_views: dict[str, pd.DataFrame]
    speed_rows: pd.DataFrame
    batch_version: str | None = None
    watermark: dict[int, int] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_trips(self) -> int:
        return int(self.batch_views["daily_summary"]["trips"].sum())

    @property
    def speed_trips(self) -> int:
        return len(self.speed_rows)


def empty_views() -> dict[str, pd.DataFrame]:
    return {name: views.empty_view(name) for name in views.VIEWS}


def speed_aggregates(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The speed layer's rows as mergeable views (the same code as the batch layer)."""
    return views.aggregate({name: rows[name].to_numpy() for name in rows.columns})


def combined_views(views_dir: Path, speed_dir: Path, attempts: int = 5) -> Combined:
    """Current batch version + speed rows above its watermark, merged view by view."""
    for _ in range(attempts):
        version = storage.current_version(views_dir)
        if version is None:
            batch, manifest = empty_views(), {}
        else:
            try:
                batch, manifest = storage.read_version(views_dir, version)
            except FileNotFoundError:
                continue
        watermark = speed_view.normalise_watermark(manifest.get("watermark"))
        rows = speed_view.read_speed(speed_dir, watermark)
        if storage.current_version(views_dir) == version:
            speed = speed_aggregates(rows)
            batch = {name: batch.get(name, views.empty_view(name)) for name in views.VIEWS}
            return Combined(views.merge(batch, speed), batch, speed, rows, version, watermark, manifest)
    raise RuntimeError(f"batch versions in {views_dir} changed {attempts} times while reading; try again")
