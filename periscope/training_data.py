"""What ``train_model.py`` learns from: the trips, what identifies them, and which are held out.

* **Fingerprints.** A model's metadata says exactly which data it was trained
  on: a CSV by its SHA-256 and row counts, the master dataset by the list of
  its files (immutable and named by content, so the listing identifies the
  data) and their number.
* **The id hold-out** (``--split id``): a trip is held out when a seeded hash
  of its *base* id falls below the hold-out fraction. Replayed copies of a trip
  (``id2875421-2``, see ``periscope.schema.pass_suffix``) share the base id, so
  they fall on the same side, and a trip never changes side as data grows:
  models trained on bigger master data later hold out the same trips.
* **Hold-out files.** The held-out trips are written back as trip files:
  those with coordinates in the Kaggle layout (``holdout.csv.gz``), those known
  by zones only in their service's TLC zone layout
  (``holdout_yellow_zones.csv.gz``...), so ``train_model.py --evaluate`` can
  score any model on them and the promotion decision can tell which trips a
  model never saw.
* **Eras.** A mix of files is scored per service and era (``era_labels``):
  ``yellow 2016 coordinates``, ``yellow 2020 zones``, ``green 2023 zones``...
"""
from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from periscope import tlc
from periscope.features import COORDINATE_COLUMNS as COORDINATES
from periscope.schema import FIELDS, NOT_RECORDED, TRIP_FIELDS, format_time
from periscope.sources import LoadReport, empty_trip_frame, read_trips
from periscope.storage import file_sha256, master_files, read_master_records
from periscope.zones import zone_grid

HOLDOUT_FILES = {"coordinates": "holdout.csv.gz", "yellow": "holdout_yellow_zones.csv.gz",
                 "green": "holdout_green_zones.csv.gz"}
"""Hold-out file per kind of trip: with coordinates (Kaggle layout), or by zones, per service."""
_ZONE_LAYOUTS = {"yellow": "yellow_zones", "green": "green_zones"}
_COPY_SUFFIX = re.compile(r"-(sim)?\d+$")


def with_places(trips: pd.DataFrame) -> pd.DataFrame:
    """``trips`` with every ``TRIP_FIELDS`` column, filled where a source lacks it: a Kaggle file
    is yellow cabs by coordinates (layout ``kaggle``; zones, distance, fares not recorded)."""
    trips = trips.copy()
    defaults = {"service": "yellow", "source_layout": tlc.KAGGLE,
                "pickup_location_id": NOT_RECORDED, "dropoff_location_id": NOT_RECORDED}
    defaults.update({name: np.nan for name in ("trip_distance", "fare_amount", "tip_amount", "total_amount")})
    defaults["payment_type"] = NOT_RECORDED
    for name, default in defaults.items():
        trips[name] = trips[name].fillna(default) if name in trips else default
    for name in ("pickup_location_id", "dropoff_location_id", "payment_type"):
        trips[name] = trips[name].astype(np.int64)
    for name in ("trip_distance", "fare_amount", "tip_amount", "total_amount"):
        trips[name] = trips[name].astype(np.float64)
    return trips


def read_trip_files(paths: list[Path]) -> tuple[pd.DataFrame, list[LoadReport]]:
    """Every trip of the files (any supported layout, mixed), one frame, and each file's report."""
    frames, reports = [], []
    for path in paths:
        trips, report = read_trips(path, tlc_layouts=True)
        frames.append(with_places(trips))
        reports.append(report)
    return pd.concat([frame[list(TRIP_FIELDS)] for frame in frames], ignore_index=True), reports


def as_zone_only(trips: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, int]:
    """``trips`` with a seeded random ``share`` of those with coordinates turned into trips known
    by their zones only (the zones holding their points, their coordinates NaN), and how many.

    A model trained on trips with coordinates alone never sees a missing
    coordinate, and then predicts a zone-only trip badly (an RMSLE of 0.73 on
    zone-era months against 0.41 with a 20 % share, docs/MODEL.md).
    """
    located = ~trips[list(COORDINATES)].isna().any(axis=1).to_numpy()
    chosen = located & (np.random.default_rng(seed).random(len(trips)) < share)
    if not chosen.any():
        return trips, 0
    trips = with_places(trips)
    for end in ("pickup", "dropoff"):
        zone = zone_grid().zone_of(trips[f"{end}_longitude"].to_numpy()[chosen],
                                   trips[f"{end}_latitude"].to_numpy()[chosen])
        column = trips[f"{end}_location_id"].to_numpy().copy()
        column[chosen] = np.where(column[chosen] == NOT_RECORDED, zone, column[chosen])
        trips[f"{end}_location_id"] = column
        for name in (f"{end}_longitude", f"{end}_latitude"):
            trips[name] = np.where(chosen, np.nan, trips[name].to_numpy())
    return trips, int(chosen.sum())


def era_labels(trips: pd.DataFrame) -> pd.Series:
    """Each trip's service and era: ``<service> <pickup year> coordinates|zones``."""
    years = (np.asarray(trips["pickup_datetime"], dtype=np.int64) // 86_400_000).astype("datetime64[D]")
    years = years.astype("datetime64[Y]").astype(np.int64) + 1970
    by_zone = trips[list(COORDINATES)].isna().any(axis=1).to_numpy()
    service = trips["service"].fillna("yellow") if "service" in trips else "yellow"
    return (pd.Series(service, index=trips.index).astype(str) + " " + pd.Series(years, index=trips.index)
            .astype(str) + np.where(by_zone, " zones", " coordinates"))


def csv_fingerprint(path: Path, report: LoadReport) -> dict[str, Any]:
    """What identifies a training CSV: its path, SHA-256 and row counts."""
    return {"file": str(path), "sha256": file_sha256(Path(path)),
            "rows_read": report.rows_read, "rows_malformed": report.rows_malformed}


def files_fingerprint(paths: list[Path], reports: list[LoadReport]) -> dict[str, Any]:
    """What identifies the training files: one file's ``csv_fingerprint``, or each file's and the sums."""
    prints = [csv_fingerprint(path, report) for path, report in zip(paths, reports)]
    if len(prints) == 1:
        return prints[0]
    return {"files": prints, "rows_read": sum(p["rows_read"] for p in prints),
            "rows_malformed": sum(p["rows_malformed"] for p in prints)}


def input_files(patterns: list[str]) -> list[Path]:
    """The files ``--input`` names: each a path or a glob (sorted), each file once."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no file matches; give a trip file or a glob "
                                    "that matches some")
        files += [Path(match) for match in matches if Path(match) not in files]
    return files


def read_master(master_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every trip of the batch layer's master dataset as a trip frame, and its fingerprint.

    Master files are immutable and named by content (CSV digest, Kafka
    offsets), so their names fingerprint the training data. Every record is
    read, a fact stored twice included (the id hold-out keeps its copies on one
    side), trips known by their zones only (TLC since mid-2016) too: they are
    counted in ``rows_by_zone_only``.
    """
    files = master_files(master_dir)
    if not files:
        raise FileNotFoundError(f"no master data in {master_dir}: "
                                "run `python batch_processor.py` first")
    trips = pd.DataFrame.from_records(read_master_records(master_dir), columns=list(TRIP_FIELDS))
    read = len(trips)
    trips = trips.fillna({"vendor_id": NOT_RECORDED, "passenger_count": NOT_RECORDED})
    trips["store_and_fwd_flag"] = trips["store_and_fwd_flag"].eq(True)  # null: not held in the car
    if len(trips):
        trips = trips.astype(empty_trip_frame().dtypes.to_dict())
    else:
        trips = empty_trip_frame()
    trips = with_places(trips)[list(TRIP_FIELDS)]
    listing = "\n".join(str(path.relative_to(master_dir)) for path in files)
    by_zone = int(trips[list(COORDINATES)].isna().any(axis=1).sum())
    return trips.reset_index(drop=True), {
        "master_dir": str(master_dir), "master_files": len(files),
        "sha256": hashlib.sha256(listing.encode()).hexdigest(), "rows_read": read, "rows_malformed": 0,
        "rows_by_zone_only": by_zone}


def base_id(trip_id: str) -> str:
    """The id of the original trip: replayed copies (``id2875421-2``) and the simulated API's
    retimed trips (``id2875421-sim1``) share it."""
    return _COPY_SUFFIX.sub("", trip_id)


def id_holdout_mask(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """True for the trips held out by a seeded hash of their base id (4 bytes of BLAKE2b below
    ``fraction`` of 2**32): the same trips whatever else the data holds, copies together."""
    cut = int(fraction * 2**32)
    hashes = [hashlib.blake2b(f"{seed}:{base_id(i)}".encode(), digest_size=4).digest() for i in ids]
    return np.asarray([int.from_bytes(h, "big") for h in hashes], dtype=np.uint64) < cut


def write_kaggle_csv(trips: pd.DataFrame, path: Path) -> None:
    """Write record-form trips back in the Kaggle layout (gzip when ``path`` ends in ``.gz``)."""
    out = trips.copy()
    for name in ("pickup_datetime", "dropoff_datetime"):
        out[name] = [format_time(ms) for ms in out[name]]
    out["store_and_fwd_flag"] = np.where(out["store_and_fwd_flag"].fillna(False).astype(bool), "Y", "N")
    out[list(FIELDS)].to_csv(path, index=False, float_format="%.15g")


def write_zone_csv(trips: pd.DataFrame, service: str, path: Path) -> None:
    """Write trips known by zones in ``service``'s TLC zone layout (``tlc.LAYOUTS``), as TLC
    publishes them; a value not recorded is left empty."""
    layout = next(layout for layout in tlc.LAYOUTS if layout.name == _ZONE_LAYOUTS[service])
    out = pd.DataFrame(index=trips.index)
    for name, column in layout.columns.items():
        values = trips[name]
        if name in ("pickup_datetime", "dropoff_datetime"):
            values = pd.Series([format_time(ms) for ms in values], index=trips.index)
        elif name == "store_and_fwd_flag":
            values = values.map({True: "Y", False: "N"})
        elif values.dtype.kind == "i":
            values = values.where(values != NOT_RECORDED).astype("Int64")
        out[column] = values
    out.to_csv(path, index=False, float_format="%.15g")


def read_holdout(directory: Path) -> pd.DataFrame:
    """The held-out trips ``write_holdout`` wrote in ``directory`` (an empty frame if none)."""
    paths = [directory / name for name in HOLDOUT_FILES.values() if (directory / name).exists()]
    return read_trip_files(paths)[0] if paths else with_places(empty_trip_frame())


def write_holdout(trips: pd.DataFrame, directory: Path) -> list[Path]:
    """The held-out trips as trip files in ``directory`` (``HOLDOUT_FILES``); the files written."""
    trips = with_places(trips)
    by_zone = trips[list(COORDINATES)].isna().any(axis=1)
    written = []
    if (~by_zone).any() or not by_zone.any():
        write_kaggle_csv(trips[~by_zone], directory / HOLDOUT_FILES["coordinates"])
        written.append(directory / HOLDOUT_FILES["coordinates"])
    for service in _ZONE_LAYOUTS:
        chosen = trips[by_zone & (trips["service"] == service)]
        if len(chosen):
            write_zone_csv(chosen, service, directory / HOLDOUT_FILES[service])
            written.append(directory / HOLDOUT_FILES[service])
    return written
