"""Benchmark of the plain-Python speed layer: throughput of one process, and end-to-end latency.

Both parts run against a private Kafka broker that the benchmark starts
(temporary state dir, free ports, the project's Maven-fetched jars) and stops,
and both run the speed layer exactly as a user does: ``python kafka_consumer.py``.

1. **Throughput.** ``kafka_producer.py --loop`` first fills a fresh topic with
   N real trips (the shipped sample, looped with unique ids). Then one consumer
   process drains it (``--stop-when-idle``), ``--repeat`` times, each run in a
   new consumer group with a new speed dir. The rate is measured from the first
   speed file to the last (so starting Python, loading the model and the idle
   wait at the end are left out; they are reported beside it), and the
   process's CPU time per trip is reported too: on a shared machine it is
   steadier than wall time. The start-up CPU comes from one run on an empty topic.
2. **Latency.** With a consumer running, ``kafka_producer.py --rate R`` sends
   for ``--duration`` seconds at 1,000 and at 5,000 trips/s. A trip's latency
   is ``visible_at_ms`` (its speed file appeared) minus its Kafka timestamp
   (the producer sent it); p50 and p99 are over the trips sent after the first
   ``--warmup`` seconds.

Targets: at least 20,000 trips/s per process; p99 at most 1 s at 5,000 trips/s.

Run it (about four minutes; it needs a trained model: ``python train_model.py``)::

    python -m bench.bench_speed_layer
    python -m bench.bench_speed_layer --trips 50000 --repeat 1 --duration 10    # a quick check
    python -m bench.bench_speed_layer --brokers 1,3    # single broker vs three-broker cluster

With ``--brokers 1,3`` both run (``bench.brokers``), the throughput runs
alternate between them, and the ratios cluster/single are printed; the
targets are checked on the first.

Results are printed and written to ``bench/results/speed_layer.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a file: python bench/bench_speed_layer.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import brokers  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from periscope import config, kafka_local, speed_view  # noqa: E402
from periscope import speed_tuning as tuning  # noqa: E402
from periscope.model import current_version  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = PROJECT_ROOT / "bench" / "results" / "speed_layer.json"
TARGET_TRIPS_PER_S = 20_000
TARGET_P99_MS = 1000.0
TARGET_RATE = 5000
DRAIN_IDLE_S = 2.0
LATENCY_IDLE_S = 30.0
"""A latency run's consumer waits this long for the producer to start (Python and the CSV load take seconds)."""


# --- processes -----------------------------------------------------------------------------------


def wait_with_usage(process: subprocess.Popen, log: Path) -> float:
    """Wait for a child and return the CPU seconds (user + system) it used; raise if it failed."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {process.returncode}:\n"
                           f"{log.read_text()[-3000:]}")
    return usage.ru_utime + usage.ru_stime


def produce(bootstrap: str, topic: str, trips: int, log: Path, rate: float | None = None) -> float:
    """Send ``trips`` real trips with kafka_producer.py (as fast as it can, or at ``rate``); returns seconds."""
    command = [sys.executable, "kafka_producer.py", "--bootstrap", bootstrap, "--topic", topic,
               "--limit", str(trips), "--loop", "--progress", "0"]
    if rate is not None:
        command += ["--rate", str(rate)]
    started = time.perf_counter()
    with open(log, "ab") as output:
        wait_with_usage(subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT), log)
    return time.perf_counter() - started


def start_consumer(bootstrap: str, topic: str, group: str, speed_dir: Path, model_dir: Path,
                   log: Path, idle_s: float = DRAIN_IDLE_S) -> subprocess.Popen:
    command = [sys.executable, "kafka_consumer.py", "--bootstrap", bootstrap, "--topic", topic,
               "--dlq-topic", f"{topic}-dlq", "--group", group, "--speed-dir", str(speed_dir),
               "--model-dir", str(model_dir), "--stop-when-idle", str(idle_s), "--consumer-id", "bench"]
    with open(log, "ab") as output:
        return subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)


def wait_until_assigned(speed_dir: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s.get("assigned_partitions") for s in speed_view.read_statuses(speed_dir)):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the consumer did not get partitions within {timeout_s:.0f} s")


# --- measurements (pure) ---------------------------------------------------------------------------


def drain_rate(rows: pd.DataFrame, consumed: int) -> float:
    """Trips per second from the first speed file to the last.

    The rows of the first file(s) were processed before the clock starts, so
    they are not counted; the rest is scaled by consumed/valid, because the
    dead-lettered trips were processed too.
    """
    visible = rows["visible_at_ms"].to_numpy()
    first, last = visible.min(), visible.max()
    counted = int((visible > first).sum())
    return counted / ((last - first) / 1000.0) * consumed / len(rows)


def latency_summary(rows: pd.DataFrame, warmup_s: float) -> dict[str, Any]:
    """End-to-end latency percentiles (ms) of the trips sent after the warm-up, and the rate achieved."""
    sent = rows["kafka_timestamp_ms"].to_numpy()
    kept = sent >= sent.min() + warmup_s * 1000
    latency = (rows["visible_at_ms"].to_numpy() - sent)[kept]
    span_s = (sent[kept].max() - sent[kept].min()) / 1000.0
    p50, p95, p99 = np.percentile(latency, [50, 95, 99])
    return {"trips_measured": int(kept.sum()), "achieved_rate_per_s": round(kept.sum() / span_s),
            "p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1),
            "max_ms": int(latency.max()), "mean_ms": round(float(latency.mean()), 1)}


# --- the two parts ------------------------------------------------------------------------------------


def prepare_throughput(bootstrap: str, work: Path, model_dir: Path, trips: int) -> dict[str, Any]:
    """Fill a fresh topic with ``trips`` trips, and measure a consumer's start-up CPU on an empty one."""
    topic = "bench-throughput"
    kafka_local.ensure_topics(bootstrap, {topic: 3, f"{topic}-dlq": 1, "bench-empty": 3, "bench-empty-dlq": 1})
    produce_s = produce(bootstrap, topic, trips, work / "producer.log")
    print(f"  produced {trips:,} trips in {produce_s:.1f} s ({trips / produce_s:,.0f} trips/s)")
    empty = start_consumer(bootstrap, "bench-empty", "empty", work / "speed-empty", model_dir, work / "empty.log")
    startup_cpu_s = wait_with_usage(empty, work / "empty.log")
    print(f"  start-up and idle wait on an empty topic: {startup_cpu_s:.1f} CPU s")
    return {"topic": topic, "trips": trips, "produce_s": round(produce_s, 2), "startup_cpu_s": round(startup_cpu_s, 2),
            "runs": []}


def throughput_run(bootstrap: str, work: Path, model_dir: Path, prepared: dict[str, Any], run: int) -> None:
    """One consumer process drains the prepared topic in a new group; the run is appended to prepared."""
    trips, topic = prepared["trips"], prepared["topic"]
    speed_dir, log = work / f"speed-{run}", work / f"consumer-{run}.log"
    started = time.perf_counter()
    cpu_s = wait_with_usage(start_consumer(bootstrap, topic, f"run-{run}", speed_dir, model_dir, log), log)
    wall_s = time.perf_counter() - started
    rows = speed_view.read_speed(speed_dir)
    status = speed_view.read_statuses(speed_dir)[0]
    consumed = status["totals"]["consumed"]
    if consumed != trips or len(rows) != status["totals"]["valid"]:
        raise RuntimeError(f"run {run}: consumed {consumed:,} of {trips:,} trips, {len(rows):,} rows")
    result = {"run": run, "trips": consumed, "valid": len(rows), "dlq": status["totals"]["dlq"],
              "trips_per_s": round(drain_rate(rows, consumed)), "process_wall_s": round(wall_s, 2),
              "process_cpu_s": round(cpu_s, 2),
              "cpu_us_per_trip": round((cpu_s - prepared["startup_cpu_s"]) / consumed * 1e6, 1),
              "speed_files": len(speed_view.batch_files(speed_dir)),
              "load_average_1min": round(os.getloadavg()[0], 2)}
    prepared["runs"].append(result)
    prepared["median_trips_per_s"] = round(statistics.median(r["trips_per_s"] for r in prepared["runs"]))
    prepared["median_cpu_us_per_trip"] = statistics.median(r["cpu_us_per_trip"] for r in prepared["runs"])
    print(f"  run {run}: {result['trips_per_s']:,} trips/s from first to last file; process {wall_s:.1f} s "
          f"wall, {cpu_s:.1f} CPU s ({result['cpu_us_per_trip']:.0f} CPU us per trip after start-up); "
          f"{result['speed_files']} files; load {result['load_average_1min']}")


def bench_latency(bootstrap: str, work: Path, model_dir: Path, rate: int, duration_s: float,
                  warmup_s: float) -> dict[str, Any]:
    topic = f"bench-latency-{rate}"
    kafka_local.ensure_topics(bootstrap, {topic: 3, f"{topic}-dlq": 1})
    speed_dir, log = work / f"speed-latency-{rate}", work / f"consumer-latency-{rate}.log"
    consumer = start_consumer(bootstrap, topic, f"latency-{rate}", speed_dir, model_dir, log, LATENCY_IDLE_S)
    wait_until_assigned(speed_dir)
    trips = int(rate * duration_s)
    produce_s = produce(bootstrap, topic, trips, work / f"producer-{rate}.log", rate=rate)
    wait_with_usage(consumer, log)
    rows = speed_view.read_speed(speed_dir)
    result = {"rate_per_s": rate, "trips": trips, "produce_s": round(produce_s, 2), "rows": len(rows),
              "speed_files": len(speed_view.batch_files(speed_dir)),
              "load_average_1min": round(os.getloadavg()[0], 2), **latency_summary(rows, warmup_s)}
    print(f"  {rate:,} trips/s for {duration_s:.0f} s (achieved {result['achieved_rate_per_s']:,}/s): latency p50 "
          f"{result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, max {result['max_ms']} ms; "
          f"{result['speed_files']} files")
    return result


# --- command line -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_speed_layer",
        description="Throughput per process and end-to-end latency of kafka_consumer.py on a private broker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trips", type=int, default=200_000, help="trips pre-produced for the throughput runs")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs (the median is reported)")
    parser.add_argument("--rates", default="1000,5000", help="producer rates (trips/s) of the latency runs")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds each latency run produces for")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds at the start of a latency run not measured")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="trained model the consumer uses (env PERISCOPE_MODEL_DIR)")
    parser.add_argument("--brokers", default="1",
                        help="private Kafka to run against: 1 (the single broker), 3 (a three-broker cluster, "
                             "RF 3, min ISR 2) or 1,3 (both, throughput runs alternated between them)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="JSON result file")
    args = parser.parse_args(argv)
    try:
        args.brokers = brokers.parse_broker_counts(args.brokers)
    except ValueError as error:
        parser.error(str(error))
    try:
        args.rates = [int(part) for part in args.rates.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--rates must be comma-separated whole numbers, got {args.rates!r}")
    if args.trips < 1000 or args.repeat < 1 or not args.rates or min(args.rates) < 1:
        parser.error("--trips must be at least 1000, --repeat at least 1, and every rate at least 1")
    if args.duration <= args.warmup + 2:
        parser.error(f"--duration ({args.duration:g} s) must exceed --warmup ({args.warmup:g} s) by at least 2 s")
    if current_version(args.model_dir) is None:
        parser.error(f"no trained model in {args.model_dir}: run `python train_model.py` first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = print_machine()
    work = Path(tempfile.mkdtemp(prefix="periscope-bench-speed-"))
    libs = kafka_local.BrokerFiles.of(kafka_local.default_state_dir()).libs
    by_kafka: dict[str, dict[str, Any]] = {}
    try:
        with contextlib.ExitStack() as stack:
            targets = {brokers.label(nodes): (stack.enter_context(
                brokers.private_kafka(nodes, work / f"state-{nodes}", libs)), work / f"kafka-{nodes}")
                for nodes in args.brokers}
            for name, (bootstrap, kafka_work) in targets.items():
                kafka_work.mkdir()
                print(f"private Kafka {kafka_local.kafka_version()}: {name} at {bootstrap}; work dir {kafka_work}")
                print(f"throughput: {args.trips:,} pre-produced trips, one consumer process, {args.repeat} run(s)")
                by_kafka[name] = {"throughput": prepare_throughput(bootstrap, kafka_work, args.model_dir, args.trips)}
            for run in range(1, args.repeat + 1):
                for name, (bootstrap, kafka_work) in targets.items():
                    print(f"  on the {name}:")
                    throughput_run(bootstrap, kafka_work, args.model_dir, by_kafka[name]["throughput"], run)
            for name, (bootstrap, kafka_work) in targets.items():
                print(f"\nend-to-end latency on the {name} (Kafka timestamp -> speed file visible)")
                by_kafka[name]["latency"] = [bench_latency(bootstrap, kafka_work, args.model_dir, rate,
                                                           args.duration, args.warmup) for rate in args.rates]
    except BaseException:
        print(f"\nthe benchmark failed; logs are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)

    throughput, latency = (by_kafka[brokers.label(args.brokers[0])][part] for part in ("throughput", "latency"))
    if len(by_kafka) == 2:
        (first, a), (second, b) = by_kafka.items()
        print(f"\n{second} / {first}: throughput "
              f"{b['throughput']['median_trips_per_s'] / a['throughput']['median_trips_per_s']:.2f}, p99 latency "
              + ", ".join(f"{x['p99_ms'] / max(y['p99_ms'], 1):.2f} at {x['rate_per_s']:,}/s"
                          for x, y in zip(b["latency"], a["latency"])))
    at_target = next((run for run in latency if run["rate_per_s"] == TARGET_RATE), None)
    targets = [{"target": f">= {TARGET_TRIPS_PER_S:,} trips/s per process",
                "measured": f"{throughput['median_trips_per_s']:,} trips/s (median)",
                "met": throughput["median_trips_per_s"] >= TARGET_TRIPS_PER_S}]
    if at_target:
        targets.append({"target": f"p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_RATE:,} trips/s",
                        "measured": f"p99 {at_target['p99_ms']:.0f} ms", "met": at_target["p99_ms"] <= TARGET_P99_MS})
    print()
    for check in targets:
        print(f"  {'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['measured']}")
    settings = {"DEFAULT_MAX_RECORDS": tuning.MAX_RECORDS, **{name: getattr(tuning, name) for name in (
        "FETCH_MIN_BYTES", "FETCH_MAX_WAIT_MS", "MODEL_THREADS", "GIL_SWITCH_INTERVAL_S", "CHECK_CRCS")}}
    document = {"benchmark": "speed_layer", "argv": sys.argv[1:] if argv is None else argv, "machine": machine,
                "model_version": current_version(args.model_dir), "kafka": kafka_local.kafka_version(),
                "consumer_settings": settings,
                "throughput": throughput, "latency": latency, "by_kafka": by_kafka, "targets": targets}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
