"""Benchmark of both Spark paths: the Spark speed layer's latency and throughput, and the Spark batch engine.

Everything runs as a user runs it, as child processes (``python spark_streaming.py``,
``python batch_processor.py ... recompute --engine ...``), on ``SPARK_MASTER``
(``local[*]`` unless set), against a private Kafka broker that the benchmark
starts and stops (temporary state dir, free ports, the project's Maven-fetched jars).

1. **Latency** (``--rate``, ``--duration``): a ``spark_streaming.py --no-windows``
   process waits on a fresh topic; ``kafka_producer.py --rate R`` sends for
   ``--duration`` seconds. A trip's latency is ``visible_at_ms`` (its speed
   file appeared) minus its Kafka timestamp (the producer sent it); p50/p99
   over the trips sent after ``--warmup`` seconds.
2. **Throughput** (``--trips``): the topic is filled first, then one
   ``spark_streaming.py --no-windows`` drains it; the rate is the trips over
   the time spent in micro-batches (the status file's ``spark.busy_s``: from a
   batch's start to its files, summed), so Spark's start-up and the idle wait
   at the end are left out (the process's wall time is reported beside it).
3. **Batch recompute** (``--sizes``): for each size, generated trips
   (``periscope.generate``, reused from ``data/generated/``) are imported once
   into a scratch master dataset, then recomputed ``--repeat`` times by each
   engine, alternately: wall time from start to exit (JVM and Python start-up
   included), CPU time, peak RSS of the process tree (the JVM and Spark's
   Python workers included). Both engines' results are checked equal. Beside
   them, ``python -m periscope.spark_session start`` (a session and a one-line
   job, no trips): the floor under any Spark recompute on that master.

Run it (needs a trained model, ``python train_model.py``, and Spark's Kafka and Avro
connectors, ``make spark-fetch``)::

    python bench/bench_spark.py                                            # 1.5 M and 10 M trips; ~30 min
    python bench/bench_spark.py --sizes 100000 --trips 20000 --duration 20 # a quick check
    python bench/bench_spark.py --parts batch --sizes 1500000 --repeat 3

Results are printed and written to ``bench/results/spark-<time>.json``.
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

if __package__ in (None, ""):  # run as a file: python bench/bench_spark.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batch_processor  # noqa: E402
from bench.bench_batch import ensure_csv, parse_counts, recompute_command, run_measured  # noqa: E402
from bench.bench_speed_layer import latency_summary, produce, wait_with_usage  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from periscope import config, generate, kafka_local, speed_tuning, speed_view, storage, views  # noqa: E402
from periscope.model import current_version  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
PARTS = ("latency", "throughput", "batch")
ENGINES = ("python", "spark")
SPARK_START = [sys.executable, "-m", "periscope.spark_session", "start"]
"""Spark's start alone: a session and a one-line job, no trips. The least any Spark recompute costs."""
DRAIN_IDLE_S = 3.0
LATENCY_IDLE_S = 30.0  # the producer may take 10 s to start on a busy machine


# --- the speed layer -----------------------------------------------------------------------------------


def start_spark_streaming(bootstrap: str, topic: str, work: Path, model_dir: Path, name: str,
                          idle_s: float, max_offsets: int) -> tuple[subprocess.Popen, Path, Path]:
    speed_dir, log = work / f"speed-{name}", work / f"spark-{name}.log"
    command = [sys.executable, "spark_streaming.py", "--bootstrap", bootstrap, "--topic", topic,
               "--dlq-topic", f"{topic}-dlq", "--speed-dir", str(speed_dir), "--model-dir", str(model_dir),
               "--checkpoint-dir", str(work / f"checkpoint-{name}"), "--no-windows", "--stop-when-idle", str(idle_s),
               "--max-offsets-per-trigger", str(max_offsets)]
    with open(log, "ab") as output:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)
    return process, speed_dir, log


def wait_until_running(speed_dir: Path, process: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> float:
    """Seconds until the job publishes its first status (Spark and both queries are up)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"spark_streaming.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if speed_view.read_statuses(speed_dir):
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"spark_streaming.py did not start within {timeout_s:.0f} s; see {log}")


def bench_latency(bootstrap: str, work: Path, model_dir: Path, rate: int, duration_s: float, warmup_s: float,
                  max_offsets: int) -> dict[str, Any]:
    topic = f"bench-spark-latency-{rate}"
    kafka_local.ensure_topics(bootstrap, {topic: 3, f"{topic}-dlq": 1})
    process, speed_dir, log = start_spark_streaming(bootstrap, topic, work, model_dir, f"latency-{rate}",
                                                    LATENCY_IDLE_S, max_offsets)
    startup_s = wait_until_running(speed_dir, process, log)
    trips = int(rate * duration_s)
    produce_s = produce(bootstrap, topic, trips, work / f"producer-{rate}.log", rate=rate)
    cpu_s = wait_with_usage(process, log)
    rows = speed_view.read_speed(speed_dir)
    result = {"rate_per_s": rate, "trips": trips, "produce_s": round(produce_s, 2), "rows": len(rows),
              "startup_s": round(startup_s, 1), "process_cpu_s": round(cpu_s, 1),
              "speed_files": len(speed_view.batch_files(speed_dir)), **latency_summary(rows, warmup_s)}
    print(f"  {rate:,} trips/s for {duration_s:.0f} s (achieved {result['achieved_rate_per_s']:,}/s): latency p50 "
          f"{result['p50_ms']:,.0f} ms, p99 {result['p99_ms']:,.0f} ms, max {result['max_ms']:,} ms; "
          f"{result['speed_files']} files; Spark up in {startup_s:.0f} s", flush=True)
    return result


def bench_throughput(bootstrap: str, work: Path, model_dir: Path, trips: int, max_offsets: int) -> dict[str, Any]:
    topic = "bench-spark-throughput"
    kafka_local.ensure_topics(bootstrap, {topic: 3, f"{topic}-dlq": 1})
    produce_s = produce(bootstrap, topic, trips, work / "producer-throughput.log")
    print(f"  produced {trips:,} trips in {produce_s:.1f} s", flush=True)
    started = time.perf_counter()
    process, speed_dir, log = start_spark_streaming(bootstrap, topic, work, model_dir, "throughput", DRAIN_IDLE_S,
                                                    max_offsets)
    cpu_s = wait_with_usage(process, log)
    wall_s = time.perf_counter() - started
    rows = speed_view.read_speed(speed_dir)
    status = speed_view.read_statuses(speed_dir)[0]
    consumed = status["totals"]["consumed"]
    if consumed != trips or len(rows) != status["totals"]["valid"]:
        raise RuntimeError(f"consumed {consumed:,} of {trips:,} trips, {len(rows):,} rows; see {log}")
    busy_s = status["spark"]["busy_s"]
    result = {"trips": trips, "valid": len(rows), "trips_per_s": round(consumed / busy_s), "busy_s": busy_s,
              "process_wall_s": round(wall_s, 1), "process_cpu_s": round(cpu_s, 1),
              "micro_batches": status["spark"]["batches"], "max_offsets_per_trigger": max_offsets}
    print(f"  {result['trips_per_s']:,} trips/s while processing micro-batches ({busy_s:.1f} s); process "
          f"{wall_s:.0f} s wall "
          f"(Spark start-up and {DRAIN_IDLE_S:.0f} s idle wait included), {cpu_s:.0f} CPU s in this process "
          f"(the JVM's and workers' CPU is not counted there); {result['micro_batches']} micro-batches", flush=True)
    return result


# --- the batch layer -----------------------------------------------------------------------------------


def bench_batch_size(rows: int, repeat: int, workers: int, seed: int, work: Path) -> dict[str, Any]:
    csv, _ = ensure_csv(rows, seed)
    scratch = Path(tempfile.mkdtemp(prefix=f"periscope-bench-spark-{rows}-", dir=work))
    try:
        started = time.perf_counter()
        batch_processor.import_csv(csv, scratch / "master")
        import_s = time.perf_counter() - started
        files = storage.master_files(scratch / "master")
        print(f"  {rows:,} trips imported in {import_s:.0f} s into {len(files)} master files", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in (*ENGINES, "spark start")}
        published: dict[str, Any] = {}
        for run in range(1, repeat + 1):
            for engine in ENGINES:
                command = recompute_command(scratch, workers) + ["--engine", engine]
                result = run_measured(command, scratch / f"{engine}-{run}.log")
                published[engine] = storage.read_version(scratch / "views")
                result.update({f"{step}_s": s for step, s in published[engine][1]["timings_s"].items()})
                result["compute_s"] = sum(s for step, s in published[engine][1]["timings_s"].items()
                                          if step != "write")
                runs[engine].append(result)
                print(f"  {engine:>6} run {run}/{repeat}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.0f} CPU s, "
                      f"peak RSS {result['peak_rss_total_mb']:,.0f} MB over {result['processes']} processes; "
                      f"others used {result['others_cpu_s']:.0f} CPU s", flush=True)
            runs["spark start"].append(run_measured(SPARK_START, scratch / f"start-{run}.log"))
            print(f"  Spark start alone (a session, a one-line job) run {run}/{repeat}: "
                  f"{runs['spark start'][-1]['wall_s']:.1f} s wall", flush=True)
        if not views.views_equal(published["python"][0], published["spark"][0]):
            raise RuntimeError(f"the engines disagree on {rows:,} trips")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": rows, "master_files": len(files), "import_s": round(import_s, 1), "workers": workers,
            "views_equal": True, "runs": runs,
            "median": {engine: {key: statistics.median(r[key] for r in results)
                                for key in results[0] if isinstance(results[0][key], (int, float))}
                       for engine, results in runs.items()}}


def batch_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'trips':>11} {'engine':>7} {'wall s':>7} {'CPU s':>6} {'compute s':>10} {'peak RSS MB':>11} "
             f"{'procs':>5}"]
    for result in results:
        for engine in ENGINES:
            m = result["median"][engine]
            lines.append(f"{result['rows']:>11,} {engine:>7} {m['wall_s']:>7.1f} {m['cpu_s']:>6.0f} "
                         f"{m['compute_s']:>10.1f} {m['peak_rss_total_mb']:>11,.0f} {m['processes']:>5.0f}")
        start = result["median"]["spark start"]
        lines.append(f"{'':>11} {'start':>7} {start['wall_s']:>7.1f} {start['cpu_s']:>6.0f} {'':>10} "
                     f"{start['peak_rss_total_mb']:>11,.0f} {start['processes']:>5.0f}   (Spark start alone)")
    return lines


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_spark.py",
        description="Benchmark spark_streaming.py (latency, throughput) and batch_processor.py --engine spark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to run, comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--rate", type=int, default=1000, help="producer rate (trips/s) of the latency run")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the latency run produces for")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds at the start of the latency run not measured")
    parser.add_argument("--trips", type=int, default=200_000, help="trips pre-produced for the throughput run")
    parser.add_argument("--max-offsets-per-trigger", type=int, default=speed_tuning.MAX_OFFSETS_PER_TRIGGER,
                        help="spark_streaming.py --max-offsets-per-trigger")
    parser.add_argument("--sizes", default="1500000,10000000", help="batch sizes (trips), comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="recompute runs per engine and size (medians reported)")
    parser.add_argument("--workers", type=int, default=2, help="the python engine's worker processes")
    parser.add_argument("--seed", type=int, default=7, help="generator seed; generated files are reused")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where scratch master data go (removed afterwards); needs ~50 bytes per trip")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="trained model the speed layer uses (env PERISCOPE_MODEL_DIR)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON result goes")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown or not args.parts:
        parser.error(f"--parts: unknown {unknown or 'nothing given'}; choose from {', '.join(PARTS)}")
    try:
        args.sizes = parse_counts(args.sizes, "--sizes")
    except ValueError as error:
        parser.error(str(error))
    if max(args.sizes) > generate.MAX_ROWS:
        parser.error(f"--sizes: at most {generate.MAX_ROWS:,} trips per size")
    if args.rate < 1 or args.trips < 1000 or args.repeat < 1 or args.workers < 1:
        parser.error("--rate and --repeat and --workers must be at least 1, --trips at least 1000")
    if args.duration <= args.warmup + 2:
        parser.error(f"--duration ({args.duration:g} s) must exceed --warmup ({args.warmup:g} s) by at least 2 s")
    if {"latency", "throughput"} & set(args.parts) and current_version(args.model_dir) is None:
        parser.error(f"no trained model in {args.model_dir}: run `python train_model.py` first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = print_machine()
    print(f"Spark master {config.SPARK_MASTER}; parts {', '.join(args.parts)}\n", flush=True)
    document: dict[str, Any] = {"benchmark": "spark", "argv": sys.argv[1:] if argv is None else argv,
                                "machine": machine, "spark_master": config.SPARK_MASTER}
    work = Path(tempfile.mkdtemp(prefix="periscope-bench-spark-", dir=args.work_dir))
    try:
        if {"latency", "throughput"} & set(args.parts):
            port, controller_port = kafka_local.free_ports(2)
            libs = kafka_local.BrokerFiles.of(kafka_local.default_state_dir()).libs
            broker = kafka_local.start_broker(work / "state", port, controller_port, libs_dir=libs)
            print(f"private Kafka broker at {broker.bootstrap}; work dir {work}", flush=True)
            try:
                if "latency" in args.parts:
                    print(f"speed layer latency at {args.rate:,} trips/s (Kafka timestamp -> speed file visible)")
                    document["latency"] = bench_latency(broker.bootstrap, work, args.model_dir, args.rate,
                                                        args.duration, args.warmup, args.max_offsets_per_trigger)
                if "throughput" in args.parts:
                    print(f"speed layer throughput: {args.trips:,} pre-produced trips, one spark_streaming.py")
                    document["throughput"] = bench_throughput(broker.bootstrap, work, args.model_dir, args.trips,
                                                              args.max_offsets_per_trigger)
            finally:
                kafka_local.stop_broker(work / "state")
        if "batch" in args.parts:
            print(f"batch recompute, python engine ({args.workers} workers) vs spark engine, sizes {args.sizes}")
            document["batch"] = [bench_batch_size(rows, args.repeat, args.workers, args.seed, work)
                                 for rows in args.sizes]
            print()
            for line in batch_table(document["batch"]):
                print("  " + line)
    except BaseException:
        print(f"\nthe benchmark failed; logs are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"spark-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
