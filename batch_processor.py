"""The batch layer: immutable Avro master data in, versioned Parquet batch views out.

In the Lambda architecture the batch layer owns the truth. It appends raw
trips to the *master dataset* — Avro files that are never edited — and
periodically recomputes every *batch view* from all of it, so a bug fixed or a
cleaning rule changed is corrected everywhere by the next run. Each run
publishes a complete new version atomically; the dashboard adds the speed
layer's recent trips on top of it.

Commands::

    python batch_processor.py                    # run: import the history (once) + recompute + publish
    python batch_processor.py import FILE ...    # append CSV/Parquet history (Kaggle or TLC) to master data
    python batch_processor.py ingest             # drain new Kafka events into master data
    python batch_processor.py recompute          # recompute, publish, prune the speed view
    python batch_processor.py run --from-stream  # import (once) + ingest + recompute
    python batch_processor.py status             # what master data and views hold

The layer's steps, in the order of this file:

1. **Import the history** (``import_csv``): a trip file -> master data: the
   Kaggle CSV, or TLC trip records in any of their layouts (CSV or Parquet;
   ``periscope.sources`` recognises the layout, refuses a bad file with one
   line, and nothing is written then). History and
   stream meet at a cutoff (``--cutoff``, default ``config.CUTOFF``,
   2016-06-01): an import takes the trips picked up before it;
   ``kafka_producer.py`` replays those from it on. Each trip is placed in its
   taxi zones (``place_in_zones``: as recorded, else from its coordinates), so
   every trip in master data has both zones. An import is identified by
   the file's content and the cutoff (``master/csv/<first 24 hex digits of
   its SHA-256>[-before-<cutoff>]/``): importing it twice adds nothing.
2. **Ingest the stream** (``ingest_stream``): Kafka -> master data, a file per
   partition and offset range, each trip placed in its zones as on import;
   the offsets are committed after the files.
3. **Recompute** (``compute_views``): read master -> drop duplicates -> clean
   -> aggregate per file (the map) -> merge (the reduce). **Facts are
   identifiable**: master data may hold a trip twice (a file imported and
   also replayed, a producer restarted after a crash); nothing is rewritten,
   and the recompute counts each trip id once: its first copy in *source
   order* (CSV imports in import order, then stream files by partition and
   offset, rows in file order), in both engines (``--engine spark``).
4. **Publish the version** (``publish``): ``data/views/vNNNNNN/`` with the
   views (``periscope.views``: counts, sums, min and max per key, which add
   up exactly with the speed layer's), the trip index and the manifest; then
   the switch of ``data/views/current.json``, the pruning of old versions and
   of the speed view at or below the new watermark.

Machinery lives in ``periscope/``: atomic files, locks and the layout in
``storage``, decoding in ``master_reader``, the exact duplicate test in
``dedupe``, Kafka in ``drain``, flags and printed lines in ``batch_cli``, and
the hot-path tuning, with what each choice buys, in ``batch_tuning``.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from periscope import dedupe, drain, speed_view, storage, views
from periscope.batch_cli import (ENGINES, ImportResult, IngestResult, explained_errors, parse_args,
                                 print_import, print_ingest, print_manifest, print_status, with_progress)
from periscope.batch_tuning import DECODER, PART_ROWS, map_master_files
from periscope.master_reader import read_files, record_columns
from periscope.schema import count_rules, first_broken_rule, format_time
from periscope.sources import LoadReport, iter_trip_chunks
from periscope.storage import BatchVersion, InputFile, locked
from periscope.zones import assign_zones, assign_zones_to_records

# --- 1. import the history: CSV -> master data, the trips picked up before the cutoff --------


@dataclass
class Cutoff:
    """Where the history ends: trips picked up before ``at_ms`` are history, the others the stream's."""

    at_ms: int | None
    left_for_stream: int = 0

    def history(self, chunks: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """The trips of ``chunks`` picked up before the cutoff, in file order; the others counted."""
        for chunk in chunks:
            if self.at_ms is not None:
                before = chunk["pickup_datetime"].to_numpy() < self.at_ms
                self.left_for_stream += int((~before).sum())
                chunk = chunk[before]
            yield chunk


def place_in_zones(chunks: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Every trip with both taxi zones: those its source recorded, else the zones holding its
    coordinates (``zones.assign_zones``, 0 outside every zone)."""
    for chunk in chunks:
        yield assign_zones(chunk)


def import_csv(path: Path, master_dir: Path, part_rows: int = PART_ROWS,
               cutoff_ms: int | None = None) -> ImportResult:
    """Append a trip file to the master dataset, unless this import is already there.

    Any layout ``periscope.sources`` reads: the Kaggle CSV, or a TLC trip
    file (CSV, gzip or Parquet, every yellow and green layout since 2009),
    whose trips have ids derived from their content (``periscope.tlc``).

    With ``cutoff_ms`` only the trips picked up before it are imported (the
    history; the producer replays the others). Well-formed rows are stored as
    they are, outliers included (the cleaning rules apply when views are
    computed); malformed rows are counted in the import report. The parts
    appear all at once, with ``import.json``: the import's place in source
    order (``import_seq``), its cutoff and the loader's report.
    """
    path = Path(path)
    digest = storage.file_sha256(path)
    target = storage.csv_import_dir(master_dir, digest, cutoff_ms)
    if target.exists():  # the same content with the same cutoff
        return already_imported(path, target)
    with locked(master_dir):  # one writer of master data at a time, so imports are numbered in order
        if target.exists():
            return already_imported(path, target)
        import_seq = len(storage.csv_imports(master_dir)) + 1
        cutoff = "none" if cutoff_ms is None else format_time(cutoff_ms)
        split, report, rows = Cutoff(cutoff_ms), LoadReport(source=str(path)), 0
        with storage.staged_directory(target) as staging:  # every part appears at once, or none does
            history = split.history(iter_trip_chunks(path, report, chunk_rows=part_rows, tlc_layouts=True))
            for part, trips in enumerate(storage.in_parts(place_in_zones(history), part_rows)):
                header = {"kind": "csv", "source": path.name, "source_sha256": digest, "cutoff": cutoff,
                          "part": part, "rows": len(trips)}
                part_file = staging / f"part-{part:05d}.avro"
                storage.write_avro(part_file, storage.frame_to_records(trips), header)
                rows += len(trips)
            summary = {"source": str(path), "sha256": digest, "import_seq": import_seq,
                       "cutoff": None if cutoff_ms is None else cutoff, "cutoff_ms": cutoff_ms,
                       "rows": rows, "left_for_stream": split.left_for_stream,
                       "load_report": report.as_dict(),
                       "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (staging / storage.IMPORT_SUMMARY).write_text(json.dumps(summary, indent=2))
    return ImportResult(path, target, True, rows, report.as_dict(), cutoff_ms, split.left_for_stream)


def already_imported(path: Path, target: Path) -> ImportResult:
    summary = storage.read_json(target / storage.IMPORT_SUMMARY)
    return ImportResult(path, target, False, int(summary["rows"]), {}, summary.get("cutoff_ms"),
                        int(summary.get("left_for_stream", 0)))


# --- 2. ingest the stream: Kafka -> master data ---------------------------------------------


def write_stream_file(master_dir: Path, topic: str, partition: int, batch: list[drain.Event]) -> Path:
    """One durable master file for consecutive offsets of a partition, named by its offset range.

    Malformed events cannot be stored as trips; they are counted in the file
    header (the speed layer sends them to the dead-letter topic), and the
    offset range still covers them, so the watermark moves past them. Each trip is placed in its
    zones, as on import; Kaggle and TLC trips in one file are written with the TLC schema.
    """
    first, last = batch[0][0], batch[-1][0]
    records = assign_zones_to_records([record for _, record, _ in batch if record is not None])
    reasons = Counter(reason.split(":")[0] for _, _, reason in batch if reason)
    header = {"kind": "stream", "topic": topic, "kafka_partition": partition,
              "kafka_first_offset": first, "kafka_last_offset": last, "rows": len(records),
              "malformed": json.dumps(dict(reasons))}
    path = storage.stream_file(master_dir, topic, partition, first, last)
    schema = storage.master_schema({name for record in records for name in record})
    storage.write_avro_atomic(path, map(storage.record_to_avro, records), header, schema)
    return path


def resume_offset(committed: int | None, beginning: int, last_in_master: int | None) -> int:
    """Where a partition's drain starts: past its last event in master data (the files are the
    durable record), or at the group's committed offset, or at its first event: the furthest."""
    return max(beginning, committed or 0, -1 if last_in_master is None else last_in_master + 1)


def ingest_stream(bootstrap: str, topic: str, group: str, master_dir: Path,
                  file_rows: int = PART_ROWS, wait_s: float = 60.0) -> IngestResult:
    """Drain every event published so far into master files, then commit the group's offsets.

    It reads up to the end offsets seen at the start, so it finishes even while
    the producer keeps going. At least once from Kafka, once into master data:
    a crash before the commit makes the next drain read the events again, and
    ``resume_offset`` skips those already in master files.
    """
    result = IngestResult()
    purpose = f"ingest {topic} into master data"
    with drain.drain_consumer(bootstrap, group, purpose, wait_s) as consumer, locked(master_dir):
        partitions = drain.assign_all(consumer, topic, bootstrap)
        end, beginning = consumer.end_offsets(partitions), consumer.beginning_offsets(partitions)
        in_master = storage.last_stream_offsets(master_dir, topic)
        for tp in partitions:
            start = resume_offset(consumer.committed(tp), beginning[tp], in_master.get(tp.partition))
            consumer.seek(tp, start)

        pending: dict[int, list[drain.Event]] = {tp.partition: [] for tp in partitions}
        for message in drain.messages_until(consumer, end):
            partition, batch = message.partition, pending[message.partition]
            batch.append(drain.as_event(message, result.malformed))
            if len(batch) >= file_rows:
                result.add(write_stream_file(master_dir, topic, partition, batch), partition, batch)
                batch.clear()
        for partition, batch in pending.items():
            if batch:
                result.add(write_stream_file(master_dir, topic, partition, batch), partition, batch)

        # Every event below `end` is in a durable master file now: only now does the group move past
        # them. A crash before this line loses nothing; the next drain resumes after the files.
        drain.commit(consumer, end)
    return result


# --- 3. recompute: read master -> drop duplicates -> clean -> aggregate per file -> merge -----


def read_master(files: list[Path], decoder: str = DECODER, progress: bool = True) -> list[pl.DataFrame]:
    """Every master file as a frame of trips, in source order (decoded by ``master_reader``)."""
    return with_progress(read_files(files, decoder), enabled=progress and len(files) > 1, at_end=True,
                         line=lambda read: f"  read {len(read)}/{len(files)} master files, "
                                           f"{sum(map(len, read)):,} trips")


def drop_duplicates(master: list[pl.DataFrame]) -> tuple[list[np.ndarray], pl.Series]:
    """Which rows count: the first copy of each trip id in source order; later copies are left out.

    Returns, per file, the mask of its first copies, and every distinct trip id
    (sorted: the version's trip index, which the serving layer needs).
    Exact: the ids themselves are compared (``periscope.dedupe``).
    """
    return dedupe.drop_duplicates([trips["id"] for trips in master])


def clean(trips: pl.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The trips that pass the cleaning rules, and how many each rule removed (first broken rule)."""
    columns = record_columns(trips)
    broken = first_broken_rule(columns)
    keep = broken < 0
    return {name: values[keep] for name, values in columns.items()}, count_rules(broken)


@dataclass
class FileSummary:
    """One master file reduced to mergeable views and counts: the map's output."""

    path: Path
    header: dict[str, str]
    rows: int
    duplicates: int
    clean_rows: int
    broken_rules: dict[str, int]
    views: dict[str, pd.DataFrame]


def aggregate_file(path: Path, trips: pl.DataFrame, first: np.ndarray) -> FileSummary:
    """The map, for one master file: its first copies through the cleaning rules, into every view."""
    distinct = trips.filter(pl.Series(first))
    clean_trips, broken = clean(distinct)
    return FileSummary(path, storage.avro_metadata(path), len(trips), len(trips) - len(distinct),
                       len(clean_trips["trip_duration"]), broken, views.aggregate(clean_trips))


def compute_views(master_dir: Path, workers: int, progress: bool = True, engine: str = "python",
                  decoder: str = DECODER) -> BatchVersion:
    """Every batch view from the whole master dataset, its manifest and its trip index.

    Nothing is published: ``publish`` does that, so a caller (the Airflow DAG)
    can check the result first. ``engine="spark"`` computes the same views,
    with the same duplicates removed, with Spark SQL (``periscope.spark_batch``),
    which writes the views and the trip index as files (``BatchVersion.written``)
    that ``publish`` links into the version.
    """
    if engine == "spark":
        from periscope import spark_batch  # pyspark is heavy; only this engine needs it
        return spark_batch.compute_views(master_dir, progress=progress)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    files = storage.master_files(master_dir)
    if progress:
        print(f"recomputing batch views from {len(files)} master files, {workers} file(s) at a time",
              flush=True)
    started = time.perf_counter()

    master = read_master(files, decoder, progress)
    read_done = time.perf_counter()

    first, trip_ids = drop_duplicates(master)
    if progress and files:
        copies = sum(map(len, master)) - len(trip_ids)
        print(f"  {len(trip_ids):,} distinct trips; {copies:,} later copies of a trip left out",
              flush=True)
    dedupe_done = time.perf_counter()

    # The map: `workers` files at a time, on threads (periscope.batch_tuning says why).
    summaries = with_progress(map_master_files(aggregate_file, files, master, first, workers),
                              enabled=progress and len(files) > 1,
                              line=lambda done: f"  cleaned and aggregated {len(done)}/{len(files)} "
                                                f"master files")
    map_done = time.perf_counter()

    batch_views = views.merge(*(s.views for s in summaries))  # the reduce
    merge_done = time.perf_counter()

    manifest = storage.views_manifest(
        engine="python",
        inputs=[InputFile(str(s.path.relative_to(master_dir)), s.header, s.rows, s.duplicates)
                for s in summaries],
        clean=sum(s.clean_rows for s in summaries),
        broken_rules=sum((Counter(s.broken_rules) for s in summaries), Counter()),
        views=batch_views,
        timings_s={"read": read_done - started, "drop_duplicates": dedupe_done - read_done,
                   "clean_and_aggregate": map_done - dedupe_done, "merge": merge_done - map_done},
    )
    return BatchVersion(batch_views, manifest, trip_ids)


# --- 4. publish the version -----------------------------------------------------------------


def publish(views_dir: Path, version: BatchVersion, keep: int, speed_dir: Path | None = None) -> dict:
    """Publish computed views as the new version; readers see the previous version or this one, whole.

    Returns the manifest as published, with its ``version`` name (and
    ``speed_files_pruned`` when ``speed_dir`` is given).
    """
    with locked(views_dir):  # one publisher at a time, so two versions never get the same name
        name = storage.next_version(views_dir)
        with storage.staged_directory(views_dir / name) as staging:  # renamed to `name` when complete
            started = time.perf_counter()
            if version.written is not None:  # the Spark engine wrote its files already
                storage.link_version_files(version.written, staging)
            else:
                storage.write_views(staging, version.views)
                storage.write_trip_index(staging, version.trip_ids)
            write_s = round(time.perf_counter() - started, 3)
            timings = {**version.manifest.get("timings_s", {}), "write": write_s}
            manifest = {**version.manifest, "version": name, "timings_s": timings}
            storage.write_manifest(staging, manifest)
        storage.switch_current(views_dir, name)  # the moment readers move to the new version
        storage.prune_versions(views_dir, keep)
    if speed_dir is not None:  # speed rows at or below the watermark are in the batch views now
        manifest["speed_files_pruned"] = speed_view.prune(speed_dir, manifest["watermark"])
    return manifest


def recompute(master_dir: Path, views_dir: Path, workers: int, keep: int, progress: bool = True,
              speed_dir: Path | None = None, engine: str = "python", decoder: str = DECODER) -> dict:
    """Recompute every view from the whole master dataset and publish it as a new version."""
    version = compute_views(master_dir, workers, progress, engine, decoder)
    try:
        return publish(views_dir, version, keep, speed_dir)
    finally:
        storage.discard_written(version)


# --- the command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one command (``run`` when none is given); bad input ends it with one line and status 2."""
    args = parse_args(argv)
    try:
        if args.command == "status":
            print_status(args.master_dir, args.views_dir)
            return 0
        if args.command == "sql":  # the master data and the current version as SQL tables
            from periscope import sql_catalog  # pyspark, imported for this command only

            sources = sql_catalog.Sources(args.master_dir, args.views_dir, args.speed_dir)
            with sql_catalog.open_catalog(sources, args.master) as catalog:
                if args.execute:
                    sql_catalog.run_statements(catalog, args.execute)
                else:
                    sql_catalog.prompt(catalog)
            return 0
        # History: CSV files into master data, the trips before the cutoff (once per file and cutoff)
        for path in args.files:
            print_import(import_csv(path, args.master_dir, args.part_rows, args.cutoff))
        # Stream: every event published so far into master data, then the offsets committed
        if args.command == "ingest" or args.from_stream:
            ingested = ingest_stream(args.bootstrap, args.topic, args.group, args.master_dir,
                                     args.file_rows, args.wait)
            print_ingest(ingested, args.topic)
        # Recompute every view from all master data, publish them, prune the speed view below them
        if args.command in ("run", "recompute"):
            print_manifest(recompute(args.master_dir, args.views_dir, args.workers, args.keep,
                                     speed_dir=args.speed_dir, engine=args.engine, decoder=args.decoder))
    except explained_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
