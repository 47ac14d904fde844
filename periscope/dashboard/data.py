"""What the dashboard shows, as plain tables: pure functions of published outputs, no Streamlit.

The serving layer reads only what the other layers *publish*: the current
batch version (``periscope.storage``), the speed files and status files
(``periscope.speed_view``), the merge of the two (``periscope.serving``),
model metadata (``periscope.model``) and Airflow's SQLite database, read-only.
Never Kafka internals, never a half-written file (every one of those appears
by an atomic rename), and never Spark.

Every function here takes what it needs as arguments and returns a small
DataFrame or dict, so the pages stay short and the tests check the numbers
without a browser. Times: event times (``pickup_datetime``) are New York wall
clock, shown as they are; processing times (Kafka timestamps, ``visible_at_ms``,
``updated_at_ms``, manifests) are UTC.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from periscope import serving, speed_view, storage, views, zones
from periscope.model import metrics
from periscope.schema import AVRO_SCHEMA, RULES, avro_type, format_time
from periscope.speed_view import SpeedStatus

LAYERS: tuple[str, ...] = ("batch", "speed")
LAYER_COLORS: tuple[str, ...] = ("#4c78a8", "#f58518")
"""Batch in blue, speed in orange, on every chart."""

CONSUMER_ALIVE_S = 10.0
"""A consumer writes its status every second; silent for longer than this, it counts as down."""
SPEED_STALE_S = 300.0
BATCH_STALE_S = 24 * 3600.0
DRIFT_WARN_RATIO = 1.2
"""Live RMSLE more than 20 % above the hold-out RMSLE is worth a look (and maybe a retrain)."""
WEEKDAYS: tuple[str, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
AIRFLOW_COLUMNS: tuple[str, ...] = ("dag_id", "run_id", "state", "logical_date", "start_date", "end_date")

COMMANDS = {
    "batch": "python batch_processor.py",
    "consumer": "python kafka_consumer.py",
    "producer": "python kafka_producer.py --rate 200",
    "more trips": "python kafka_producer.py --rate 200 --loop",
    "model": "python train_model.py",
    "broker": "make kafka-up",
    "airflow": "make airflow",
}
"""The command that fills each empty page, or turns each red light green."""


# --- time --------------------------------------------------------------------------------------


def now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


def utc(ms: float | None) -> pd.Timestamp | None:
    """A processing-time stamp (ms since the epoch, UTC) as a naive UTC timestamp, None if unknown."""
    return None if ms is None or pd.isna(ms) else pd.Timestamp(int(ms), unit="ms")


def iso_ms(text: str | None) -> int | None:
    """An ISO-8601 time (manifests, model metadata) in ms since the epoch, None if absent or unreadable."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def format_age(seconds: float | None) -> str:
    """``42 s``, ``5 min``, ``3.2 h``, ``4.0 d``: how long ago, for people."""
    if seconds is None or pd.isna(seconds):
        return "never"
    seconds = max(float(seconds), 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# --- the merged views ----------------------------------------------------------------------------


def speed_signature(speed_dir: Path) -> tuple[tuple[int, int, int], ...]:
    """``(partition, first, last)`` of every speed file: the cache key of the speed view.

    A speed file is immutable once named (rewriting a range gives the same
    bytes), so an unchanged listing means unchanged speed data.
    """
    return tuple((partition, first, last) for partition, first, last, _ in speed_view.batch_files(speed_dir))


def rollup(view: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """A view aggregated over fewer keys (e.g. hourly_stats by hour of day, over all dates); still mergeable."""
    how = {agg: ("min" if agg.endswith("_min") else "max" if agg.endswith("_max") else "sum")
           for agg in views.AGGREGATES}
    if not keys:
        return pd.DataFrame({agg: [view[agg].agg(fn) if len(view) else (0 if fn == "sum" else np.nan)]
                             for agg, fn in how.items()})
    return view.groupby(list(keys), sort=True).agg(how).reset_index()


def describe(view: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``rollup`` plus mean and standard deviation of each measure (``views.finalise``)."""
    return views.finalise(rollup(view, keys))


def overall(view: pd.DataFrame) -> dict[str, float | int | None]:
    """Trips and mean / standard deviation of duration (s) over a whole view."""
    row = describe(view, []).iloc[0]
    mean, std = row["duration_s_mean"], row["duration_s_std"]
    return {"trips": int(row["trips"]), "duration_mean_s": None if pd.isna(mean) else float(mean),
            "duration_std_s": None if pd.isna(std) else float(std)}


def layered(batch: pd.DataFrame, speed: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Trips per key from each layer, long form (keys, ``layer``, ``trips``): the stacked bars."""
    parts = []
    for layer, view in zip(LAYERS, (batch, speed)):
        part = rollup(view, keys)[[*keys, "trips"]]
        parts.append(part.assign(layer=layer))
    frame = pd.concat(parts, ignore_index=True)
    return frame[frame["trips"] > 0].reset_index(drop=True)


@dataclass(frozen=True)
class Coverage:
    """What the merged answer is made of: the batch version and what the speed layer adds."""

    batch_version: str | None
    batch_created_at: str | None
    watermark: dict[int, int]
    batch_trips: int
    speed_trips: int
    speed_minutes: float | None
    speed_first_pickup: str | None
    speed_last_pickup: str | None
    speed_duplicates_of_batch: int = 0
    """Speed rows left out: their trip is in the batch version already."""
    speed_duplicates_of_speed: int = 0
    """Speed rows left out: an earlier speed row holds their trip."""
    index_missing: bool = False
    """The batch version has no trip index, so speed rows were not checked against it."""


def coverage(combined: serving.Combined) -> Coverage:
    rows = combined.speed_rows
    produced = rows["kafka_timestamp_ms"]
    minutes = (produced.max() - produced.min()) / 60_000 if len(rows) else None
    pickups = rows["pickup_datetime"]
    return Coverage(
        batch_version=combined.batch_version,
        batch_created_at=combined.manifest.get("created_at"),
        watermark=dict(combined.watermark),
        batch_trips=combined.batch_trips,
        speed_trips=combined.speed_trips,
        speed_minutes=None if minutes is None else float(minutes),
        speed_first_pickup=format_time(pickups.min()) if len(rows) else None,
        speed_last_pickup=format_time(pickups.max()) if len(rows) else None,
        speed_duplicates_of_batch=combined.speed_duplicates_of_batch,
        speed_duplicates_of_speed=combined.speed_duplicates_of_speed,
        index_missing=combined.index_missing,
    )


def watermark_text(watermark: Mapping[int, int]) -> str:
    if not watermark:
        return "no stream offsets yet: CSV history only"
    return ", ".join(f"p{partition} ≤ {offset:,}" for partition, offset in sorted(watermark.items()))


def coverage_sentence(cover: Coverage) -> str:
    """The one line a class reads first: which batch version, what the speed layer adds on top."""
    if cover.batch_version is None:
        batch = "No batch version yet"
    else:
        created = f", published {cover.batch_created_at}" if cover.batch_created_at else ""
        batch = (f"Batch as of version **{cover.batch_version}** ({cover.batch_trips:,} trips; "
                 f"watermark {watermark_text(cover.watermark)}{created})")
    if cover.speed_trips == 0:
        speed = "the speed layer adds no trips yet"
    else:
        span = f"{cover.speed_minutes:.1f} minutes" if cover.speed_minutes is not None else "-"
        speed = (f"speed layer covers the last **{cover.speed_trips:,} trips / {span}** of the stream "
                 f"(pickups {cover.speed_first_pickup} to {cover.speed_last_pickup})")
    return f"{batch}; {speed}{duplicates_text(cover)}."


def duplicates_text(cover: Coverage) -> str:
    """What the merge left out so that each trip counts once (or why it could not check)."""
    text = ""
    left_out = cover.speed_duplicates_of_batch + cover.speed_duplicates_of_speed
    if left_out:
        text = (f"; {left_out:,} speed rows left out as copies ({cover.speed_duplicates_of_batch:,} of trips in "
                f"the batch, {cover.speed_duplicates_of_speed:,} of earlier speed rows)")
    if cover.index_missing:
        text += (f"; batch version {cover.batch_version} has no trip index, so speed trips it holds too may "
                 f"count twice until the next batch run")
    return text


# --- speed layer ---------------------------------------------------------------------------------


def latency_ms(rows: pd.DataFrame) -> pd.Series:
    """End-to-end latency per trip: produced to Kafka -> visible in the speed view."""
    return (rows["visible_at_ms"] - rows["kafka_timestamp_ms"]).astype("float64")


def recent_trips(rows: pd.DataFrame, limit: int = 50) -> pd.DataFrame:
    """The last ``limit`` trips the speed layer made visible, predicted beside actual duration."""
    recent = rows.sort_values(["visible_at_ms", "partition", "offset"], ascending=False).head(limit)
    return pd.DataFrame({
        "trip": recent["id"],
        "pickup (NY time)": [format_time(ms) for ms in recent["pickup_datetime"]],
        "vendor": recent["vendor_id"],
        "actual s": recent["trip_duration"],
        "predicted s": recent["predicted_duration_s"].round(0).astype("int64"),
        "error s": (recent["predicted_duration_s"] - recent["trip_duration"]).round(0).astype("int64"),
        "latency ms": latency_ms(recent).astype("int64"),
        "partition": recent["partition"],
        "offset": recent["offset"],
        "model": recent["model_version"],
    }).reset_index(drop=True)


def throughput(rows: pd.DataFrame, bin_s: int = 10) -> pd.DataFrame:
    """Per ``bin_s`` seconds of visibility time: trips per second and latency p50 / p99 (ms)."""
    if rows.empty:
        return pd.DataFrame({"time": pd.Series(dtype="datetime64[ns]"), "trips_per_s": pd.Series(dtype=float),
                             "latency_p50_ms": pd.Series(dtype=float), "latency_p99_ms": pd.Series(dtype=float)})
    frame = pd.DataFrame({"bin": rows["visible_at_ms"] // (bin_s * 1000) * (bin_s * 1000),
                          "latency": latency_ms(rows)})
    grouped = frame.groupby("bin")["latency"]
    out = pd.DataFrame({"trips_per_s": grouped.size() / bin_s, "latency_p50_ms": grouped.quantile(0.5),
                        "latency_p99_ms": grouped.quantile(0.99)}).reset_index()
    out.insert(0, "time", pd.to_datetime(out.pop("bin"), unit="ms"))
    return out


def read_status_files(statuses: Iterable[Mapping[str, Any]]) -> list[SpeedStatus]:
    """Status files' content (``speed_view.read_statuses``) in the format's one definition."""
    return [SpeedStatus.from_json(status) for status in statuses]


def consumers(statuses: Iterable[Mapping[str, Any]], now: int) -> pd.DataFrame:
    """One row per speed-layer process that wrote a status file: alive or not, rate, lag, latency."""
    rows = []
    for status in read_status_files(statuses):
        age_s = (now - status.updated_at_ms) / 1000
        rows.append({
            "consumer": status.consumer_id,
            "alive": status.state == "running" and age_s <= CONSUMER_ALIVE_S,
            "state": status.state,
            "last heartbeat": format_age(age_s) + " ago",
            "age_s": age_s,
            "trips/s": status.rate_per_s,
            "lag": status.total_lag,
            "latency p50 ms": status.latency_ms.p50,
            "latency p99 ms": status.latency_ms.p99,
            "consumed": status.totals.consumed,
            "dead letters": status.totals.dlq,
            "model": status.model_version,
            "partitions": ", ".join(str(p) for p in status.assigned_partitions),
        })
    return pd.DataFrame(rows, columns=["consumer", "alive", "state", "last heartbeat", "age_s", "trips/s", "lag",
                                       "latency p50 ms", "latency p99 ms", "consumed", "dead letters", "model",
                                       "partitions"])


def partition_lag(statuses: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Consumer lag per partition (messages behind the end of the log), from every status file."""
    rows = [{"consumer": status.consumer_id, "partition": partition, "position": status.positions.get(partition),
             "lag": lag}
            for status in read_status_files(statuses) for partition, lag in sorted(status.lag.items())]
    return pd.DataFrame(rows, columns=["consumer", "partition", "position", "lag"])


# --- model -----------------------------------------------------------------------------------------


def live_error(rows: pd.DataFrame) -> dict[str, float]:
    """MAE, RMSE and RMSLE of the speed layer's predictions against the durations in the stream."""
    return metrics(rows["trip_duration"].to_numpy(), rows["predicted_duration_s"].to_numpy())


def live_error_over_time(rows: pd.DataFrame, bin_s: int = 60) -> pd.DataFrame:
    """Live error per ``bin_s`` of visibility time, long form (time, metric, value, trips)."""
    if rows.empty:
        return pd.DataFrame({"time": pd.Series(dtype="datetime64[ns]"), "metric": pd.Series(dtype=object),
                             "value": pd.Series(dtype=float), "trips": pd.Series(dtype="int64")})
    bins = rows["visible_at_ms"] // (bin_s * 1000) * (bin_s * 1000)
    out = []
    for start, group in rows.groupby(bins):
        m = live_error(group)
        out += [{"time": pd.Timestamp(int(start), unit="ms"), "metric": name.upper(), "value": m[name],
                 "trips": m["rows"]} for name in ("mae", "rmse", "rmsle")]
    return pd.DataFrame(out)


def residuals(rows: pd.DataFrame) -> pd.DataFrame:
    """Per trip: predicted minus actual (s) and its log form, the error RMSLE squares."""
    predicted, actual = rows["predicted_duration_s"].to_numpy(float), rows["trip_duration"].to_numpy(float)
    return pd.DataFrame({"residual_s": predicted - actual, "log_residual": np.log1p(predicted) - np.log1p(actual)})


def feature_importances(estimator: Any, features: Sequence[str]) -> pd.DataFrame | None:
    """Share of each feature in the model's splits, from the fitted trees themselves (no re-scoring).

    A random forest offers ``feature_importances_`` (impurity decrease). Gradient
    boosting in scikit-learn does not; its trees record each split's gain, and
    the gain summed per feature is the same measure ("gain importance", as in
    LightGBM). None for an estimator that offers neither.
    """
    scores = getattr(estimator, "feature_importances_", None)
    if scores is None and hasattr(estimator, "_predictors"):
        scores = np.zeros(len(features))
        for iteration in estimator._predictors:
            for tree in iteration:
                splits = tree.nodes[~tree.nodes["is_leaf"].astype(bool)]
                np.add.at(scores, splits["feature_idx"], splits["gain"])
    return None if scores is None else importance_table(features, scores)


def importance_table(features: Sequence[str], scores: Sequence[float]) -> pd.DataFrame | None:
    """Importances normalised to shares of 1, largest first; None if they are all zero."""
    scores = np.asarray(scores, dtype=float)
    if np.sum(scores) <= 0:
        return None
    frame = pd.DataFrame({"feature": list(features), "importance": scores / np.sum(scores)})
    return frame.sort_values("importance", ascending=False, ignore_index=True)


def drift(holdout: Mapping[str, Any] | None, live: Mapping[str, Any]) -> dict[str, Any]:
    """Live error against the hold-out error of the same kind of trips.

    The speed layer predicts only trips that pass the cleaning rules, so the
    fair comparison is the hold-out's ``*_clean`` metrics.
    """
    result: dict[str, Any] = {"ratio": None, "drifting": None}
    if not holdout or not live.get("rows"):
        return result
    for name in ("mae", "rmse", "rmsle"):
        reference = holdout.get(f"{name}_clean", holdout.get(name))
        result[name] = {"holdout": reference, "live": live[name]}
    reference = result["rmsle"]["holdout"]
    if reference:
        result["ratio"] = live["rmsle"] / reference
        result["drifting"] = result["ratio"] > DRIFT_WARN_RATIO
    return result


def holdout_table(holdout: Mapping[str, Any]) -> pd.DataFrame:
    """Hold-out metrics of all held-out trips and of those passing the cleaning rules."""
    return pd.DataFrame({
        "trips": ["all held out", "clean (pass every rule)"],
        "rows": [holdout.get("rows"), holdout.get("rows_clean")],
        "RMSLE": [holdout.get("rmsle"), holdout.get("rmsle_clean")],
        "MAE s": [holdout.get("mae"), holdout.get("mae_clean")],
        "RMSE s": [holdout.get("rmse"), holdout.get("rmse_clean")],
    })


# --- data quality ----------------------------------------------------------------------------------


def dlq_over_time(statuses: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Dead letters per minute and reason, summed over every speed-layer process (``dlq_history``)."""
    rows = [{"minute": minute["minute_ms"], "reason": reason, "dead_letters": count}
            for status in read_status_files(statuses) for minute in status.dlq_history
            for reason, count in minute["counts"].items()]
    if not rows:
        return pd.DataFrame({"minute": pd.Series(dtype="datetime64[ns]"), "reason": pd.Series(dtype=object),
                             "dead_letters": pd.Series(dtype="int64")})
    frame = pd.DataFrame(rows).groupby(["minute", "reason"], as_index=False)["dead_letters"].sum()
    frame["minute"] = pd.to_datetime(frame["minute"], unit="ms")
    return frame


def dlq_totals(statuses: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Dead letters by reason since each process started, summed over processes."""
    totals: dict[str, int] = {}
    for status in read_status_files(statuses):
        for reason, count in status.totals.dlq_by_reason.items():
            totals[reason] = totals.get(reason, 0) + int(count)
    frame = pd.DataFrame({"reason": list(totals), "dead_letters": list(totals.values())}, columns=["reason",
                                                                                                   "dead_letters"])
    return frame.sort_values("dead_letters", ascending=False, ignore_index=True)


def cleaning_counts(manifest: Mapping[str, Any]) -> pd.DataFrame:
    """Trips each cleaning rule removed in the batch version (each counted under its first broken rule)."""
    counts = manifest.get("cleaning", {})
    return pd.DataFrame({"rule": [rule.name for rule in RULES], "description": [rule.description for rule in RULES],
                         "removed": [int(counts.get(rule.name, 0)) for rule in RULES]})


def duplicates_removed(manifest: Mapping[str, Any]) -> int | None:
    """Later copies of a trip the batch version left out, or None for a version made before it counted them."""
    duplicates = manifest.get("rows", {}).get("duplicates")
    return None if duplicates is None else int(duplicates)


def schema_fields() -> pd.DataFrame:
    """The trip schema (the Avro schema of the master dataset) as a table."""
    return pd.DataFrame([{"field": f["name"],
                          "type": avro_type(f) + (" or null" if isinstance(f["type"], list) else ""),
                          "meaning": f.get("doc", "")} for f in AVRO_SCHEMA["fields"]])


def last_speed_write_ms(speed_dir: Path) -> int | None:
    """When the newest speed file appeared (its rename), None if there is none."""
    times = []
    for *_, path in speed_view.batch_files(speed_dir):
        try:
            times.append(path.stat().st_mtime_ns // 1_000_000)
        except FileNotFoundError:
            continue
    return max(times, default=None)


def freshness(now: int, manifest: Mapping[str, Any], last_speed_ms: int | None,
              statuses: Sequence[Mapping[str, Any]], model_meta: Mapping[str, Any] | None) -> pd.DataFrame:
    """How old each layer's latest output is, whether that is fine, and what refreshes it."""
    heartbeat = max((s.updated_at_ms for s in read_status_files(statuses)), default=None)
    items = [
        ("batch view", iso_ms(manifest.get("created_at")), BATCH_STALE_S, COMMANDS["batch"]),
        ("speed view (last write)", last_speed_ms, SPEED_STALE_S, COMMANDS["consumer"]),
        ("speed layer heartbeat", heartbeat, CONSUMER_ALIVE_S, COMMANDS["consumer"]),
        ("model", iso_ms((model_meta or {}).get("trained_at")), None, COMMANDS["model"]),
    ]
    rows = []
    for layer, stamp, limit, fix in items:
        age = None if stamp is None else (now - stamp) / 1000
        fresh = age is not None and (limit is None or age <= limit)
        rows.append({"layer": layer, "updated (UTC)": utc(stamp), "age": format_age(age),
                     "fresh": fresh, "refresh with": fix})
    return pd.DataFrame(rows)


# --- operations ------------------------------------------------------------------------------------


def versions(views_dir: Path) -> pd.DataFrame:
    """Every kept batch version with the main facts of its manifest, newest first."""
    current = storage.current_version(views_dir)
    rows = []
    for directory in reversed(storage.version_dirs(views_dir)):
        try:
            manifest = storage.read_json(directory / storage.MANIFEST)
        except (OSError, ValueError):
            continue
        counts = manifest.get("rows", {})
        rows.append({
            "version": directory.name, "current": directory.name == current,
            "created (UTC)": manifest.get("created_at"), "engine": manifest.get("engine"),
            "master trips": counts.get("master"), "clean trips": counts.get("clean"),
            "watermark": watermark_text(speed_view.normalise_watermark(manifest.get("watermark"))),
            "input files": len(manifest.get("input_files", [])),
            "seconds": round(sum(manifest.get("timings_s", {}).values()), 2),
        })
    return pd.DataFrame(rows, columns=["version", "current", "created (UTC)", "engine", "master trips",
                                       "clean trips", "watermark", "input files", "seconds"])


def airflow_runs(airflow_home: Path, limit: int = 30) -> pd.DataFrame | None:
    """The latest DAG runs from Airflow's metadata database (read-only), None if there is none yet."""
    database = Path(airflow_home) / "airflow.db"
    if not database.exists():
        return None
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "dag_run" not in tables:
            return None
        query = (f"SELECT {', '.join(AIRFLOW_COLUMNS)} FROM dag_run "
                 "ORDER BY COALESCE(start_date, logical_date) DESC LIMIT ?")
        frame = pd.read_sql_query(query, connection, params=(limit,))
    finally:
        connection.close()
    for column in ("logical_date", "start_date", "end_date"):
        frame[column] = pd.to_datetime(frame[column], utc=True, errors="coerce", format="mixed").dt.tz_localize(None)
    frame["seconds"] = (frame["end_date"] - frame["start_date"]).dt.total_seconds()
    return frame


def last_run_per_dag(runs: pd.DataFrame) -> pd.DataFrame:
    """The most recent run of each DAG (``runs`` is newest first)."""
    return runs.drop_duplicates("dag_id").sort_values("dag_id", ignore_index=True)


def health(now: int, broker_ok: bool, bootstrap: str, statuses: Sequence[Mapping[str, Any]],
           last_speed_ms: int | None, batch_version: str | None, manifest: Mapping[str, Any],
           model_version: str | None, airflow: pd.DataFrame | None) -> pd.DataFrame:
    """A light per component: ok or not, what was seen, and the command that fixes a red one.

    Only speed-layer processes with a fresh heartbeat count as alive; the
    status files of stopped or killed ones stay on disk and are only named as
    ignored. No recent speed file is fine while a live speed layer is caught
    up (no new trips, or a batch run just pruned its files).
    """
    procs = consumers(statuses, now)
    alive = procs[procs["alive"]]
    gone = len(procs) - len(alive)
    lag = int(alive["lag"].fillna(0).sum()) if len(alive) else None
    caught_up = len(alive) > 0 and alive["lag"].notna().all() and lag == 0
    speed_age = None if last_speed_ms is None else (now - last_speed_ms) / 1000
    batch_age = None if batch_version is None else (now - (iso_ms(manifest.get("created_at")) or now)) / 1000
    failed = [] if airflow is None else list(last_run_per_dag(airflow).query("state == 'failed'")["dag_id"])
    ignored = f" ({gone} stopped or silent one{'s' if gone != 1 else ''} ignored)" if gone else ""
    if len(alive):
        consumer_detail = f"{len(alive)} alive{ignored}, total lag {lag:,}"
    elif len(procs):
        consumer_detail = f"none alive; the last heartbeat was {format_age(procs['age_s'].min())} ago{ignored}"
    else:
        consumer_detail = "never ran here"
    recent_write = speed_age is not None and speed_age <= SPEED_STALE_S
    if recent_write:
        write_detail = f"{format_age(speed_age)} ago"
    elif caught_up:
        write_detail = ("no recent speed file, and none needed: the speed layer is caught up (lag 0); "
                        + ("the batch layer pruned what it covers" if speed_age is None else
                           f"the last one was written {format_age(speed_age)} ago"))
    else:
        write_detail = "no speed files" if speed_age is None else f"{format_age(speed_age)} ago"
    rows = [
        ("Kafka broker", broker_ok, f"{bootstrap} {'answers' if broker_ok else 'does not answer'}",
         COMMANDS["broker"]),
        ("speed layer consumer", len(alive) > 0, consumer_detail, COMMANDS["consumer"]),
        ("last speed write", recent_write or caught_up, write_detail, COMMANDS["consumer"]),
        ("batch view", batch_version is not None and batch_age <= BATCH_STALE_S,
         f"{batch_version}, published {format_age(batch_age)} ago" if batch_version else "no version yet",
         COMMANDS["batch"]),
        ("model", model_version is not None, model_version or "no model yet", COMMANDS["model"]),
        ("Airflow", airflow is not None and not airflow.empty and not failed,
         ("no Airflow database yet" if airflow is None else
          "no DAG runs yet (its DAGs start paused: switch one on)" if airflow.empty else
          f"last run failed: {', '.join(failed)}" if failed else f"{airflow['dag_id'].nunique()} DAGs, last runs ok"),
         COMMANDS["airflow"]),
    ]
    return pd.DataFrame(rows, columns=["component", "ok", "detail", "fix"])


# --- batch layer -----------------------------------------------------------------------------------


def between_dates(view: pd.DataFrame, start: Any, end: Any) -> pd.DataFrame:
    """Rows of a date-keyed view with ``start <= pickup_date <= end`` (inclusive days)."""
    dates = view["pickup_date"]
    return view[(dates >= pd.Timestamp(start)) & (dates <= pd.Timestamp(end))]


def hour_of_week(view: pd.DataFrame) -> pd.DataFrame:
    """The hour-of-week view with weekday names and means, for the heatmap."""
    out = views.finalise(view)
    out["weekday"] = [WEEKDAYS[day] for day in out["pickup_weekday"]]
    return out


def map_cells(view: pd.DataFrame) -> pd.DataFrame:
    """Pickup-grid cells with centre, trips, mean duration and a colour/radius for the density map."""
    out = views.finalise(view)[["latitude", "longitude", "trips", "duration_s_mean"]].copy()
    if out.empty:
        return out.assign(color=pd.Series(dtype=object), radius=pd.Series(dtype=float))
    level = np.log1p(out["trips"]) / np.log1p(out["trips"].max())
    out["color"] = [[230, int(200 * (1 - v)) + 30, int(90 * (1 - v)), 200] for v in level]  # yellow -> red
    out["radius"] = 60 + 180 * level
    out["duration_s_mean"] = out["duration_s_mean"].round(0)
    return out.reset_index(drop=True)


# --- zones and boroughs ----------------------------------------------------------------------------

ZONE_MEASURES: dict[str, str] = {"trips": "trips", "mean duration (min)": "duration_min_mean",
                                 "mean fare (USD)": "fare_usd_mean", "revenue (USD, total amount)": "total_usd"}
"""Choropleth measure (radio label) -> column of ``zone_summary``."""
REVENUE_MEASURES: dict[str, str] = {"mean fare (USD)": "fare", "revenue (USD, total amount)": "total"}
"""The choropleth measures that need a revenue field: offered only where some trip recorded it."""
LOG_SCALED: tuple[str, ...] = ("trips", "total_usd")
"""Counts and sums are skewed (Midtown against Staten Island): coloured on a log scale; means linearly."""
REVENUE_LABELS: dict[str, tuple[str, str]] = {"fare": ("Fares", "Mean fare"), "tip": ("Tips", "Mean tip"),
                                              "total": ("Total amounts", "Mean total amount")}
"""Revenue field (``views.REVENUE``) -> the labels of its sum and its mean on the pages."""
NO_DATA_COLOR: tuple[int, int, int, int] = (190, 190, 190, 70)


def borough_choices() -> list[str]:
    """The boroughs the filter offers: the five, EWR (Newark airport), then "no zone" (trips outside
    every zone or with an unknown one: counted, but with no polygon on the map)."""
    return list(zones.BOROUGHS[1:]) + [zones.BOROUGHS[0]]


def zone_summary(view: pd.DataFrame, table: pd.DataFrame, boroughs: Sequence[str],
                 parts: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Per pickup zone of the chosen ``boroughs``: a ``zone_daily`` view (cut to the dates wanted)
    rolled up over its dates, with means (``views.finalise``), the zone's name and borough.

    Indexed by zone id: every zone of the chosen boroughs of ``table`` (``zones.zone_table()``), 0 trips
    where none was picked up, and zone 0 ("no zone") when chosen and it has trips. ``parts`` ({layer:
    its zone_daily}) adds ``<layer>_trips``, each part's share (the Lambda page's batch and speed).
    """
    rolled = describe(view, ["pickup_zone"]).set_index("pickup_zone")
    known = table[["zone", "borough"]]
    no_zone = pd.DataFrame({"zone": [zones.BOROUGHS[0]], "borough": [zones.BOROUGHS[0]]},
                           index=[zones.NO_ZONE])
    if zones.NO_ZONE in rolled.index:
        known = pd.concat([no_zone, known])
    out = known[known["borough"].isin(list(boroughs))].join(rolled, how="left")
    for column in views.AGGREGATES:
        if not (column.endswith("_min") or column.endswith("_max")):
            out[column] = out[column].fillna(0).astype(np.int64)
    out["duration_min_mean"] = out["duration_s_mean"] / 60
    for layer, part in (parts or {}).items():
        counts = rollup(part, ["pickup_zone"]).set_index("pickup_zone")["trips"]
        out[f"{layer}_trips"] = counts.reindex(out.index).fillna(0).astype(np.int64)
    out.index.name = "location_id"
    return out


def zone_measures(summary: pd.DataFrame) -> list[str]:
    """The choropleth measures ``summary`` can colour by: trips and mean duration always, and each
    revenue measure when some trip in it recorded the field (a Kaggle trip records none)."""
    return [label for label in ZONE_MEASURES
            if label not in REVENUE_MEASURES or summary[f"{REVENUE_MEASURES[label]}_trips"].sum() > 0]


def fill_colors(values: pd.Series, log: bool) -> list[list[int]]:
    """RGBA per value, pale yellow (smallest) to dark red (largest); ``NO_DATA_COLOR`` for a missing
    value or, on a log scale, a zero."""
    numbers = values.astype(float)
    numbers = numbers.where(numbers > 0) if log else numbers
    scaled = np.log1p(numbers) if log else numbers
    low, high = scaled.min(), scaled.max()
    span = high - low if pd.notna(high) and high > low else 1.0
    colors = []
    for value in scaled:
        if pd.isna(value):
            colors.append(list(NO_DATA_COLOR))
            continue
        level = (value - low) / span
        colors.append([int(255 - 75 * level), int(230 * (1 - level)) + 10, int(140 * (1 - level)), 190])
    return colors


def _money(value: float) -> str:
    return "not recorded" if pd.isna(value) else f"${value:,.2f}"


def choropleth(polygons: Mapping[str, Any], summary: pd.DataFrame, measure: str) -> dict[str, Any]:
    """The zone polygons (a GeoJSON FeatureCollection with ``properties.location_id``) of the zones in
    ``summary``, each with its fill colour by ``measure`` (a ``ZONE_MEASURES`` label) and the tooltip's
    fields as text: zone, borough, trips, mean duration, mean fare and total revenue, and, when
    ``summary`` has ``<layer>_trips`` columns, the trips of each layer (``layers``)."""
    column = ZONE_MEASURES[measure]
    colors = dict(zip(summary.index, fill_colors(summary[column], column in LOG_SCALED)))
    layers = [column[:-len("_trips")] for column in summary.columns
              if column.endswith("_trips") and column[:-len("_trips")] in LAYERS]
    features = []
    for feature in polygons["features"]:
        zone = feature["properties"]["location_id"]
        if zone not in colors:
            continue
        row = summary.loc[zone]
        duration = row["duration_min_mean"]
        revenue = row["total_usd"] if row["total_trips"] else np.nan
        properties = {
            "location_id": int(zone), "zone": row["zone"], "borough": row["borough"],
            "trips": f"{int(row['trips']):,}",
            "duration": "–" if pd.isna(duration) else f"{duration:.1f} min",
            "fare": _money(row["fare_usd_mean"]), "revenue": _money(revenue),
            "layers": ", ".join(f"{layer} {int(row[f'{layer}_trips']):,}" for layer in layers),
            "fill_color": colors[zone]}
        features.append({"type": "Feature", "geometry": feature["geometry"], "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def borough_flows(view: pd.DataFrame, boroughs: Sequence[str],
                  parts: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Trips from each pickup borough to each dropoff borough: a ``borough_flows`` view (cut to the
    dates wanted) rolled up over its dates, keeping the pickups in the chosen ``boroughs`` (as the
    zone map does), largest flow first, with its share of them, mean duration and revenue. ``parts``
    ({layer: its borough_flows}) adds ``<layer> trips``, each part's share."""
    keys = ["pickup_borough", "dropoff_borough"]
    rolled = describe(view, keys)
    out = pd.DataFrame({"from": [zones.BOROUGHS[code] for code in rolled["pickup_borough"]],
                        "to": [zones.BOROUGHS[code] for code in rolled["dropoff_borough"]],
                        "trips": rolled["trips"].to_numpy(dtype=np.int64)})
    for layer, part in (parts or {}).items():
        counts = rollup(part, keys).set_index(keys)["trips"]
        out[f"{layer} trips"] = counts.reindex(pd.MultiIndex.from_frame(rolled[keys])).fillna(0).to_numpy(np.int64)
    out["mean duration (min)"] = (rolled["duration_s_mean"] / 60).to_numpy()
    out["mean fare (USD)"] = rolled["fare_usd_mean"].to_numpy()
    out["total amount (USD)"] = np.where(rolled["total_trips"] > 0, rolled["total_usd"], np.nan)
    out = out[out["from"].isin(list(boroughs)) & (out["trips"] > 0)].copy()
    out.insert(3, "share %", 100 * out["trips"] / max(int(out["trips"].sum()), 1))
    return out.sort_values(["trips", "from", "to"], ascending=[False, True, True], ignore_index=True)


def revenue(view: pd.DataFrame) -> pd.DataFrame:
    """Fare, tip and total amount over a whole view: trips that recorded each, their sum and mean (USD;
    both NaN where no trip recorded it), and all its trips, so a page can say how many recorded none."""
    row = describe(view, []).iloc[0]
    return pd.DataFrame({"field": list(views.REVENUE), "source column": list(views.REVENUE.values()),
                         "trips": int(row["trips"]),
                         "recorded by": [int(row[f"{name}_trips"]) for name in views.REVENUE],
                         "sum USD": [float(row[f"{name}_usd"]) if row[f"{name}_trips"] else np.nan
                                     for name in views.REVENUE],
                         "mean USD": [float(row[f"{name}_usd_mean"]) for name in views.REVENUE]})
