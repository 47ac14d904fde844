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
* **Hold-out files.** The held-out trips are written back in the Kaggle layout
  (``holdout.csv.gz``), so ``train_model.py --evaluate`` can score any model on
  them and the promotion decision can tell which trips a model never saw.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from periscope.schema import FIELDS, NOT_RECORDED, format_time
from periscope.sources import LoadReport, empty_trip_frame
from periscope.storage import file_sha256, master_files, read_master_records

COORDINATES = ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude")
_COPY_SUFFIX = re.compile(r"-(sim)?\d+$")


def csv_fingerprint(path: Path, report: LoadReport) -> dict[str, Any]:
    """What identifies a training CSV: its path, SHA-256 and row counts."""
    return {"file": str(path), "sha256": file_sha256(Path(path)),
            "rows_read": report.rows_read, "rows_malformed": report.rows_malformed}


def read_master(master_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every trip of the batch layer's master dataset as a trip frame, and its fingerprint.

    Master files are immutable and named by content (CSV digest, Kafka
    offsets), so their names fingerprint the training data. Every record is
    read, a fact stored twice included (the id hold-out keeps its copies on one
    side). Trips without coordinates (TLC trips known by their zones) are left
    out and counted: the model's features need coordinates.
    """
    files = master_files(master_dir)
    if not files:
        raise FileNotFoundError(f"no master data in {master_dir}: "
                                "run `python batch_processor.py` first")
    trips = pd.DataFrame.from_records(read_master_records(master_dir), columns=list(FIELDS))
    read = len(trips)
    trips = trips[trips[list(COORDINATES)].notna().all(axis=1)]  # TLC trips known by zone only
    trips = trips.fillna({"vendor_id": NOT_RECORDED, "passenger_count": NOT_RECORDED})
    trips["store_and_fwd_flag"] = trips["store_and_fwd_flag"].eq(True)  # null: not held in the car
    trips = trips.astype(empty_trip_frame().dtypes.to_dict()) if len(trips) else empty_trip_frame()
    listing = "\n".join(str(path.relative_to(master_dir)) for path in files)
    return trips.reset_index(drop=True), {
        "master_dir": str(master_dir), "master_files": len(files),
        "sha256": hashlib.sha256(listing.encode()).hexdigest(), "rows_read": read, "rows_malformed": 0,
        "rows_without_coordinates": read - len(trips)}


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
