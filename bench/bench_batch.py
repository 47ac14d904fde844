"""Benchmark of the batch layer at scale: recompute wall time and peak memory, with duplicates,
with the polars decoder against the fastavro one, side by side in the same run.

A recompute reads every master file, drops later copies of a trip, applies
the cleaning rules, aggregates and publishes (``batch_processor.py``). This
benchmark measures it on generated data (``periscope.generate``) at the size of
the full Kaggle training set and at 10 million trips, with duplicates made the
way they arise: a generated file is imported, then a second file holding a
copy of a fraction of its rows (as when a file is imported and also replayed).
Per configuration (master rows, share of them that are duplicates):

1. generate the distinct trips as a CSV, or reuse it from ``data/generated/``
   (same name, same bytes), and write the copies file beside it (a seeded
   sample of its rows, reused too);
2. import both into a fresh, temporary master dataset with
   ``batch_processor.import_csv`` (timed);
3. run ``python batch_processor.py ... recompute --decoder D`` as a child
   process, as a user would, alternating the decoders (``polars``, the fast
   one, and ``fastavro``, the one it replaced) run after run, timing each from
   start to exit and sampling the memory (RSS) of the process and all its
   children every 50 ms; each run's manifest must count exactly the
   duplicates that were made.

Wall time includes starting Python; the manifest's own timings (read, drop
duplicates, clean and aggregate, merge, write) are reported beside it. The
master files are read from the page cache (they have just been written), the
usual case for a scheduled recompute too. On a shared machine, other
processes' CPU time during each run is recorded (``others_cpu_s``).

Targets (issue 11): a recompute over 1.5 M trips, duplicates removed, in at
most 2 s (median); over 10 M trips of which 20 % are duplicates in at most
15 s and 2 GB peak RSS (all processes).

Run it (about 20 minutes, most of it generating and importing 10 M trips)::

    python -m bench.bench_batch                                          # the targets' configurations
    python -m bench.bench_batch --configs 200000:0.1 --repeat 2          # a quick check
    python bench/bench_batch.py                                          # also works as a file (make bench)

Results are printed as a table and written to ``bench/results/batch-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

if __package__ in (None, ""):  # run as a file: python bench/bench_batch.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batch_processor  # noqa: E402
from bench.machine import children_cpu_s, machine_busy_s, print_machine  # noqa: E402
from periscope import config, generate  # noqa: E402
from periscope.master_reader import DECODERS  # noqa: E402
from periscope.storage import MANIFEST, current_version, master_files, read_json  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
SAMPLE_INTERVAL_S = 0.05
MB = 1e6

DEFAULT_CONFIGS = "1500000:0,1500000:0.1,10000000:0.2"
TARGETS = {1_500_000: (2.0, None), 10_000_000: (15.0, 2000.0)}
"""Master rows -> (most wall seconds, most peak MB over all processes) for the polars decoder."""


@dataclass(frozen=True)
class Config:
    """``rows`` master rows, of which ``duplicates`` (a share) are later copies of a trip."""

    rows: int
    duplicates: float

    @property
    def distinct(self) -> int:
        return self.rows - self.copies

    @property
    def copies(self) -> int:
        return round(self.rows * self.duplicates)

    @property
    def label(self) -> str:
        return f"{self.rows:,} trips, {self.duplicates:.0%} duplicates"


def parse_configs(text: str) -> list[Config]:
    """``"1500000:0,10000000:0.2"`` to configurations; ValueError says what is wrong."""
    configs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        rows, _, share = part.partition(":")
        try:
            config_ = Config(int(rows.replace("_", "")), float(share or 0))
        except ValueError:
            raise ValueError(f"--configs: {part!r} is not ROWS:SHARE, e.g. 1500000:0.1") from None
        if config_.rows < 1 or not 0 <= config_.duplicates < 1 or config_.distinct > generate.MAX_ROWS:
            raise ValueError(f"--configs: {part!r} needs at least one row and a share of duplicates in [0, 1)")
        configs.append(config_)
    if not configs:
        raise ValueError("--configs: give at least one ROWS:SHARE")
    return configs


def tree_rss(process: psutil.Process) -> tuple[int, int, int]:
    """Total RSS of a process and its descendants, the largest single RSS, and how many processes.

    The total counts pages shared between processes (libraries) once per
    process, so it is an upper bound on the memory really in use.
    """
    sizes = []
    for member in [process, *process.children(recursive=True)]:
        try:
            sizes.append(member.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sum(sizes), max(sizes, default=0), len(sizes)


def run_measured(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` and measure it: wall and CPU time, peak RSS of its process tree, others' CPU.

    Waiting with a timeout both paces the sampling and notices the exit at
    once, so the wall time is exact while memory is sampled every 50 ms.
    """
    peak_total = peak_single = most_processes = 0
    with open(log, "wb") as output:
        cpu_before, busy_before = children_cpu_s(), machine_busy_s()
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        while True:
            try:
                total, single, processes = tree_rss(watched)
            except psutil.NoSuchProcess:
                total = single = processes = 0
            peak_total, peak_single = max(peak_total, total), max(peak_single, single)
            most_processes = max(most_processes, processes)
            try:
                child.wait(timeout=SAMPLE_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                continue
        wall = time.perf_counter() - started
        cpu = children_cpu_s() - cpu_before
        others = max(0.0, machine_busy_s() - busy_before - cpu)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {child.returncode}:\n{log.read_text()[-3000:]}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "others_cpu_s": round(others, 2),
        "peak_rss_total_mb": round(peak_total / MB, 1),
        "peak_rss_largest_process_mb": round(peak_single / MB, 1),
        "processes": most_processes,
    }


def recompute_command(scratch: Path, workers: int, decoder: str = "polars") -> list[str]:
    """The recompute as a user or the Airflow DAG runs it, on the scratch directories only
    (its own speed view too, so the real one is never pruned)."""
    return [sys.executable, str(PROJECT_ROOT / "batch_processor.py"), "--master-dir", str(scratch / "master"),
            "--views-dir", str(scratch / "views"), "--speed-dir", str(scratch / "speed"),
            "recompute", "--workers", str(workers), "--keep", "1", "--decoder", decoder]


def published_manifest(views_dir: Path) -> dict[str, Any]:
    return read_json(views_dir / current_version(views_dir) / MANIFEST)


def parse_counts(text: str, name: str) -> list[int]:
    """``"1500000,10000000"`` to integers; ValueError names the flag and the bad part (bench_spark's sizes)."""
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be one or more numbers of at least 1, got {text!r}")
    return values


def ensure_csv(rows: int, seed: int) -> tuple[Path, float | None]:
    """The generated CSV for ``rows`` trips, made now (timed) unless it is already there."""
    path = generate.out_path(generate.OUT_TEMPLATE, rows, seed)
    if path.exists():
        print(f"reusing {path}")
        return path, None
    started = time.perf_counter()
    generate.main(["--rows", str(rows), "--seed", str(seed), "--out", str(path), "--quiet"])
    return path, round(time.perf_counter() - started, 2)


def ensure_inputs(setup: Config, seed: int) -> tuple[Path, Path | None, float | None]:
    """The generated CSV of the distinct trips and the CSV of the copies, made now (timed) unless there."""
    started = time.perf_counter()
    distinct, generate_s = ensure_csv(setup.distinct, seed)
    made = generate_s is not None
    if not setup.copies:
        return distinct, None, generate_s
    copies = distinct.with_name(f"{distinct.stem}-copies-{setup.copies}.csv")
    if copies.exists():
        print(f"reusing {copies}")
    else:
        write_copies(distinct, copies, setup.copies / setup.distinct, seed)
        made = True
    return distinct, copies, round(time.perf_counter() - started, 2) if made else None


def write_copies(source: Path, out: Path, fraction: float, seed: int) -> None:
    """A CSV holding a seeded random ``fraction`` of the rows of ``source`` (read in chunks, so the
    count may be off by a few rows: the benchmark counts the rows it imports)."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        with open(partial, "w") as handle:
            for index, chunk in enumerate(pd.read_csv(source, chunksize=500_000, dtype=str)):
                chunk.sample(frac=fraction, random_state=seed + index).to_csv(handle, index=False,
                                                                              header=index == 0)
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def bench_config(setup: Config, repeat: int, workers: int, decoders: list[str], seed: int,
                 work_dir: Path) -> dict[str, Any]:
    """Generate (or reuse), import once, recompute ``repeat`` times per decoder, alternating."""
    distinct_csv, copies_csv, generate_s = ensure_inputs(setup, seed)
    scratch = Path(tempfile.mkdtemp(prefix=f"periscope-bench-{setup.rows}-", dir=work_dir))
    try:
        master_dir, views_dir = scratch / "master", scratch / "views"
        print(f"{setup.label}: importing {distinct_csv.name}"
              + (f" and {copies_csv.name}" if copies_csv else "") + f" into {master_dir} ...", flush=True)
        started = time.perf_counter()
        imports = [batch_processor.import_csv(path, master_dir) for path in filter(None, [distinct_csv, copies_csv])]
        import_s = time.perf_counter() - started
        imported, copies = sum(i.rows for i in imports), imports[1].rows if copies_csv else 0
        files = master_files(master_dir)
        master_mb = sum(path.stat().st_size for path in files) / MB
        print(f"  imported {imported:,} trips in {import_s:.1f} s into {len(files)} Avro files ({master_mb:,.0f} MB)",
              flush=True)
        runs: dict[str, list[dict[str, Any]]] = {decoder: [] for decoder in decoders}
        for run in range(1, repeat + 1):
            for decoder in decoders:
                result = run_measured(recompute_command(scratch, workers, decoder),
                                      scratch / f"recompute-{decoder}-{run}.log")
                manifest = published_manifest(views_dir)
                if manifest["rows"]["master"] != imported or manifest["rows"]["duplicates"] != copies:
                    raise RuntimeError(f"{decoder}: the manifest counts {manifest['rows']}, expected "
                                       f"{imported:,} master rows and {copies:,} duplicates")
                result.update({f"{step}_s": seconds for step, seconds in manifest["timings_s"].items()})
                result.update({key: manifest["rows"][key] for key in ("distinct", "duplicates", "clean")})
                runs[decoder].append(result)
                print(f"  {decoder:<8} run {run}/{repeat}: {result['wall_s']:.2f} s wall, {result['cpu_s']:.1f} s "
                      f"CPU, peak RSS {result['peak_rss_total_mb']:,.0f} MB over {result['processes']} process(es); "
                      f"other processes used {result['others_cpu_s']:.1f} CPU-s meanwhile", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "rows": setup.rows, "duplicates_share": setup.duplicates, "master_rows": imported,
        "distinct": imported - copies, "copies": copies, "csv": [str(p) for p in filter(None, [distinct_csv, copies_csv])],
        "generate_s": generate_s, "import_s": round(import_s, 2), "master_files": len(files),
        "master_mb": round(master_mb, 1), "workers": workers,
        "decoders": {decoder: {"runs": decoder_runs, "median": medians(decoder_runs)}
                     for decoder, decoder_runs in runs.items()},
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    numbers = [key for key, value in runs[0].items() if isinstance(value, (int, float))]
    return {key: statistics.median(run[key] for run in runs) for key in numbers}


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target, what the polars decoder measured, and whether it is met."""
    checks = []
    for result in results:
        wall_target, peak_target = TARGETS.get(result["rows"], (None, None))
        polars = result["decoders"].get("polars")
        if polars is None:
            continue
        label = f"{result['rows']:,} trips, {result['duplicates_share']:.0%} duplicates"
        wall, peak = polars["median"]["wall_s"], polars["median"]["peak_rss_total_mb"]
        if wall_target is not None:
            checks.append({"target": f"{label}: recompute <= {wall_target:.0f} s wall (median)",
                           "measured": f"{wall:.2f} s", "met": wall <= wall_target})
        if peak_target is not None:
            checks.append({"target": f"{label}: recompute <= {peak_target / 1000:.0f} GB peak RSS (median)",
                           "measured": f"{peak:,.0f} MB", "met": peak <= peak_target})
    return checks


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """One line per configuration and decoder, medians of its runs, and the speed-up of polars."""
    lines = [f"{'trips':>11} {'dups':>5} {'decoder':<8} {'runs':>4} {'wall s':>7} {'(range)':>11} {'CPU s':>6} "
             f"{'read s':>6} {'dedupe s':>8} {'agg s':>6} {'write s':>7} {'peak RSS MB':>11} {'others CPU-s':>12}"]
    for r in results:
        for decoder, data in r["decoders"].items():
            m, walls = data["median"], [run["wall_s"] for run in data["runs"]]
            lines.append(f"{r['rows']:>11,} {r['duplicates_share']:>5.0%} {decoder:<8} {len(walls):>4} "
                         f"{m['wall_s']:>7.2f} {f'{min(walls):.1f}-{max(walls):.1f}':>11} {m['cpu_s']:>6.1f} "
                         f"{m['read_s']:>6.2f} {m['drop_duplicates_s']:>8.2f} {m['clean_and_aggregate_s']:>6.2f} "
                         f"{m['write_s']:>7.2f} {m['peak_rss_total_mb']:>11,.0f} {m['others_cpu_s']:>12.1f}")
        if {"polars", "fastavro"} <= set(r["decoders"]):
            fast, slow = (r["decoders"][d]["median"]["wall_s"] for d in ("polars", "fastavro"))
            lines.append(f"{'':>11} {'':>5} polars is {slow / fast:.1f}x faster than fastavro (median wall)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_batch",
        description="Benchmark the batch layer's recompute on generated trips with duplicates: wall time and "
                    "memory, polars decoder against fastavro.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="ROWS:SHARE, comma-separated: master rows and the share of them that are duplicates")
    parser.add_argument("--repeat", type=int, default=3, help="recompute runs per configuration and decoder")
    parser.add_argument("--decoder", choices=[*DECODERS, "both"], default="both",
                        help="which decoder(s) to run; both alternate run by run")
    parser.add_argument("--workers", type=int, default=2, help="batch_processor recompute --workers")
    parser.add_argument("--seed", type=int, default=7,
                        help="generator seed; generated files are reused per size and seed")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary master datasets go (removed afterwards); needs ~60 bytes per trip")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON result file is written")
    args = parser.parse_args(argv)
    try:
        args.configs = parse_configs(args.configs)
    except ValueError as error:
        parser.error(str(error))
    for flag, minimum in (("repeat", 1), ("workers", 1), ("seed", 0)):
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag} must be at least {minimum}, got {getattr(args, flag)}")
    if not args.work_dir.is_dir():
        parser.error(f"--work-dir {args.work_dir} is not a directory")
    args.decoders = list(DECODERS) if args.decoder == "both" else [args.decoder]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = print_machine()
    machine["libraries"]["polars"] = metadata.version("polars")
    print(f"batch benchmark: {', '.join(c.label for c in args.configs)}; {args.repeat} run(s) per decoder "
          f"({', '.join(args.decoders)}), --workers {args.workers}, seed {args.seed}\n")
    results = [bench_config(setup, args.repeat, args.workers, args.decoders, args.seed, args.work_dir)
               for setup in args.configs]

    print("\nrecompute (medians over runs; peak RSS = sum over the process and its children)")
    for line in results_table(results):
        print("  " + line)
    checks = verdicts(results)
    for check in checks:
        print(f"  {'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['measured']}")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.results_dir / f"batch-{stamp}.json"
    document = {"benchmark": "batch", "argv": sys.argv[1:] if argv is None else argv, "machine": machine,
                "data_dir": str(config.DATA_DIR), "results": results, "targets": checks}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
