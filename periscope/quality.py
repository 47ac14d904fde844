"""The batch layer's data-quality gate, between computing views and publishing them.

The Airflow DAG ``taxi_batch_processing`` computes a new set of batch views
with ``batch_processor.compute_views`` (nothing published yet), stages them on
disk (views are too big for Airflow's XCom), checks them here, and only then
publishes with ``batch_processor.publish``. A failed check fails the run and
publishes nothing: the dashboard keeps serving the last good version.

``check`` is a pure function of the staged views, their manifest and trip
index, what the master files' own headers say, and the current published
manifest, so the tests call it on real views with real defects.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl

from periscope import views as view_defs
from periscope.storage import (
    MANIFEST,
    TRIP_INDEX,
    BatchVersion,
    atomic_write_json,
    avro_metadata,
    discard_written,
    link_version_files,
    read_json,
    read_view,
    write_trip_index,
    write_views,
)

DEFAULT_MAX_REJECTED_SHARE = 0.05
"""The real sample loses 0.8 % of its trips to the cleaning rules; 5 % means something broke upstream."""


@dataclass(frozen=True)
class Thresholds:
    max_rejected_share: float = DEFAULT_MAX_REJECTED_SHARE
    min_clean_trips: int = 1


# --- staging: computed views on disk, between Airflow tasks --------------------------------


def stage(staging_dir: Path, version: BatchVersion) -> Path:
    """Write computed views, their manifest and trip index to ``staging_dir`` (replacing an earlier
    attempt's); the manifest last, so that its presence means the rest is there. Files the engine
    already wrote (the Spark engine's, ``version.written``) are moved there."""
    shutil.rmtree(staging_dir, ignore_errors=True)
    staging_dir.mkdir(parents=True)
    if version.written is not None:
        link_version_files(version.written, staging_dir)
        discard_written(version)
    else:
        write_views(staging_dir, version.views)
        write_trip_index(staging_dir, version.trip_ids)
    atomic_write_json(staging_dir / MANIFEST, version.manifest)
    return staging_dir


def read_staged(staging_dir: Path) -> BatchVersion:
    if not (staging_dir / MANIFEST).exists():
        raise FileNotFoundError(f"nothing staged in {staging_dir}: the compute_views task did not finish")
    batch_views = {path.stem: read_view(path) for path in sorted(staging_dir.glob("*.parquet"))}
    trip_ids = pl.read_parquet(staging_dir / TRIP_INDEX)["id"]
    return BatchVersion(batch_views, read_json(staging_dir / MANIFEST), trip_ids, written=staging_dir)


# --- the checks ---------------------------------------------------------------------------


def master_rows(master_dir: Path, manifest: Mapping[str, Any]) -> dict[str, int]:
    """Rows each input file of ``manifest`` holds, by its own Avro header (an independent count)."""
    rows = {}
    for entry in manifest["input_files"]:
        path = Path(master_dir) / entry["path"]
        rows[entry["path"]] = int(avro_metadata(path)["rows"]) if path.exists() else -1
    return rows


def check(batch_views: Mapping[str, pd.DataFrame], manifest: Mapping[str, Any], file_rows: Mapping[str, int],
          previous: Mapping[str, Any] | None, thresholds: Thresholds = Thresholds(),
          trip_ids: Sized | None = None) -> list[str]:
    """Every way the computed views are not fit to publish; empty if they pass.

    ``file_rows`` is ``master_rows(...)``; ``previous`` the current published
    manifest (None before the first publish); ``trip_ids`` the version's trip
    index, which must hold one id per distinct trip. The counts must add up:
    master rows = distinct trips + duplicates (later copies left out), and
    distinct trips = clean + rejected by the cleaning rules.
    """
    problems: list[str] = []
    rows = manifest["rows"]
    missing = sorted(path for path, count in file_rows.items() if count < 0)
    if missing:
        problems.append(f"{len(missing)} input files vanished from master data, e.g. {missing[0]}")
    for entry in manifest["input_files"]:
        if file_rows.get(entry["path"], -1) >= 0 and int(entry["rows"]) != file_rows[entry["path"]]:
            problems.append(f"{entry['path']}: read {entry['rows']} rows, its header says {file_rows[entry['path']]}")
    if rows["master"] != sum(max(count, 0) for count in file_rows.values()):
        problems.append(f"views cover {rows['master']:,} master trips, the master files hold "
                        f"{sum(max(c, 0) for c in file_rows.values()):,}")
    if rows["distinct"] + rows["duplicates"] != rows["master"]:
        problems.append(f"distinct ({rows['distinct']:,}) + duplicates ({rows['duplicates']:,}) != master trips "
                        f"({rows['master']:,})")
    if sum(int(entry.get("duplicates", 0)) for entry in manifest["input_files"]) != rows["duplicates"]:
        problems.append(f"the input files' duplicates do not add up to the {rows['duplicates']:,} removed")
    if trip_ids is not None and len(trip_ids) != rows["distinct"]:
        problems.append(f"the trip index holds {len(trip_ids):,} ids, not one per distinct trip "
                        f"({rows['distinct']:,})")
    rejected = sum(manifest["cleaning"].values())
    if rows["clean"] + rejected != rows["distinct"]:
        problems.append(f"clean ({rows['clean']:,}) + rejected ({rejected:,}) != distinct trips "
                        f"({rows['distinct']:,})")
    if rows["distinct"] and rejected / rows["distinct"] > thresholds.max_rejected_share:
        problems.append(f"the cleaning rules rejected {rejected / rows['distinct']:.2%} of the distinct trips, "
                        f"more than max_rejected_share {thresholds.max_rejected_share:.2%}: "
                        f"{dict(manifest['cleaning'])}")
    if rows["clean"] < thresholds.min_clean_trips:
        problems.append(f"only {rows['clean']:,} clean trips, fewer than {thresholds.min_clean_trips:,}: "
                        "is master data empty? (`python batch_processor.py import` or run the simulation DAG)")
    for name in view_defs.VIEWS:
        frame = batch_views.get(name)
        if frame is None:
            problems.append(f"view {name} is missing")
            continue
        if rows["clean"] and frame.empty:
            problems.append(f"view {name} is empty")
        counted = int(frame["trips"].sum())
        if counted != rows["clean"]:
            problems.append(f"view {name} counts {counted:,} trips, not the {rows['clean']:,} clean ones")
        for measure in view_defs.MEASURES:
            if len(frame) and int(frame[f"{measure}_min"].min()) < 0:
                problems.append(f"view {name} has a negative {measure} (min {int(frame[f'{measure}_min'].min())})")
            if (frame[f"{measure}_min"] > frame[f"{measure}_max"]).any():
                problems.append(f"view {name} has {measure} min > max")
        if (frame["trips"] <= 0).any():
            problems.append(f"view {name} has keys with no trips")
    if previous is not None:
        old, new = previous.get("watermark", {}), manifest.get("watermark", {})
        behind = {p: (o, new.get(p)) for p, o in old.items() if new.get(p, -1) < o}
        if behind:
            problems.append(f"the watermark would go backwards (partition: old, new): {behind}")
    return problems


def same_inputs(manifest: Mapping[str, Any], previous: Mapping[str, Any] | None) -> bool:
    """Do both manifests cover exactly the same master files (same paths, same rows)?"""
    if previous is None:
        return False
    key = lambda m: sorted((f["path"], int(f["rows"])) for f in m["input_files"])  # noqa: E731
    return key(manifest) == key(previous)


def report(problems: list[str]) -> str:
    return "data-quality gate failed, nothing published:\n  - " + "\n  - ".join(problems)


def summary(manifest: Mapping[str, Any]) -> str:
    rows = manifest["rows"]
    return json.dumps({"master": rows["master"], "distinct": rows["distinct"], "duplicates": rows["duplicates"],
                       "clean": rows["clean"], "watermark": manifest.get("watermark")})
