"""Benchmark of the batch layer at scale: import time, recompute wall time and peak memory.

The batch layer promises that a recompute is a map-reduce over master files
whose memory does not grow with the data. This benchmark checks it on
generated data (``periscope.generate``) of 1.5 million trips (the size of the
full Kaggle training set) and 10 million trips:

1. generate the CSV, or reuse it from ``data/generated/`` (same name, same bytes);
2. import it into a fresh, temporary master dataset with
   ``batch_processor.import_csv`` (timed);
3. run ``python batch_processor.py ... recompute`` as a child process, as a
   user would, timing it from start to exit and sampling the memory (RSS) of
   that process and all its worker processes every 50 ms.

A recompute's wall time includes starting Python and its worker processes;
the manifest's own timings (read+aggregate, merge, write) are reported
beside it. The master files are read from the page cache (they have just
been written), which is the usual case for a scheduled recompute too.

Targets (from the scale issue): 1.5 M trips recompute in at most 15 s and
2 GB peak RSS; 10 M trips complete with a peak that does not grow with the
data, i.e. about the same as for 1.5 M (the ratio is printed).

Run it (about 10 minutes, most of it importing 10 M trips)::

    python -m bench.bench_batch                                   # 1.5 M x3, 10 M x1
    python -m bench.bench_batch --sizes 200000 --repeat 2         # a quick check
    python bench/bench_batch.py                                   # also works as a file (make bench)

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a file: python bench/bench_batch.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batch_processor  # noqa: E402
from bench.machine import children_cpu_s, machine_busy_s, print_machine  # noqa: E402
from periscope import config, generate  # noqa: E402
from periscope.storage import MANIFEST, current_version, master_files, read_json  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
SAMPLE_INTERVAL_S = 0.05
MB = 1e6

TARGET_WALL_S = 15.0
TARGET_PEAK_MB = 2000.0
TARGET_SIZE = 1_500_000
"""The wall-time and memory targets are stated for 1.5 M trips."""

MAX_PEAK_GROWTH = 1.25
"""'Does not grow with data': the largest size may peak at most 25 % above the smallest."""


def parse_counts(text: str, name: str) -> list[int]:
    """``"1500000,10000000"`` to integers; ValueError names the flag and the bad part."""
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be one or more numbers of at least 1, got {text!r}")
    return values


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
    once, so the wall time is exact while memory is sampled every 50 ms. On
    a shared machine the wall time varies with other people's work; the CPU
    time of the run and the others' CPU time show how much.
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


def recompute_command(scratch: Path, workers: int) -> list[str]:
    """The recompute as a user or the Airflow DAG runs it, on the scratch directories only
    (its own speed view too, so the real one is never pruned)."""
    return [sys.executable, str(PROJECT_ROOT / "batch_processor.py"), "--master-dir", str(scratch / "master"),
            "--views-dir", str(scratch / "views"), "--speed-dir", str(scratch / "speed"),
            "recompute", "--workers", str(workers), "--keep", "1"]


def published_manifest(views_dir: Path) -> dict[str, Any]:
    version = current_version(views_dir)
    return read_json(views_dir / version / MANIFEST)


def ensure_csv(rows: int, seed: int) -> tuple[Path, float | None]:
    """The generated CSV for ``rows`` trips, made now (timed) unless it is already there."""
    path = generate.out_path(generate.OUT_TEMPLATE, rows, seed)
    if path.exists():
        print(f"reusing {path}")
        return path, None
    started = time.perf_counter()
    generate.main(["--rows", str(rows), "--seed", str(seed), "--out", str(path)])
    return path, round(time.perf_counter() - started, 2)


def bench_size(rows: int, repeat: int, workers: int, seed: int, work_dir: Path) -> dict[str, Any]:
    """Generate (or reuse), import once, recompute ``repeat`` times; everything measured."""
    csv, generate_s = ensure_csv(rows, seed)
    scratch = Path(tempfile.mkdtemp(prefix=f"periscope-bench-{rows}-", dir=work_dir))
    try:
        master_dir, views_dir = scratch / "master", scratch / "views"
        print(f"importing {csv.name} into {master_dir} ...", flush=True)
        started = time.perf_counter()
        imported = batch_processor.import_csv(csv, master_dir)
        import_s = time.perf_counter() - started
        files = master_files(master_dir)
        master_mb = sum(path.stat().st_size for path in files) / MB
        print(f"  imported {imported.rows:,} trips in {import_s:.1f} s ({imported.rows / import_s:,.0f} trips/s) "
              f"into {len(files)} Avro files ({master_mb:,.0f} MB)", flush=True)

        runs = []
        for run in range(1, repeat + 1):
            result = run_measured(recompute_command(scratch, workers), scratch / f"recompute-{run}.log")
            manifest = published_manifest(views_dir)
            result.update({f"{step}_s": seconds for step, seconds in manifest["timings_s"].items()})
            result["clean_rows"] = manifest["rows"]["clean"]
            runs.append(result)
            print(f"  recompute {run}/{repeat}: {result['wall_s']:.2f} s wall, {result['cpu_s']:.1f} s CPU, peak RSS "
                  f"{result['peak_rss_total_mb']:,.0f} MB over {result['processes']} processes "
                  f"(largest {result['peak_rss_largest_process_mb']:,.0f} MB); "
                  f"other processes used {result['others_cpu_s']:.1f} CPU-s meanwhile", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "rows": rows,
        "csv": str(csv),
        "csv_mb": round(csv.stat().st_size / MB, 1),
        "generate_s": generate_s,
        "import_s": round(import_s, 2),
        "master_files": len(files),
        "master_mb": round(master_mb, 1),
        "workers": workers,
        "runs": runs,
        "median": {key: statistics.median(run[key] for run in runs)
                   for key in runs[0] if isinstance(runs[0][key], (int, float))},
        "fastest_wall_s": min(run["wall_s"] for run in runs),
        "slowest_wall_s": max(run["wall_s"] for run in runs),
    }


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target, what was measured, and whether it is met."""
    checks = []
    target_size = next((r for r in results if r["rows"] == TARGET_SIZE), None)
    if target_size:
        wall, peak = target_size["median"]["wall_s"], target_size["median"]["peak_rss_total_mb"]
        checks.append({"target": f"{TARGET_SIZE:,} trips recompute <= {TARGET_WALL_S:.0f} s wall (median)",
                       "measured": f"{wall:.2f} s", "met": wall <= TARGET_WALL_S})
        checks.append({"target": f"{TARGET_SIZE:,} trips recompute <= {TARGET_PEAK_MB / 1000:.0f} GB peak RSS",
                       "measured": f"{peak:,.0f} MB", "met": peak <= TARGET_PEAK_MB})
    if len(results) > 1:
        small, large = results[0], results[-1]
        ratio = large["median"]["peak_rss_total_mb"] / small["median"]["peak_rss_total_mb"]
        checks.append({"target": f"peak RSS does not grow with data ({large['rows']:,} vs {small['rows']:,} "
                                 f"trips, ratio <= {MAX_PEAK_GROWTH})",
                       "measured": f"ratio {ratio:.2f} for {large['rows'] / small['rows']:.1f}x the data",
                       "met": ratio <= MAX_PEAK_GROWTH})
    return checks


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """One line per size with medians of the recompute runs."""
    lines = [f"{'trips':>11} {'runs':>4} {'import s':>9} {'files':>5} {'wall s':>7} {'(range)':>13} {'CPU s':>6} "
             f"{'read+agg s':>10} {'merge s':>7} {'write s':>7} {'peak RSS MB':>11} {'largest MB':>10} {'procs':>5}"]
    for r in results:
        m = r["median"]
        spread = f"{r['fastest_wall_s']:.1f}-{r['slowest_wall_s']:.1f}"
        lines.append(f"{r['rows']:>11,} {len(r['runs']):>4} {r['import_s']:>9.1f} {r['master_files']:>5} "
                     f"{m['wall_s']:>7.2f} {spread:>13} {m['cpu_s']:>6.1f} {m['read_and_aggregate_s']:>10.2f} "
                     f"{m['merge_s']:>7.2f} {m['write_s']:>7.2f} {m['peak_rss_total_mb']:>11,.0f} "
                     f"{m['peak_rss_largest_process_mb']:>10,.0f} {m['processes']:>5.0f}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_batch",
        description="Benchmark the batch layer: import and recompute generated trips, timing and measuring memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", default="1500000,10000000",
                        help="trip counts to benchmark, comma-separated, smallest first")
    parser.add_argument("--repeat", default="3,1",
                        help="recompute runs per size, in --sizes order (one number: the same for every size); "
                             "medians are reported")
    parser.add_argument("--workers", type=int, default=2, help="recompute worker processes (batch_processor --workers)")
    parser.add_argument("--seed", type=int, default=7, help="generator seed; generated files are reused per size and seed")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary master datasets go (removed afterwards); needs ~50 bytes per trip")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON result file is written")
    args = parser.parse_args(argv)
    try:
        args.sizes = parse_counts(args.sizes, "--sizes")
        repeat = parse_counts(args.repeat, "--repeat")
    except ValueError as error:
        parser.error(str(error))
    if max(args.sizes) > generate.MAX_ROWS:
        parser.error(f"--sizes: at most {generate.MAX_ROWS:,} trips per size")
    if args.sizes != sorted(args.sizes):
        parser.error(f"--sizes must be smallest first (the memory ratio compares first and last), got {args.sizes}")
    if len(repeat) == 1:
        repeat *= len(args.sizes)
    if len(repeat) != len(args.sizes):
        parser.error(f"--repeat needs one number, or one per size ({len(args.sizes)}), got {len(repeat)}")
    args.repeat = repeat
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.seed < 0:
        parser.error(f"--seed must be zero or positive, got {args.seed}")
    if not args.work_dir.is_dir():
        parser.error(f"--work-dir {args.work_dir} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = print_machine()
    print(f"batch benchmark: sizes {args.sizes}, runs {args.repeat}, {args.workers} worker(s), seed {args.seed}\n")
    results = [bench_size(rows, repeat, args.workers, args.seed, args.work_dir)
               for rows, repeat in zip(args.sizes, args.repeat)]

    print("\nrecompute (medians over runs; peak RSS = sum over the process and its workers)")
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
