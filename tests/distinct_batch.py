"""A stand-in for the batch recompute of issue 11, for the serving tests until it lands.

``batch_processor.recompute`` is being changed (by another change) to remove
duplicate trip ids, first copy in source order counting, and to publish each
version with its trip index (CONTRACT 2, 4, 5). The serving tests need such
versions now; this module publishes them the same way, from the same master
files, with the storage layer's own primitives (the index is written inside
the staging directory, so a version appears with its index, as the real
one will). When the real recompute lands, ``recompute`` below becomes::

    batch_processor.recompute(master_dir, views_dir, workers=1, keep=keep, progress=False,
                              speed_dir=speed_dir)

The tests' *expected* values never come from here: they are pandas
computations over the trips the test generated.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import fastavro
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from periscope import speed_view, storage, views
from periscope.schema import FIELDS, RULE_NAMES, first_broken_rule


def read_master(master_dir: Path) -> tuple[list[Path], list[dict], list[int], pd.DataFrame]:
    """Master files in source order (``storage.master_files``), their headers and rows, and every record."""
    files = storage.master_files(master_dir)
    metadata, counts, frames = [], [], []
    for path in files:
        with open(path, "rb") as handle:
            records = list(fastavro.reader(handle))
        metadata.append(storage.avro_metadata(path))
        counts.append(len(records))
        frames.append(pd.DataFrame(records, columns=list(FIELDS)))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(FIELDS))
    return files, metadata, counts, frame


def publish_with_index(views_dir: Path, batch_views: dict[str, pd.DataFrame], manifest: dict,
                       ids: pd.Series, keep: int) -> dict:
    """``storage.write_version`` with the trip index written before the version becomes visible."""
    with storage.locked(views_dir):
        existing = storage.version_dirs(views_dir)
        version = f"v{int(existing[-1].name[1:]) + 1 if existing else 1:06d}"
        staging = views_dir / f".{version}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, frame in batch_views.items():
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), staging / f"{name}.parquet")
        manifest = {**manifest, "version": version}
        (staging / storage.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        storage.write_trip_index(staging, ids.to_numpy(dtype=object))
        os.replace(staging, views_dir / version)
        storage.atomic_write_json(views_dir / storage.POINTER, {"version": version})
        for old in storage.version_dirs(views_dir)[:-keep]:
            shutil.rmtree(old)
    return manifest


def recompute(master_dir: Path, views_dir: Path, keep: int = 3, speed_dir: Path | None = None) -> dict:
    """Every view over the distinct trips of the master data (first copy counts), published with its index."""
    files, metadata, counts, master = read_master(master_dir)
    distinct = master.drop_duplicates("id", keep="first")
    broken = first_broken_rule({name: distinct[name].to_numpy() for name in FIELDS[1:]})
    clean = distinct[broken < 0]
    batch_views = views.aggregate({name: clean[name].to_numpy() for name in FIELDS})
    rules = Counter({RULE_NAMES[index]: int((broken == index).sum()) for index in range(len(RULE_NAMES))})
    manifest = storage.views_manifest("python", master_dir, files, metadata, counts, len(clean), rules,
                                      batch_views, {})
    manifest["rows"].update(distinct=len(distinct), duplicates=len(master) - len(distinct))
    published = publish_with_index(views_dir, batch_views, manifest, distinct["id"], keep)
    if speed_dir is not None:
        published["speed_files_pruned"] = speed_view.prune(speed_dir, published["watermark"])
    return published
