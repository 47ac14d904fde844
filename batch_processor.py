"""The batch layer: immutable Avro master data in, versioned Parquet batch views out.

In the Lambda architecture the batch layer owns the truth. It appends raw
trips to the *master dataset* — Avro files that are never edited — and
periodically recomputes every *batch view* from all of it, so a bug fixed or a
cleaning rule changed is corrected everywhere by the next run. Each run
publishes a complete new version atomically; the dashboard adds the speed
layer's recent trips on top of it.

Commands::

    python batch_processor.py                    # import the sample (once) + recompute + publish
    python batch_processor.py import FILE ...    # append CSV history to master data
    python batch_processor.py ingest             # drain new Kafka events into master data
    python batch_processor.py recompute          # recompute, publish, prune the speed view
    python batch_processor.py run --from-stream  # import (once) + ingest + recompute
    python batch_processor.py status             # what master data and views hold

Importing is idempotent: a source is identified by its SHA-256, so importing
the same file twice adds nothing. A recompute is a map-reduce over master
files: each worker turns a file into small mergeable views (see
``periscope.views``) chunk by chunk, so memory does not grow with the data;
the parts are merged and written as ``data/views/vNNNNNN/`` with a manifest,
then ``data/views/current.json`` is switched to it.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from periscope import config, speed_view, views
from periscope.schema import RULE_NAMES, first_broken_rule
from periscope.sources import CsvLayoutError, LoadReport, iter_trip_chunks
from periscope.stream import BrokerUnavailable
from periscope.storage import (
    avro_metadata,
    current_version,
    file_sha256,
    frame_to_records,
    iter_avro_columns,
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
READ_CHUNK_ROWS = 100_000
KEEP_VERSIONS = 5


# --- import: CSV history -> master data ------------------------------------------------


@dataclass
class ImportResult:
    source: Path
    target: Path
    added: bool
    rows: int
    report: dict


def import_csv(path: Path, master_dir: Path, part_rows: int = PART_ROWS) -> ImportResult:
    """Append a Kaggle CSV to the master dataset, unless this exact content is already there.

    Well-formed rows are stored as they are, outliers included (the cleaning
    rules apply when views are computed); malformed rows are counted in the
    import report. The files appear all at once, under ``csv/<sha256>/``.
    """
    path = Path(path)
    digest = file_sha256(path)
    target = master_dir / "csv" / digest[:24]
    if target.exists():
        return ImportResult(path, target, False, int(read_json(target / "import.json")["rows"]), {})
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(master_dir):
        if target.exists():
            return ImportResult(path, target, False, int(read_json(target / "import.json")["rows"]), {})
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            report = LoadReport(source=str(path))
            rows = 0
            for part, chunk in enumerate(iter_trip_chunks(path, report, chunk_rows=part_rows)):
                metadata = {"kind": "csv", "source": path.name, "source_sha256": digest, "part": part, "rows": len(chunk)}
                write_avro(staging / f"part-{part:05d}.avro", frame_to_records(chunk), metadata)
                rows += len(chunk)
            summary = {"source": str(path), "sha256": digest, "rows": rows, "load_report": report.as_dict(),
                       "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (staging / "import.json").write_text(json.dumps(summary, indent=2))
            publish_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ImportResult(path, target, True, rows, report.as_dict())


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


@dataclass
class FileSummary:
    """One master file reduced to mergeable views and counts (a worker's output)."""

    path: Path
    metadata: dict[str, str]
    rows: int = 0
    clean_rows: int = 0
    broken_rules: Counter = field(default_factory=Counter)
    views: dict[str, pd.DataFrame] = field(default_factory=dict)


def summarise_file(path: Path, chunk_rows: int = READ_CHUNK_ROWS) -> FileSummary:
    """Read one master file chunk by chunk: apply the cleaning rules, aggregate every view."""
    summary = FileSummary(path=path, metadata=avro_metadata(path))
    parts: list[dict[str, pd.DataFrame]] = []
    gc.disable()  # decoding makes millions of short-lived dicts; cycle collection only slows it down
    try:
        for columns in iter_avro_columns(path, chunk_rows):
            broken = first_broken_rule(columns)
            keep = broken < 0
            summary.rows += len(keep)
            summary.clean_rows += int(keep.sum())
            for index, count in zip(*np.unique(broken[~keep], return_counts=True)):
                summary.broken_rules[RULE_NAMES[index]] += int(count)
            parts.append(views.aggregate({name: values[keep] for name, values in columns.items()}))
    finally:
        gc.enable()
    summary.views = views.merge(*parts)
    return summary


def summarise_all(files: list[Path], workers: int, progress: bool = True) -> list[FileSummary]:
    """Map ``summarise_file`` over master files on ``workers`` processes."""
    if workers <= 1 or len(files) <= 1:
        results = map(summarise_file, files)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(summarise_file, files)
    summaries: list[FileSummary] = []
    last_print = time.monotonic()
    try:
        for summary in results:
            summaries.append(summary)
            now = time.monotonic()
            if progress and (now - last_print >= 1.0 or len(summaries) == len(files)) and len(files) > 1:
                rows = sum(s.rows for s in summaries)
                print(f"  read {len(summaries)}/{len(files)} master files, {rows:,} trips", flush=True)
                last_print = now
    finally:
        if pool is not None:
            pool.shutdown()
    return summaries


ENGINES = ("python", "spark")


def compute_views(master_dir: Path, workers: int, progress: bool = True,
                  engine: str = "python") -> tuple[dict[str, pd.DataFrame], dict]:
    """Every batch view from the whole master dataset, and the manifest describing them.

    Nothing is published: ``publish`` does that, so a caller (the Airflow DAG)
    can check the result first. ``engine="spark"`` computes the same views
    with Spark (``periscope.spark_batch``) for data that outgrew one machine.
    """
    if engine == "spark":
        from periscope import spark_batch  # pyspark is heavy; only this engine needs it
        return spark_batch.compute_views(master_dir, progress=progress)
    if engine != "python":
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    started = time.perf_counter()
    files = master_files(master_dir)
    if progress:
        print(f"recomputing batch views from {len(files)} master files with {workers} worker(s)", flush=True)
    summaries = summarise_all(files, workers, progress)
    read_done = time.perf_counter()
    batch_views = views.merge(*(s.views for s in summaries))
    merge_done = time.perf_counter()
    rules = Counter()
    for summary in summaries:
        rules.update(summary.broken_rules)
    manifest = views_manifest(
        "python", master_dir, [s.path for s in summaries], [s.metadata for s in summaries],
        [s.rows for s in summaries], sum(s.clean_rows for s in summaries), rules, batch_views,
        {"read_and_aggregate": read_done - started, "merge": merge_done - read_done},
    )
    return batch_views, manifest


def publish(views_dir: Path, batch_views: dict[str, pd.DataFrame], manifest: dict, keep: int,
            speed_dir: Path | None = None) -> dict:
    """Publish computed views as a new version; then prune the speed view at or below its watermark.

    Those speed trips are in the batch view now. Returns the manifest as
    published (with ``version`` and ``speed_files_pruned``).
    """
    published = write_version(views_dir, batch_views, manifest, keep)
    if speed_dir is not None:
        published["speed_files_pruned"] = speed_view.prune(speed_dir, published["watermark"])
    return published


def recompute(master_dir: Path, views_dir: Path, workers: int, keep: int, progress: bool = True,
              speed_dir: Path | None = None, engine: str = "python") -> dict:
    """Recompute every view from the whole master dataset and publish a new version."""
    batch_views, manifest = compute_views(master_dir, workers, progress, engine)
    return publish(views_dir, batch_views, manifest, keep, speed_dir)


# --- command line ------------------------------------------------------------------------


def print_import(result: ImportResult) -> None:
    if not result.added:
        print(f"{result.source}: already in master data ({result.rows:,} trips in {result.target}); nothing added")
        return
    report = result.report
    print(f"{result.source}: imported {result.rows:,} trips into {result.target} "
          f"({report['rows_malformed']:,} malformed rows rejected)")
    for reason, count in report["malformed"].items():
        print(f"  malformed  {reason:<30} {count:>9,}")
    for example in report["examples"]:
        print(f"  e.g. {example}")


def print_manifest(manifest: dict) -> None:
    rows = manifest["rows"]
    print(f"published batch version {manifest['version']}: {rows['master']:,} master trips, "
          f"{rows['clean']:,} pass the cleaning rules, {len(manifest['input_files'])} input files")
    for name, count in manifest["cleaning"].items():
        if count:
            print(f"  rule       {name:<30} {count:>9,} removed")
    print("  views: " + ", ".join(f"{name} ({count:,} rows)" for name, count in rows["views"].items()))
    print(f"  watermark: {manifest['watermark'] or 'none (no stream data yet)'}"
          + (f"; pruned {manifest['speed_files_pruned']} speed files at or below it"
             if manifest.get("speed_files_pruned") else ""))
    timings = manifest["timings_s"]
    print(f"  took {sum(timings.values()):.2f} s (read+aggregate {timings['read_and_aggregate']:.2f} s, "
          f"merge {timings['merge']:.2f} s, write {timings['write']:.2f} s)")


def print_status(master_dir: Path, views_dir: Path) -> None:
    files = master_files(master_dir)
    print(f"master data: {len(files)} files under {master_dir}")
    version = current_version(views_dir)
    if version is None:
        print(f"batch views: none yet in {views_dir} (run `python batch_processor.py recompute`)")
        return
    _, manifest = read_version(views_dir, version)
    print(f"batch views: current version {version} in {views_dir}, created {manifest['created_at']}, "
          f"{manifest['rows']['clean']:,} clean trips, watermark {manifest['watermark'] or 'none'}")


def print_ingest(result: IngestResult, topic: str) -> None:
    if not result.files:
        print(f"{topic}: no new events since the last ingest")
        return
    ranges = ", ".join(f"p{p} {lo}..{hi}" for p, (lo, hi) in sorted(result.offsets.items()))
    malformed = sum(result.malformed.values())
    print(f"{topic}: ingested {result.rows:,} events into {len(result.files)} master files ({ranges}); "
          f"{malformed:,} malformed events counted, not stored"
          + (f" ({dict(result.malformed)})" if malformed else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Batch layer: CSV history and Kafka events into Avro master data; "
                    "recompute and publish Parquet batch views.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--master-dir", type=Path, default=config.MASTER_DIR,
                        help="Avro master dataset (env PERISCOPE_MASTER_DIR)")
    parser.add_argument("--views-dir", type=Path, default=config.VIEWS_DIR,
                        help="published batch views (env PERISCOPE_VIEWS_DIR)")
    parser.add_argument("--speed-dir", type=Path, default=config.SPEED_DIR,
                        help="speed view, pruned below the watermark after each publish (env PERISCOPE_SPEED_DIR)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="run (the default), import, ingest, recompute or status")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def recompute_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="processes reading master files in parallel")
        sub.add_argument("--keep", type=int, default=KEEP_VERSIONS, help="published versions to keep")
        sub.add_argument("--engine", choices=ENGINES, default="python",
                         help="python: a process pool on this machine; spark: Spark on SPARK_MASTER "
                              "(default local[*]), for data that outgrew one machine")

    def stream_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS,
                         help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)")
        sub.add_argument("--topic", default=config.TRIPS_TOPIC, help="topic of trip events")
        sub.add_argument("--group", default=config.BATCH_GROUP, help="the batch layer's consumer group")
        sub.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the broker before failing")
        sub.add_argument("--file-rows", type=int, default=PART_ROWS, help="events per master file at most")

    run = command("run", "import --input once, optionally ingest the stream, then recompute and publish")
    run.add_argument("--input", type=Path, default=config.SAMPLE_CSV, help="CSV history to import first")
    run.add_argument("--from-stream", action="store_true", help="also ingest new Kafka events before recomputing")
    recompute_flags(run)
    stream_flags(run)
    imp = command("import", "append CSV files to the master dataset (a file already imported adds nothing)")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE", help="Kaggle-layout CSV, plain or .gz")
    imp.add_argument("--part-rows", type=int, default=PART_ROWS, help="trips per master file")
    stream_flags(command("ingest", "drain new Kafka events into master files, then commit offsets"))
    recompute_flags(command("recompute", "recompute all views, publish a new version, prune the speed view"))
    command("status", "show master data and the current batch version")

    parser.set_defaults(command="run", input=config.SAMPLE_CSV, from_stream=False,
                        workers=os.cpu_count() or 1, keep=KEEP_VERSIONS, engine="python")
    args = parser.parse_args(argv)
    for flag, minimum in (("workers", 1), ("keep", 1), ("part_rows", 1000), ("file_rows", 1)):
        value = getattr(args, flag, minimum)
        if value < minimum:
            parser.error(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    if getattr(args, "wait", 0) < 0:
        parser.error(f"--wait must be 0 or more seconds, got {args.wait}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "status":
            print_status(args.master_dir, args.views_dir)
            return 0
        for path in [args.input] if args.command == "run" else getattr(args, "files", []):
            print_import(import_csv(path, args.master_dir, getattr(args, "part_rows", PART_ROWS)))
        if args.command == "ingest" or args.from_stream:
            result = ingest_stream(args.bootstrap, args.topic, args.group, args.master_dir, args.file_rows, args.wait)
            print_ingest(result, args.topic)
        if args.command in ("run", "recompute"):
            manifest = recompute(args.master_dir, args.views_dir, args.workers, args.keep,
                                 speed_dir=args.speed_dir, engine=args.engine)
            print_manifest(manifest)
    except (FileNotFoundError, CsvLayoutError, BrokerUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
