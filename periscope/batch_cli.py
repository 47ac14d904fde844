"""The batch layer's command line: its flags, and what each command prints.

``batch_processor.py`` is the layer's steps; this is how a user drives them:

* ``parse_args``: the commands (``run``, the default, ``import``, ``ingest``,
  ``recompute``, ``status``), each flag with its default and environment
  variable in ``--help``, and the top-level ``--help`` naming every command's
  flags. The directory flags work before or after the command
  (``status --master-dir X`` as ``--master-dir X status``), and a command line
  without a command is ``run``: ``python batch_processor.py --from-stream``.
* ``ImportResult``, ``IngestResult`` and the ``print_*`` functions: what the
  steps return and the lines a user (or the Airflow log) reads about them.
* ``explained_errors``: the errors that end a command with one line naming
  the fix, instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from periscope import cli, config
from periscope.batch_tuning import DECODER, PART_ROWS, WORKERS
from periscope.master_reader import DECODERS
from periscope.schema import format_time, parse_cutoff
from periscope.storage import KEEP_VERSIONS, current_version, master_files, read_version

ENGINES = ("python", "spark")
"""How ``recompute`` computes the views: polars on this machine, or Spark (``periscope.spark_batch``)."""

COMMANDS = ("run", "import", "ingest", "recompute", "status")
DIRECTORY_FLAGS = ("--master-dir", "--views-dir", "--speed-dir")

Item = TypeVar("Item")


# --- what the steps return, and how it is printed ----------------------------------------------


@dataclass
class ImportResult:
    """One file import: where it went, whether it added anything, and what the loader reported."""

    source: Path
    target: Path
    added: bool
    rows: int
    report: dict
    cutoff_ms: int | None = None
    left_for_stream: int = 0


@dataclass
class IngestResult:
    """One drain of the stream: the master files written, their events, the offsets they cover."""

    files: list[Path] = field(default_factory=list)
    rows: int = 0
    malformed: Counter = field(default_factory=Counter)
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, path: Path, partition: int, events: list[tuple[int, dict | None, str | None]]) -> None:
        """Count a master file just written with ``events`` (``(offset, record or None, reason or None)``)."""
        first, last = events[0][0], events[-1][0]
        self.files.append(path)
        self.rows += sum(record is not None for _, record, _ in events)
        low, high = self.offsets.get(partition, (first, last))
        self.offsets[partition] = (min(low, first), max(high, last))


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


def print_ingest(result: IngestResult, topic: str) -> None:
    if not result.files:
        print(f"{topic}: no new events to ingest")
        return
    ranges = ", ".join(f"p{p} {lo}..{hi}" for p, (lo, hi) in sorted(result.offsets.items()))
    malformed = sum(result.malformed.values())
    print(f"{topic}: ingested {result.rows:,} events into {len(result.files)} master files ({ranges}); "
          f"{malformed:,} malformed events counted, not stored"
          + (f" ({dict(result.malformed)})" if malformed else ""))


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


def with_progress(items: Iterable[Item], line: Callable[[list[Item]], str], enabled: bool,
                  at_end: bool = False, every_s: float = 1.0) -> list[Item]:
    """All of ``items`` as a list; meanwhile ``line(done so far)`` is printed at most every ``every_s``
    seconds (and after the last item with ``at_end``), unless disabled."""
    done: list[Item] = []
    last, printed = time.monotonic(), False
    for item in items:
        done.append(item)
        printed = enabled and time.monotonic() - last >= every_s
        if printed:
            print(line(done), flush=True)
            last = time.monotonic()
    if enabled and at_end and done and not printed:
        print(line(done), flush=True)
    return done


def explained_errors() -> tuple[type[Exception], ...]:
    """Errors that end a command with a one-line message and status 2 instead of a traceback.

    Evaluated only when an error happens, so the Kafka and Spark modules are imported only then.
    """
    from periscope.master_reader import UnreadableMasterFile
    from periscope.sources import CsvLayoutError
    from periscope.spark_session import SparkSetupError
    from periscope.sql_catalog import StatementFailed
    from periscope.stream import BrokerUnavailable

    return (FileNotFoundError, CsvLayoutError, UnreadableMasterFile, BrokerUnavailable, SparkSetupError,
            StatementFailed)


# --- the flags -------------------------------------------------------------------------------------


class _TopHelp(argparse.RawDescriptionHelpFormatter, cli.HelpFormatter):
    """The top-level ``--help``: defaults as everywhere, and the commands' flags laid out as written."""


def _directory_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """The directories, known to every parser so they work before or after the command; only the
    top parser has defaults, so a command never resets what was given before it."""
    for flag, default, text in (
            ("--master-dir", config.MASTER_DIR, "Avro master dataset (env PERISCOPE_MASTER_DIR)"),
            ("--views-dir", config.VIEWS_DIR, "published batch views (env PERISCOPE_VIEWS_DIR)"),
            ("--speed-dir", config.SPEED_DIR, "speed view, pruned below the watermark after each publish "
                                              "(env PERISCOPE_SPEED_DIR)")):
        parser.add_argument(flag, type=Path, default=default if top else argparse.SUPPRESS,
                            help=text if top else f"{text}; default {default}")


def _cutoff_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cutoff", type=cli.argument_type(parse_cutoff), default=config.CUTOFF,
                        metavar="TIME",
                        help="import only the trips picked up before this time (New York wall clock, e.g. "
                             "2016-06-01 or '2016-06-01 12:00:00') as history: kafka_producer.py replays the "
                             f"others; 'none' imports every trip (default: {config.CUTOFF}, env PERISCOPE_CUTOFF)")


def _recompute_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=WORKERS, metavar="N",
                        help="master files cleaned and aggregated at a time (threads)")
    parser.add_argument("--keep", type=int, default=KEEP_VERSIONS, metavar="N", help="published versions to keep")
    parser.add_argument("--engine", choices=ENGINES, default="python",
                        help="python: polars on this machine; spark: Spark SQL on SPARK_MASTER (local[*] "
                             "unless set), for data that outgrew one machine: the same rules and views, "
                             "computed and written as Parquet by Spark")
    parser.add_argument("--decoder", choices=DECODERS, default=DECODER,
                        help="python engine: how master files are decoded; fastavro is the slower reference "
                             "decoder, kept to compare with")


def _stream_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS, metavar="HOST:PORT[,...]",
                        help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic", default=config.TRIPS_TOPIC,
                        help="topic of trip events (env PERISCOPE_TRIPS_TOPIC)")
    parser.add_argument("--group", default=config.BATCH_GROUP,
                        help="the batch layer's consumer group (env PERISCOPE_BATCH_GROUP)")
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="seconds to wait for the broker before failing")
    parser.add_argument("--file-rows", type=int, default=PART_ROWS, metavar="N",
                        help="events per master file at most")


def _commands_epilog(commands: dict[str, argparse.ArgumentParser]) -> str:
    """Each command with its own flags (the directory flags aside), from the parsers themselves."""
    lines = ["commands and their flags (no command: run; COMMAND --help shows what each flag does):"]
    for name, parser in commands.items():
        flags = [action.metavar + " ..." if action.nargs == "+" else action.option_strings[-1]
                 for action in parser._actions
                 if not isinstance(action, argparse._HelpAction)
                 and not set(action.option_strings) & set(DIRECTORY_FLAGS)]
        lines.append(textwrap.fill(" ".join(flags) or "(no flags of its own)", width=79,
                                   initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13))
    return "\n".join(lines)


def _with_command(argv: list[str]) -> list[str]:
    """``argv`` with ``run`` put where the command goes when none is given: running the layer is the default.

    Only a command line that goes on with a flag (or ends) gets it, so a mistyped command is still
    refused by name.
    """
    at = 0
    while at < len(argv) and argv[at].split("=")[0] in DIRECTORY_FLAGS:
        at += 1 if "=" in argv[at] else 2
    if at > len(argv) or (at < len(argv) and (argv[at] in ("-h", "--help") or not argv[at].startswith("-"))):
        return argv  # a directory flag without its value, help, or a command: argparse takes it from here
    return [*argv[:at], "run", *argv[at:]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command and its flags, with every attribute ``batch_processor.main`` reads set."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="batch_processor.py",
        description="Batch layer: CSV history and Kafka events into Avro master data;\n"
                    "recompute and publish Parquet batch views.",
        formatter_class=_TopHelp,
    )
    _directory_flags(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       help="run (the default), import, ingest, recompute, status or sql")
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, text: str) -> argparse.ArgumentParser:
        commands[name] = subparsers.add_parser(name, help=text, description=text,
                                               formatter_class=cli.HelpFormatter)
        _directory_flags(commands[name], top=False)
        return commands[name]

    run = command("run", "import --input once, optionally ingest the stream, then recompute and publish")
    run.add_argument("--input", type=Path, default=config.SAMPLE_CSV, metavar="FILE",
                     help="CSV history to import first (env PERISCOPE_SAMPLE_CSV)")
    _cutoff_flag(run)
    run.add_argument("--from-stream", action="store_true", help="also ingest new Kafka events before recomputing")
    _recompute_flags(run)
    _stream_flags(run)
    imp = command("import", "append trip files (Kaggle or TLC, CSV or Parquet) to the master dataset (a file "
                            "already imported with the same cutoff adds nothing)")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE",
                     help="trip file: Kaggle-layout CSV, or TLC trip records (yellow/green, "
                          "2009 on): CSV, plain or gzip, or Parquet")
    _cutoff_flag(imp)
    imp.add_argument("--part-rows", type=int, default=PART_ROWS, metavar="N", help="trips per master file")
    _stream_flags(command("ingest", "drain new Kafka events into master files, then commit offsets"))
    _recompute_flags(command("recompute", "recompute all views, publish a new version, prune the speed view"))
    command("status", "show master data and the current batch version")
    sql = command("sql", "SQL over master data and the current batch version, as tables of a persistent "
                         "Spark SQL catalog (a prompt, or -e)")
    sql.add_argument("-e", "--execute", action="append", metavar="SQL",
                     help="run this statement, print its result and exit (repeatable); without it: a prompt")
    sql.add_argument("--master", default=config.SPARK_MASTER, help="Spark master URL (env SPARK_MASTER)")
    parser.epilog = _commands_epilog(commands)

    args = parser.parse_args(_with_command(argv))
    for flag, minimum in (("workers", 1), ("keep", 1), ("part_rows", 1000), ("file_rows", 1)):
        value = getattr(args, flag, minimum)
        if value < minimum:
            parser.error(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    if getattr(args, "wait", 0) < 0:
        parser.error(f"--wait must be 0 or more seconds, got {args.wait}")
    if args.command == "run":
        args.files = [args.input]
    for name, default in (("files", []), ("part_rows", PART_ROWS), ("from_stream", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args
