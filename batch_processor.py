"""The batch layer: immutable Avro master data in, versioned Parquet batch views out.

In the Lambda architecture the batch layer owns the truth. It appends raw
trips to the *master dataset* — Avro files that are never edited — and
periodically recomputes every *batch view* from all of it, so a bug fixed or a
cleaning rule changed is corrected everywhere by the next run. Each run
publishes a complete new version atomically; the dashboard adds the speed
layer's recent trips on top of it.

Commands::

    python batch_processor.py                    # import the history (once) + recompute + publish
    python batch_processor.py import FILE ...    # append CSV history to master data
    python batch_processor.py ingest             # drain new Kafka events into master data
    python batch_processor.py recompute          # recompute, publish, prune the speed view
    python batch_processor.py run --from-stream  # import (once) + ingest + recompute
    python batch_processor.py status             # what master data and views hold

**History and stream meet at a cutoff** (``--cutoff``, default
``config.CUTOFF``, 2016-06-01): an import takes the trips picked up before it;
``kafka_producer.py`` replays those from it on. **Facts are identifiable**: the
trip id is a trip's identity, and master data may hold a trip twice (a file
imported and also replayed, a producer restarted after a crash). Nothing is
rewritten to remove a copy; the recompute counts each trip once: the first
copy in *source order* (CSV imports in import order, then stream files by
partition and offset, rows in file order), the same rule in both engines.

Importing is idempotent: an import is identified by the file's SHA-256 and the
cutoff, so importing the same file with the same cutoff twice adds nothing. A
recompute reads every master file (``periscope.master_reader``: polars),
drops later copies of a trip, applies the cleaning rules and aggregates each
file into small mergeable views (``periscope.views``; ``--workers`` files at a
time), merges them and publishes ``data/views/vNNNNNN/`` with a manifest and the
version's trip index, then switches ``data/views/current.json`` to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from periscope import config, dedupe, speed_view, views
from periscope.master_reader import DECODERS, UnreadableMasterFile, read_files, record_columns
from periscope.schema import count_rules, first_broken_rule, format_time, parse_cutoff
from periscope.sources import CsvLayoutError, LoadReport, iter_trip_chunks
from periscope.storage import (
    IMPORT_SUMMARY,
    BatchVersion,
    avro_metadata,
    csv_imports,
    current_version,
    file_sha256,
    frame_to_records,
    locked,
    master_files,
    publish_dir,
    read_json,
    read_version,
    views_manifest,
    write_avro,
    write_avro_atomic,
    write_version,
)

PART_ROWS = 250_000
KEEP_VERSIONS = 5


# --- import: CSV history -> master data ------------------------------------------------


@dataclass
class ImportResult:
    source: Path
    target: Path
    added: bool
    rows: int
    report: dict
    cutoff_ms: int | None = None
    left_for_stream: int = 0


def import_name(digest: str, cutoff_ms: int | None) -> str:
    """An import's identity: the file's content, and where its history ends.

    ``<sha256[:24]>`` for the whole file, ``<sha256[:24]>-before-20160601T000000``
    for the trips picked up before a cutoff: a different import of the same file.
    """
    if cutoff_ms is None:
        return digest[:24]
    return f"{digest[:24]}-before-{format_time(cutoff_ms).replace('-', '').replace(':', '').replace(' ', 'T')}"


@dataclass
class Cutoff:
    """Splits trips at a pickup time: before it is history, from it on the stream's (counted, not imported)."""

    at_ms: int | None
    left_for_stream: int = 0

    def history(self, chunks: Iterable[pd.DataFrame], part_rows: int) -> Iterator[pd.DataFrame]:
        """The trips picked up before the cutoff, in file order, as parts of ``part_rows`` trips."""
        pending: list[pd.DataFrame] = []
        held = 0
        for chunk in chunks:
            if self.at_ms is not None:
                before = chunk["pickup_datetime"].to_numpy() < self.at_ms
                self.left_for_stream += int((~before).sum())
                chunk = chunk[before]
            pending.append(chunk)
            held += len(chunk)
            while held >= part_rows:
                rows = pd.concat(pending, ignore_index=True)
                yield rows.iloc[:part_rows]
                pending, held = [rows.iloc[part_rows:]], len(rows) - part_rows
        if held:
            yield pd.concat(pending, ignore_index=True)


def import_csv(path: Path, master_dir: Path, part_rows: int = PART_ROWS,
               cutoff_ms: int | None = None) -> ImportResult:
    """Append a Kaggle CSV to the master dataset, unless this import is already there.

    With ``cutoff_ms`` only the trips picked up before it are imported (the
    history; the producer replays the others). Well-formed rows are stored as
    they are, outliers included (the cleaning rules apply when views are
    computed); malformed rows are counted in the import report. The files
    appear all at once, under ``csv/<import_name>/``; ``import.json`` records
    the import's place in source order (``import_seq``) and its cutoff.
    """
    path = Path(path)
    digest = file_sha256(path)
    target = master_dir / "csv" / import_name(digest, cutoff_ms)
    if target.exists():
        return already_imported(path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(master_dir):
        if target.exists():
            return already_imported(path, target)
        import_seq = len(csv_imports(master_dir)) + 1
        cutoff = "none" if cutoff_ms is None else format_time(cutoff_ms)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            report, split = LoadReport(source=str(path)), Cutoff(cutoff_ms)
            rows = 0
            for part, trips in enumerate(split.history(iter_trip_chunks(path, report, chunk_rows=part_rows),
                                                       part_rows)):
                metadata = {"kind": "csv", "source": path.name, "source_sha256": digest, "cutoff": cutoff,
                            "part": part, "rows": len(trips)}
                write_avro(staging / f"part-{part:05d}.avro", frame_to_records(trips), metadata)
                rows += len(trips)
            summary = {"source": str(path), "sha256": digest, "import_seq": import_seq,
                       "cutoff": None if cutoff_ms is None else cutoff, "cutoff_ms": cutoff_ms, "rows": rows,
                       "left_for_stream": split.left_for_stream, "load_report": report.as_dict(),
                       "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (staging / IMPORT_SUMMARY).write_text(json.dumps(summary, indent=2))
            publish_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ImportResult(path, target, True, rows, report.as_dict(), cutoff_ms, split.left_for_stream)


def already_imported(path: Path, target: Path) -> ImportResult:
    summary = read_json(target / IMPORT_SUMMARY)
    return ImportResult(path, target, False, int(summary["rows"]), {}, summary.get("cutoff_ms"),
                        int(summary.get("left_for_stream", 0)))


# --- ingest: Kafka stream -> master data -----------------------------------------------


@dataclass
class IngestResult:
    files: list[Path] = field(default_factory=list)
    rows: int = 0
    malformed: Counter = field(default_factory=Counter)
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)


def stream_file(master_dir: Path, topic: str, partition: int, first: int, last: int) -> Path:
    """Where the events of one partition's offset range live: the name is the range."""
    return master_dir / "stream" / topic / f"p{partition:03d}" / f"{first:020d}-{last:020d}.avro"


def master_stream_offsets(master_dir: Path, topic: str) -> dict[int, int]:
    """Highest offset already in master data, per partition (read from file names)."""
    offsets: dict[int, int] = {}
    for path in (master_dir / "stream" / topic).glob("p[0-9][0-9][0-9]/*.avro"):
        if not path.name.startswith("."):
            last = int(path.stem.split("-")[1])
            partition = int(path.parent.name[1:])
            offsets[partition] = max(last, offsets.get(partition, -1))
    return offsets


def write_stream_file(master_dir: Path, topic: str, partition: int,
                      batch: list[tuple[int, dict | None, str | None]]) -> Path:
    """One durable master file for consecutive offsets of a partition.

    ``batch`` holds ``(offset, record or None, malformed reason or None)``.
    Malformed events cannot be stored as trips; they are counted in the file
    header (the speed layer sends them to the dead-letter topic), and the
    offset range still covers them, so the watermark moves past them.
    """
    first, last = batch[0][0], batch[-1][0]
    records = [record for _, record, _ in batch if record is not None]
    reasons = Counter(reason.split(":")[0] for _, _, reason in batch if reason)
    metadata = {"kind": "stream", "topic": topic, "kafka_partition": partition, "kafka_first_offset": first,
                "kafka_last_offset": last, "rows": len(records), "malformed": json.dumps(dict(reasons))}
    path = stream_file(master_dir, topic, partition, first, last)
    write_avro_atomic(path, iter(records), metadata)
    return path


def ingest_stream(bootstrap: str, topic: str, group: str, master_dir: Path,
                  file_rows: int = PART_ROWS, wait_s: float = 60.0) -> IngestResult:
    """Drain every event published so far into master files, then commit the group's offsets.

    Runs up to the end offsets seen at the start, so it finishes even while
    the producer keeps going. Each partition resumes after the highest offset
    already in master data (or the committed offset, if further): the files are
    the durable record, so a crash after writing but before committing adds
    nothing twice on the next run.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from periscope.schema import InvalidTrip, parse_json
    from periscope.stream import wait_for_broker

    wait_for_broker(bootstrap, f"ingest {topic} into master data", timeout_s=wait_s)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=5000)
    result = IngestResult()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise FileNotFoundError(f"topic {topic!r} does not exist at {bootstrap}: "
                                    "create it with `python -m periscope.kafka_local create-topics`")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        end = consumer.end_offsets(tps)
        done_in_master = master_stream_offsets(master_dir, topic)
        begin = consumer.beginning_offsets(tps)
        for tp in tps:
            committed = consumer.committed(tp)
            start = max(committed if committed is not None else begin[tp], done_in_master.get(tp.partition, -1) + 1)
            consumer.seek(tp, start)
        pending: dict[int, list] = {tp.partition: [] for tp in tps}
        with locked(master_dir):
            while any(consumer.position(tp) < end[tp] for tp in tps):
                for tp, messages in consumer.poll(timeout_ms=1000).items():
                    for message in messages:
                        if message.offset >= end[tp]:
                            continue
                        try:
                            pending[tp.partition].append((message.offset, parse_json(message.value), None))
                        except InvalidTrip as error:
                            pending[tp.partition].append((message.offset, None, str(error)))
                            result.malformed[error.reason] += 1
                        if len(pending[tp.partition]) >= file_rows:
                            result.files.append(write_stream_file(master_dir, topic, tp.partition, pending[tp.partition]))
                            pending[tp.partition] = []
            for partition, batch in pending.items():
                if batch:
                    result.files.append(write_stream_file(master_dir, topic, partition, batch))
            written = master_stream_offsets(master_dir, topic)
            commits = {tp: OffsetAndMetadata(written[tp.partition] + 1, "", -1) for tp in tps if tp.partition in written}
            if commits:
                consumer.commit(commits)
        for path in result.files:
            meta = avro_metadata(path)
            result.rows += int(meta["rows"])
            partition, first, last = int(meta["kafka_partition"]), int(meta["kafka_first_offset"]), int(meta["kafka_last_offset"])
            low, high = result.offsets.get(partition, (first, last))
            result.offsets[partition] = (min(low, first), max(high, last))
    finally:
        consumer.close()
    return result


# --- recompute: master data -> batch views ---------------------------------------------
#
#   read master -> drop duplicates -> clean -> aggregate (per file: the map) -> merge (the reduce) -> publish


def read_master(files: list[Path], decoder: str = "polars", progress: bool = True) -> list[pl.DataFrame]:
    """Every master file as a frame of trips, in source order (``periscope.master_reader``)."""
    master: list[pl.DataFrame] = []
    last_print = time.monotonic()
    for trips in read_files(files, decoder):
        master.append(trips)
        now = time.monotonic()
        if progress and len(files) > 1 and (now - last_print >= 1.0 or len(master) == len(files)):
            print(f"  read {len(master)}/{len(files)} master files, {sum(map(len, master)):,} trips", flush=True)
            last_print = now
    return master


def drop_duplicates(master: list[pl.DataFrame]) -> tuple[list[np.ndarray], pl.Series]:
    """Which rows count: the first copy of each trip id in source order; later copies are left out.

    Returns, per file, the mask of its first copies, and every distinct trip id
    (sorted: the version's trip index, which the serving layer needs).
    Exact: the ids themselves are compared (``periscope.dedupe``).
    """
    return dedupe.drop_duplicates([trips["id"] for trips in master])


def clean(trips: pl.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The trips that pass the cleaning rules, and how many each rule removed (its first broken rule)."""
    columns = record_columns(trips)
    broken = first_broken_rule(columns)
    keep = broken < 0
    return {name: values[keep] for name, values in columns.items()}, count_rules(broken)


@dataclass
class FileSummary:
    """One master file reduced to mergeable views and counts (the map's output)."""

    path: Path
    metadata: dict[str, str]
    rows: int = 0
    duplicates: int = 0
    clean_rows: int = 0
    broken_rules: Counter = field(default_factory=Counter)
    views: dict[str, pd.DataFrame] = field(default_factory=dict)


def summarise_file(path: Path, trips: pl.DataFrame, first: np.ndarray) -> FileSummary:
    """The map, for one master file: its first copies through the cleaning rules, then every view."""
    distinct = trips.filter(pl.Series(first))
    clean_trips, broken = clean(distinct)
    return FileSummary(path=path, metadata=avro_metadata(path), rows=len(trips),
                       duplicates=len(trips) - len(distinct), clean_rows=len(clean_trips["trip_duration"]),
                       broken_rules=Counter(broken), views=views.aggregate(clean_trips))


ENGINES = ("python", "spark")


def compute_views(master_dir: Path, workers: int, progress: bool = True, engine: str = "python",
                  decoder: str = "polars") -> BatchVersion:
    """Every batch view from the whole master dataset, its manifest and its trip index.

    Nothing is published: ``publish`` does that, so a caller (the Airflow DAG)
    can check the result first. ``engine="spark"`` computes the same views,
    with the same duplicates removed, with Spark (``periscope.spark_batch``).
    """
    if engine == "spark":
        from periscope import spark_batch  # pyspark is heavy; only this engine needs it
        return spark_batch.compute_views(master_dir, progress=progress)
    if engine != "python":
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    started = time.perf_counter()
    files = master_files(master_dir)
    if progress:
        print(f"recomputing batch views from {len(files)} master files, {workers} file(s) at a time", flush=True)
    master = read_master(files, decoder, progress)
    read_done = time.perf_counter()

    first, trip_ids = drop_duplicates(master)
    if progress and files:
        print(f"  {len(trip_ids):,} distinct trips; {sum(map(len, master)) - len(trip_ids):,} later copies "
              "of a trip left out", flush=True)
    dedupe_done = time.perf_counter()

    summaries: list[FileSummary] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        mapped = pool.map(summarise_file, files, master, first)
        master.clear()  # each file's trips are freed as soon as its views are made
        last_print = time.monotonic()
        for summary in mapped:
            summaries.append(summary)
            if progress and len(files) > 1 and time.monotonic() - last_print >= 1.0:
                print(f"  cleaned and aggregated {len(summaries)}/{len(files)} master files", flush=True)
                last_print = time.monotonic()
    map_done = time.perf_counter()

    batch_views = views.merge(*(s.views for s in summaries))
    merge_done = time.perf_counter()

    rules = Counter()
    for summary in summaries:
        rules.update(summary.broken_rules)
    manifest = views_manifest(
        "python", master_dir, [s.path for s in summaries], [s.metadata for s in summaries],
        [s.rows for s in summaries], [s.duplicates for s in summaries], sum(s.clean_rows for s in summaries),
        rules, batch_views,
        {"read": read_done - started, "drop_duplicates": dedupe_done - read_done,
         "clean_and_aggregate": map_done - dedupe_done, "merge": merge_done - map_done},
    )
    return BatchVersion(batch_views, manifest, trip_ids)


def publish(views_dir: Path, version: BatchVersion, keep: int, speed_dir: Path | None = None) -> dict:
    """Publish computed views and their trip index as a new version; then prune the speed view at
    or below its watermark.

    Those speed trips are in the batch view now. Returns the manifest as
    published (with ``version`` and ``speed_files_pruned``).
    """
    published = write_version(views_dir, version.views, version.manifest, keep, version.trip_ids)
    if speed_dir is not None:
        published["speed_files_pruned"] = speed_view.prune(speed_dir, published["watermark"])
    return published


def recompute(master_dir: Path, views_dir: Path, workers: int, keep: int, progress: bool = True,
              speed_dir: Path | None = None, engine: str = "python", decoder: str = "polars") -> dict:
    """Recompute every view from the whole master dataset and publish a new version."""
    return publish(views_dir, compute_views(master_dir, workers, progress, engine, decoder), keep, speed_dir)


# --- command line ------------------------------------------------------------------------


def print_import(result: ImportResult) -> None:
    if not result.added:
        print(f"{result.source}: already in master data ({result.rows:,} trips in {result.target}); nothing added")
        return
    report = result.report
    history = "" if result.cutoff_ms is None else f" picked up before {format_time(result.cutoff_ms)}"
    print(f"{result.source}: imported {result.rows:,} trips{history} into {result.target} "
          f"({report['rows_malformed']:,} malformed rows rejected)")
    if result.cutoff_ms is not None:
        print(f"  {result.left_for_stream:,} trips picked up from the cutoff on are left for the stream "
              "(`python kafka_producer.py` replays them)")
    for reason, count in report["malformed"].items():
        print(f"  malformed  {reason:<30} {count:>9,}")
    for example in report["examples"]:
        print(f"  e.g. {example}")


def print_manifest(manifest: dict) -> None:
    rows = manifest["rows"]
    print(f"published batch version {manifest['version']}: {rows['master']:,} master trips, "
          f"{rows['distinct']:,} distinct ({rows['duplicates']:,} later copies of a trip left out), "
          f"{rows['clean']:,} pass the cleaning rules, {len(manifest['input_files'])} input files")
    for name, count in manifest["cleaning"].items():
        if count:
            print(f"  rule       {name:<30} {count:>9,} removed")
    print("  views: " + ", ".join(f"{name} ({count:,} rows)" for name, count in rows["views"].items()))
    print(f"  watermark: {manifest['watermark'] or 'none (no stream data yet)'}"
          + (f"; pruned {manifest['speed_files_pruned']} speed files at or below it"
             if manifest.get("speed_files_pruned") else ""))
    timings = manifest["timings_s"]
    print(f"  took {sum(timings.values()):.2f} s ("
          + ", ".join(f"{step.replace('_', ' ')} {seconds:.2f} s" for step, seconds in timings.items()) + ")")


def print_status(master_dir: Path, views_dir: Path) -> None:
    files = master_files(master_dir)
    print(f"master data: {len(files)} files under {master_dir}")
    version = current_version(views_dir)
    if version is None:
        print(f"batch views: none yet in {views_dir} (run `python batch_processor.py recompute`)")
        return
    _, manifest = read_version(views_dir, version)
    rows = manifest["rows"]
    copies = f" ({rows['duplicates']:,} later copies left out)" if "duplicates" in rows else ""
    print(f"batch views: current version {version} in {views_dir}, created {manifest['created_at']}, "
          f"{rows['clean']:,} clean trips of {rows.get('distinct', rows['master']):,} distinct{copies}, "
          f"watermark {manifest['watermark'] or 'none'}")


def print_ingest(result: IngestResult, topic: str) -> None:
    if not result.files:
        print(f"{topic}: no new events since the last ingest")
        return
    ranges = ", ".join(f"p{p} {lo}..{hi}" for p, (lo, hi) in sorted(result.offsets.items()))
    malformed = sum(result.malformed.values())
    print(f"{topic}: ingested {result.rows:,} events into {len(result.files)} master files ({ranges}); "
          f"{malformed:,} malformed events counted, not stored"
          + (f" ({dict(result.malformed)})" if malformed else ""))


def cutoff_value(text: str) -> int | None:
    """``--cutoff``: a pickup time (ms of the New York wall clock) or None for ``none``."""
    try:
        return parse_cutoff(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    def directory_flags(sub: argparse.ArgumentParser, defaults: bool) -> None:
        """The directories work before or after the command (``status --master-dir X``): every parser
        knows them, and only the top one has defaults, so a command never resets what came before it."""
        for flag, default, text in (
                ("--master-dir", config.MASTER_DIR, "Avro master dataset (env PERISCOPE_MASTER_DIR)"),
                ("--views-dir", config.VIEWS_DIR, "published batch views (env PERISCOPE_VIEWS_DIR)"),
                ("--speed-dir", config.SPEED_DIR, "speed view, pruned below the watermark after each publish "
                                                  "(env PERISCOPE_SPEED_DIR)")):
            sub.add_argument(flag, type=Path, default=default if defaults else argparse.SUPPRESS,
                             help=text if defaults else f"{text}; default {default}")

    parser = argparse.ArgumentParser(
        description="Batch layer: CSV history and Kafka events into Avro master data; "
                    "recompute and publish Parquet batch views.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    directory_flags(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="run (the default), import, ingest, recompute or status")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        directory_flags(sub, defaults=False)
        return sub

    def cutoff_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--cutoff", type=cutoff_value, default=config.CUTOFF,
                         help="import only the trips picked up before this time (New York wall clock, e.g. "
                              "2016-06-01 or '2016-06-01 12:00:00') as history: kafka_producer.py replays the "
                              "others; 'none' imports every trip (env PERISCOPE_CUTOFF)")

    def recompute_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="master files cleaned and aggregated at a time (threads)")
        sub.add_argument("--keep", type=int, default=KEEP_VERSIONS, help="published versions to keep")
        sub.add_argument("--engine", choices=ENGINES, default="python",
                         help="python: polars on this machine; spark: Spark on SPARK_MASTER "
                              "(default local[*]), for data that outgrew one machine")
        sub.add_argument("--decoder", choices=DECODERS, default="polars",
                         help="python engine: how master files are decoded; fastavro is the slower reference "
                              "decoder, kept to compare with")

    def stream_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS,
                         help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)")
        sub.add_argument("--topic", default=config.TRIPS_TOPIC, help="topic of trip events")
        sub.add_argument("--group", default=config.BATCH_GROUP, help="the batch layer's consumer group")
        sub.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the broker before failing")
        sub.add_argument("--file-rows", type=int, default=PART_ROWS, help="events per master file at most")

    run = command("run", "import --input once, optionally ingest the stream, then recompute and publish")
    run.add_argument("--input", type=Path, default=config.SAMPLE_CSV, help="CSV history to import first")
    cutoff_flag(run)
    run.add_argument("--from-stream", action="store_true", help="also ingest new Kafka events before recomputing")
    recompute_flags(run)
    stream_flags(run)
    imp = command("import", "append CSV files to the master dataset (a file already imported with the same "
                            "cutoff adds nothing)")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE", help="Kaggle-layout CSV, plain or .gz")
    cutoff_flag(imp)
    imp.add_argument("--part-rows", type=int, default=PART_ROWS, help="trips per master file")
    stream_flags(command("ingest", "drain new Kafka events into master files, then commit offsets"))
    recompute_flags(command("recompute", "recompute all views, publish a new version, prune the speed view"))
    command("status", "show master data and the current batch version")

    args = parser.parse_args(argv)
    if args.command is None:  # no command: `run` with its defaults
        args = parser.parse_args([*argv, "run"])
    for flag, minimum in (("workers", 1), ("keep", 1), ("part_rows", 1000), ("file_rows", 1)):
        value = getattr(args, flag, minimum)
        if value < minimum:
            parser.error(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    if getattr(args, "wait", 0) < 0:
        parser.error(f"--wait must be 0 or more seconds, got {args.wait}")
    return args


def explained_errors() -> tuple[type[Exception], ...]:
    """Errors that end the command with a one-line message and status 2 instead of a traceback.

    Evaluated only when an error happens, so the Kafka client is imported only then.
    """
    from periscope.spark_session import SparkSetupError
    from periscope.stream import BrokerUnavailable

    return FileNotFoundError, CsvLayoutError, UnreadableMasterFile, BrokerUnavailable, SparkSetupError


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "status":
            print_status(args.master_dir, args.views_dir)
            return 0
        for path in [args.input] if args.command == "run" else getattr(args, "files", []):
            print_import(import_csv(path, args.master_dir, getattr(args, "part_rows", PART_ROWS), args.cutoff))
        if args.command == "ingest" or getattr(args, "from_stream", False):
            result = ingest_stream(args.bootstrap, args.topic, args.group, args.master_dir, args.file_rows, args.wait)
            print_ingest(result, args.topic)
        if args.command in ("run", "recompute"):
            manifest = recompute(args.master_dir, args.views_dir, args.workers, args.keep,
                                 speed_dir=args.speed_dir, engine=args.engine, decoder=args.decoder)
            print_manifest(manifest)
    except explained_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
