"""Benchmark of the batch layer at scale: import and recompute wall time and peak memory, with
duplicates, side by side in the same run: the polars decoder against the fastavro one, and
Kaggle-layout trips against the same trips in a TLC zone-era file.

A recompute reads every master file, drops later copies of a trip, applies
the cleaning rules, aggregates and publishes (``batch_processor.py``). This
benchmark measures it on generated data (``periscope.generate``) at the size of
the full Kaggle training set and at 10 million trips, with duplicates made the
way they arise: a generated file is imported, then a second file holding a
copy of a fraction of its rows (as when a file is imported and also replayed).

The trips can be written in two layouts (``--layouts``), the same trips in
each (same seed and size): the Kaggle CSV (ids and coordinates; the import
finds each point's zone in the polygons) and a TLC yellow-cab file of the
zone era (``yellow_zones``: zones, no coordinates, no ids, which readers
derive from the content; the views place such trips at their zones'
centroids). Real data since July 2016 is of the second kind, a month of it
millions of trips (yellow cabs: about 7.7 M a month in 2019, 3 M in 2024),
so the ratio zone era / Kaggle says what the Kaggle-layout figures and
targets mean for real months. With several layouts, one decoder (polars)
runs unless ``--decoder`` says otherwise.

Per configuration (master rows, share of them that are duplicates) and layout:

1. generate the distinct trips as a CSV, or reuse it from ``data/generated/``
   (same name, same bytes), and write the copies file beside it (a seeded
   sample of its rows, reused too);
2. import both into a fresh, temporary master dataset with
   ``python batch_processor.py ... import FILE ... --cutoff none`` as a child
   process, measured like a recompute (next step), once;
3. run ``python batch_processor.py ... recompute --decoder D`` as a child
   process, as a user would, alternating the layouts and the decoders
   (``polars``, the fast one, and ``fastavro``, the one it replaced) run after
   run, timing each from start to exit and sampling the memory (RSS) of the
   process and all its children every 50 ms; each run's manifest must count
   exactly the rows of the files and their duplicates: the copies, and in a
   zone-era file also the trips generated identical in every column by
   chance, which have one derived id and so are one fact.

Wall time includes starting Python; the manifest's own timings (read, drop
duplicates, clean and aggregate, merge, write) are reported beside it. The
master files are read from the page cache (they have just been written), the
usual case for a scheduled recompute too. On a shared machine, other
processes' CPU time during each run is recorded (``others_cpu_s``), and the
load average before and after the whole run.

Targets (issue 11), checked for each layout measured: a recompute over
1.5 M trips, duplicates removed, in at most 2 s (median); over 10 M trips of
which 20 % are duplicates in at most 15 s and 2 GB peak RSS (all processes).

Run it (about 20 minutes, most of it generating and importing 10 M trips)::

    python -m bench.bench_batch                                          # the targets' configurations
    python -m bench.bench_batch --configs 200000:0.1 --repeat 2          # a quick check
    python -m bench.bench_batch --configs 3000000:0 --layouts kaggle,yellow_zones  # zone era, polars
    python bench/bench_batch.py                                          # also works as a file (make bench)

Results are printed as tables and written to ``bench/results/batch-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
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

from bench.machine import children_cpu_s, machine_busy_s, print_machine  # noqa: E402
from periscope import cli, config, generate  # noqa: E402
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


def batch_command(scratch: Path, *arguments: str) -> list[str]:
    """``batch_processor.py`` as a user or the Airflow DAG runs it, on the scratch directories only
    (its own speed view too, so the real one is never pruned)."""
    return [sys.executable, str(PROJECT_ROOT / "batch_processor.py"), "--master-dir", str(scratch / "master"),
            "--views-dir", str(scratch / "views"), "--speed-dir", str(scratch / "speed"), *arguments]


def recompute_command(scratch: Path, workers: int, decoder: str = "polars") -> list[str]:
    return batch_command(scratch, "recompute", "--workers", str(workers), "--keep", "1", "--decoder", decoder)


def import_command(scratch: Path, files: list[Path]) -> list[str]:
    """Every trip of ``files`` into the scratch master data (no cutoff: none is left for a stream)."""
    return batch_command(scratch, "import", *map(str, files), "--cutoff", "none")


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


def ensure_csv(rows: int, seed: int, layout: str = "kaggle") -> tuple[Path, float | None]:
    """The generated CSV for ``rows`` trips in ``layout``, made now (timed) unless it is already there."""
    template = generate.OUT_TEMPLATE if layout == "kaggle" else generate.ZONES_OUT_TEMPLATE
    path = generate.out_path(template, rows, seed)
    if path.exists():
        print(f"reusing {path}")
        return path, None
    started = time.perf_counter()
    generate.main(["--rows", str(rows), "--seed", str(seed), "--layout", layout, "--out", str(path), "--quiet"])
    return path, round(time.perf_counter() - started, 2)


def ensure_inputs(setup: Config, seed: int, layout: str) -> tuple[list[Path], float | None]:
    """The generated CSV of the distinct trips and the CSV of the copies (if any), in import order,
    made now (timed) unless they are there."""
    started = time.perf_counter()
    distinct, generate_s = ensure_csv(setup.distinct, seed, layout)
    made = generate_s is not None
    if not setup.copies:
        return [distinct], generate_s
    copies = distinct.with_name(f"{distinct.stem}-copies-{setup.copies}.csv")
    if copies.exists():
        print(f"reusing {copies}")
    else:
        write_copies(distinct, copies, setup.copies / setup.distinct, seed)
        made = True
    return [distinct, copies], round(time.perf_counter() - started, 2) if made else None


def count_trips(files: list[Path]) -> tuple[int, int]:
    """Data rows of the CSV files and how many of them differ (by a 64-bit hash of each line).

    What a recompute must find: a Kaggle row's id is unique, so only the
    copies repeat; a zone-era row's id is derived from its content, so two
    generated trips identical in every column are one trip too.
    """
    seen: set[int] = set()
    rows = 0
    for path in files:
        with open(path, "rb") as handle:
            next(handle, None)
            for line in handle:
                seen.add(hash(line.rstrip(b"\r\n")))
                rows += 1
    return rows, len(seen)


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


def import_dataset(setup: Config, layout: str, seed: int, scratch: Path) -> dict[str, Any]:
    """Generate (or reuse) the configuration's files in ``layout`` and import them into a fresh
    master dataset under ``scratch``, measured; what the recompute must find comes with it."""
    files, generate_s = ensure_inputs(setup, seed, layout)
    rows, distinct = count_trips(files)
    scratch.mkdir(parents=True)
    print(f"{setup.label}, {layout}: importing {' and '.join(f.name for f in files)} ...", flush=True)
    measured = run_measured(import_command(scratch, files), scratch / "import.log")
    master = master_files(scratch / "master")
    master_mb = sum(path.stat().st_size for path in master) / MB
    print(f"  imported {rows:,} trips in {measured['wall_s']:.1f} s, peak RSS {measured['peak_rss_total_mb']:,.0f} "
          f"MB, into {len(master)} Avro files ({master_mb:,.0f} MB); {rows - distinct:,} duplicates; other "
          f"processes used {measured['others_cpu_s']:.1f} CPU-s meanwhile", flush=True)
    return {"csv": [str(path) for path in files], "generate_s": generate_s, "master_rows": rows,
            "distinct": distinct, "duplicates": rows - distinct, "import": measured,
            "master_files": len(master), "master_mb": round(master_mb, 1)}


def recompute_once(scratch: Path, dataset: dict[str, Any], workers: int, decoder: str, log: Path) -> dict[str, Any]:
    """One measured recompute, checked against the counts of the imported files."""
    result = run_measured(recompute_command(scratch, workers, decoder), log)
    manifest = published_manifest(scratch / "views")
    rows = manifest["rows"]
    if rows["master"] != dataset["master_rows"] or rows["duplicates"] != dataset["duplicates"]:
        raise RuntimeError(f"{decoder}: the manifest counts {rows}, expected {dataset['master_rows']:,} "
                           f"master rows and {dataset['duplicates']:,} duplicates")
    result.update({f"{step}_s": seconds for step, seconds in manifest["timings_s"].items()})
    result.update({key: rows[key] for key in ("distinct", "duplicates", "clean")})
    return result


def bench_config(setup: Config, repeat: int, workers: int, layouts: list[str], decoders: list[str], seed: int,
                 work_dir: Path) -> dict[str, Any]:
    """Import once per layout, then recompute ``repeat`` times per layout and decoder, alternating."""
    scratch = Path(tempfile.mkdtemp(prefix=f"periscope-bench-{setup.rows}-", dir=work_dir))
    try:
        datasets = {layout: import_dataset(setup, layout, seed, scratch / layout) for layout in layouts}
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {
            (layout, decoder): [] for layout in layouts for decoder in decoders}
        for run in range(1, repeat + 1):
            for (layout, decoder), done in runs.items():
                result = recompute_once(scratch / layout, datasets[layout], workers, decoder,
                                        scratch / layout / f"recompute-{decoder}-{run}.log")
                done.append(result)
                print(f"  {layout:<12} {decoder:<8} run {run}/{repeat}: {result['wall_s']:.2f} s wall, "
                      f"{result['cpu_s']:.1f} s CPU, peak RSS {result['peak_rss_total_mb']:,.0f} MB over "
                      f"{result['processes']} process(es); other processes used {result['others_cpu_s']:.1f} "
                      f"CPU-s meanwhile", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for layout, dataset in datasets.items():
        dataset["decoders"] = {decoder: {"runs": runs[layout, decoder], "median": medians(runs[layout, decoder])}
                               for decoder in decoders}
    return {"rows": setup.rows, "duplicates_share": setup.duplicates, "workers": workers, "layouts": datasets}


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    numbers = [key for key, value in runs[0].items() if isinstance(value, (int, float))]
    return {key: statistics.median(run[key] for run in runs) for key in numbers}


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target for each layout, what the polars decoder measured, and whether it is met."""
    checks = []
    for result in results:
        wall_target, peak_target = TARGETS.get(result["rows"], (None, None))
        for layout, dataset in result["layouts"].items():
            polars = dataset["decoders"].get("polars")
            if polars is None:
                continue
            label = f"{result['rows']:,} trips, {result['duplicates_share']:.0%} duplicates, {layout}"
            wall, peak = polars["median"]["wall_s"], polars["median"]["peak_rss_total_mb"]
            if wall_target is not None:
                checks.append({"target": f"{label}: recompute <= {wall_target:.0f} s wall (median)",
                               "measured": f"{wall:.2f} s", "met": wall <= wall_target})
            if peak_target is not None:
                checks.append({"target": f"{label}: recompute <= {peak_target / 1000:.0f} GB peak RSS (median)",
                               "measured": f"{peak:,.0f} MB", "met": peak <= peak_target})
    return checks


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """One line per configuration, layout and decoder, medians of its runs, and the speed-up of polars."""
    lines = [f"{'trips':>11} {'dups':>5} {'layout':<12} {'decoder':<8} {'runs':>4} {'wall s':>7} {'(range)':>11} "
             f"{'CPU s':>6} {'read s':>6} {'dedupe s':>8} {'agg s':>6} {'write s':>7} {'peak RSS MB':>11} "
             f"{'others CPU-s':>12}"]
    for r in results:
        for layout, dataset in r["layouts"].items():
            for decoder, data in dataset["decoders"].items():
                m, walls = data["median"], [run["wall_s"] for run in data["runs"]]
                lines.append(f"{r['rows']:>11,} {r['duplicates_share']:>5.0%} {layout:<12} {decoder:<8} "
                             f"{len(walls):>4} {m['wall_s']:>7.2f} {f'{min(walls):.1f}-{max(walls):.1f}':>11} "
                             f"{m['cpu_s']:>6.1f} {m['read_s']:>6.2f} {m['drop_duplicates_s']:>8.2f} "
                             f"{m['clean_and_aggregate_s']:>6.2f} {m['write_s']:>7.2f} "
                             f"{m['peak_rss_total_mb']:>11,.0f} {m['others_cpu_s']:>12.1f}")
            if {"polars", "fastavro"} <= set(dataset["decoders"]):
                fast, slow = (dataset["decoders"][d]["median"]["wall_s"] for d in ("polars", "fastavro"))
                lines.append(f"{'':>11} {'':>5} {layout:<12} polars is {slow / fast:.1f}x faster than fastavro "
                             "(median wall)")
    return lines


def imports_table(results: list[dict[str, Any]]) -> list[str]:
    """One line per configuration and layout: the import, and the master data it made."""
    lines = [f"{'trips':>11} {'dups':>5} {'layout':<12} {'wall s':>7} {'CPU s':>6} {'peak RSS MB':>11} "
             f"{'files':>5} {'master MB':>9} {'duplicates':>10} {'others CPU-s':>12}"]
    for r in results:
        for layout, d in r["layouts"].items():
            i = d["import"]
            lines.append(f"{r['rows']:>11,} {r['duplicates_share']:>5.0%} {layout:<12} {i['wall_s']:>7.1f} "
                         f"{i['cpu_s']:>6.1f} {i['peak_rss_total_mb']:>11,.0f} {d['master_files']:>5} "
                         f"{d['master_mb']:>9,.0f} {d['duplicates']:>10,} {i['others_cpu_s']:>12.1f}")
    return lines


def layout_ratios(results: list[dict[str, Any]], layout: str = "yellow_zones",
                  reference: str = "kaggle") -> list[str]:
    """Per configuration, ``layout`` / ``reference``: the import, and the recompute per decoder (medians)."""
    lines = []
    for r in results:
        if not {layout, reference} <= set(r["layouts"]):
            continue
        new, old = r["layouts"][layout], r["layouts"][reference]
        ratio = {key: new["import"][key] / old["import"][key] for key in ("wall_s", "peak_rss_total_mb")}
        label = f"{r['rows']:,} trips, {r['duplicates_share']:.0%} duplicates"
        lines.append(f"{label}: import {ratio['wall_s']:.2f}x wall, {ratio['peak_rss_total_mb']:.2f}x peak RSS")
        for decoder in new["decoders"]:
            a, b = new["decoders"][decoder]["median"], old["decoders"][decoder]["median"]
            lines.append(f"{label}: recompute ({decoder}) {a['wall_s'] / b['wall_s']:.2f}x wall, "
                         f"{a['cpu_s'] / b['cpu_s']:.2f}x CPU, "
                         f"{a['peak_rss_total_mb'] / b['peak_rss_total_mb']:.2f}x peak RSS")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_batch",
        description="Benchmark the batch layer's import and recompute on generated trips with duplicates: wall "
                    "time and memory, polars decoder against fastavro, Kaggle layout against the TLC zone era.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="ROWS:SHARE, comma-separated: master rows and the share of them that are duplicates")
    parser.add_argument("--layouts", default="kaggle",
                        help="file layouts of the same generated trips, comma-separated, from: "
                             f"{', '.join(generate.LAYOUTS)}; each is imported into its own master dataset, "
                             "and their recomputes alternate run by run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="recompute runs per configuration, layout and decoder (the import runs once)")
    parser.add_argument("--decoder", choices=[*DECODERS, "both"],
                        help="which decoder(s) to run; both alternate run by run (default: both with one "
                             "layout; polars with several, the layouts being the comparison then)")
    parser.add_argument("--workers", type=int, default=2, help="batch_processor recompute --workers")
    parser.add_argument("--seed", type=int, default=7,
                        help="generator seed; generated files are reused per layout, size and seed")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary master datasets go (removed afterwards); needs ~60 bytes per "
                             "trip and layout")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON result file is written")
    args = parser.parse_args(argv)
    try:
        args.configs = parse_configs(args.configs)
    except ValueError as error:
        parser.error(str(error))
    args.layouts = list(dict.fromkeys(name.strip() for name in args.layouts.split(",") if name.strip()))
    unknown = [name for name in args.layouts if name not in generate.LAYOUTS]
    if unknown or not args.layouts:
        parser.error(f"--layouts must name one or more of {', '.join(generate.LAYOUTS)}; got {unknown or 'none'}")
    for flag, minimum in (("repeat", 1), ("workers", 1), ("seed", 0)):
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag} must be at least {minimum}, got {getattr(args, flag)}")
    if not args.work_dir.is_dir():
        parser.error(f"--work-dir {args.work_dir} is not a directory")
    if args.decoder is None:
        args.decoder = "both" if len(args.layouts) == 1 else "polars"
    args.decoders = list(DECODERS) if args.decoder == "both" else [args.decoder]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = print_machine()
    machine["libraries"]["polars"] = metadata.version("polars")
    print(f"batch benchmark: {', '.join(c.label for c in args.configs)}; layouts {', '.join(args.layouts)}; "
          f"{args.repeat} run(s) per layout and decoder ({', '.join(args.decoders)}), --workers {args.workers}, "
          f"seed {args.seed}\n")
    results = [bench_config(setup, args.repeat, args.workers, args.layouts, args.decoders, args.seed,
                            args.work_dir) for setup in args.configs]

    print("\nimport (one run each; peak RSS = sum over the process and its children)")
    for line in imports_table(results):
        print("  " + line)
    print("\nrecompute (medians over runs; peak RSS = sum over the process and its children)")
    for line in results_table(results):
        print("  " + line)
    ratios = layout_ratios(results)
    if ratios:
        print("\nzone era / Kaggle layout, the same trips")
    for line in ratios:
        print("  " + line)
    checks = verdicts(results)
    for check in checks:
        print(f"  {'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['measured']}")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.results_dir / f"batch-{stamp}.json"
    load_after = [round(load, 2) for load in os.getloadavg()]
    print(f"load average after the run {' / '.join(f'{load:.2f}' for load in load_after)} (1/5/15 min)")
    document = {"benchmark": "batch", "argv": sys.argv[1:] if argv is None else argv, "machine": machine,
                "data_dir": str(config.DATA_DIR), "results": results, "targets": checks,
                "load_average_after": load_after}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
