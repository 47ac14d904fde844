"""Benchmark of the ingestion layer: how many trips per second kafka_producer.py can send.

``kafka_producer.py`` is pure Python (kafka-python), so its ceiling is set by
the interpreter, not by Kafka. To show how close it gets, the benchmark runs,
in one go, on the same broker:

* **ours**: ``kafka_producer.replay`` with the real sample, no pacing,
  ``--cutoff none --loop --limit N`` (200,000 trips: the whole sample, then
  ``-2`` and ``-3`` passes), exactly the settings a user gets (acks=all,
  idempotent; the topic's keys are read back first, as on every start, but
  the fresh topic is empty, so nothing is skipped);
* **Kafka's own Java producer**: ``org.apache.kafka.tools.ProducerPerformance``
  (``kafka-producer-perf-test``) from the broker's jars, N records of our mean
  message size (key + JSON value), ``--throughput -1 --producer-props acks=all``.

Each is run ``--repeats`` times, alternating, each run into a fresh
3-partition topic of its own (nothing is ever written into ``taxi-trips``);
the medians and the ratio ours/Java are reported. Rates are measured from the
first send to the last acknowledgement, so loading the CSV (ours) and starting
the JVM (Java) are left out.

The benchmark starts a private broker of its own (``periscope.kafka_local``,
in a temporary state dir on free ports) and stops it at the end, so it never
touches a broker you are running; ``--bootstrap`` uses an existing broker
instead (its benchmark topics are deleted afterwards). ``--brokers 1,3`` starts
the single broker and a three-broker cluster (``bench.brokers``: replication
factor 3, ``min.insync.replicas=2``) and alternates every run between them,
so their ratio is measured side by side.

Run it (about 1-2 minutes)::

    python -m bench.bench_producer
    python -m bench.bench_producer --trips 500000 --repeats 5
    python -m bench.bench_producer --brokers 1,3       # single broker vs three-broker cluster

The machine, every run and the medians are printed and written to
``bench/results/producer.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python bench/bench_producer.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kafka_producer  # noqa: E402
from bench import brokers  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from periscope import config, kafka_local  # noqa: E402
from periscope.stream import PRODUCER_CONFIG, BrokerUnavailable, wait_for_broker  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = PROJECT_ROOT / "bench" / "results" / "producer.json"
JAVA_TOOL = "org.apache.kafka.tools.ProducerPerformance"
JAVA_TOTAL = re.compile(r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\)")
PARTITIONS = 3


def mean_message_bytes(input_path: Path, trips: int) -> float:
    """Mean key + value size of the messages ours will send: the record size Java gets."""
    frame, _ = kafka_producer.load_trips(input_path, io.StringIO())
    chunks = kafka_producer.plan_chunks(kafka_producer.replay_order(frame), [0], limit=trips, loop=True)
    total = count = 0
    for chunk in chunks:
        total += sum(map(len, chunk.keys)) + sum(map(len, chunk.values))
        count += len(chunk.keys)
    return total / count


def run_ours(bootstrap: str, topic: str, input_path: Path, trips: int) -> dict[str, Any]:
    """One replay at full speed, in this process, as ``kafka_producer.py`` runs it."""
    args = kafka_producer.parse_args(["--bootstrap", bootstrap, "--topic", topic, "--input", str(input_path),
                                      "--cutoff", "none", "--loop", "--limit", str(trips), "--progress", "0",
                                      "--wait", "10"])
    result, code = kafka_producer.replay(args, out=io.StringIO())
    if code != 0 or result is None:
        raise RuntimeError(f"kafka_producer.py failed (exit {code}): {result}")
    return {"trips": result.delivered, "elapsed_s": round(result.elapsed_s, 3), "trips_per_s": round(result.rate),
            "mb_per_s": round(result.bytes / 1e6 / result.elapsed_s, 2)}


def run_java(bootstrap: str, topic: str, records: int, record_size: int, libs: Path) -> dict[str, Any]:
    """One run of Kafka's ProducerPerformance; its own final line gives the rate."""
    command = [java_path(), "-Xmx512m", "-cp", f"{libs}/*", JAVA_TOOL, "--topic", topic,
               "--num-records", str(records), "--record-size", str(record_size), "--throughput", "-1",
               "--bootstrap-server", bootstrap, "--producer-props", "acks=all"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    totals = JAVA_TOTAL.findall(done.stdout)
    if done.returncode != 0 or not totals:
        raise RuntimeError(f"ProducerPerformance failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    sent, per_s, mb_s = totals[-1]
    return {"trips": int(sent), "elapsed_s": round(int(sent) / float(per_s), 3), "trips_per_s": round(float(per_s)),
            "mb_per_s": float(mb_s)}


def java_path() -> str:
    java_home = os.environ.get("JAVA_HOME")
    return str(Path(java_home) / "bin" / "java") if java_home else (shutil.which("java") or "java")


def java_version() -> str:
    done = subprocess.run([java_path(), "-version"], capture_output=True, text=True)
    return (done.stderr or done.stdout).splitlines()[0] if (done.stderr or done.stdout) else "unknown"


def installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def delete_topics(bootstrap: str, names: list[str]) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics(names)
    finally:
        admin.close()


TOOLS = ("kafka_producer.py", "java ProducerPerformance")


def benchmark(targets: dict[str, str], args: argparse.Namespace, libs: Path) -> dict[str, Any]:
    """Alternate ours and Java on each Kafka of targets (name -> bootstrap), ``args.repeats`` times.

    Returns every run and, per Kafka, the medians and the ratio ours/Java; with
    two Kafkas, also each tool's ratio of the second to the first (cluster/single).
    """
    record_size = round(mean_message_bytes(args.input, args.trips))
    print(f"message size: {record_size} bytes on average (trip id key + JSON value); "
          f"{args.trips:,} trips per run, {args.repeats} runs each, alternating", flush=True)
    stem = uuid.uuid4().hex[:6]
    runs: list[dict[str, Any]] = []
    topics: dict[str, list[str]] = {name: [] for name in targets}
    try:
        for repeat in range(1, args.repeats + 1):
            for name, bootstrap in targets.items():
                for tool in TOOLS:
                    topic = f"bench-{'python' if tool == TOOLS[0] else 'java'}-{stem}-{repeat}"
                    kafka_local.ensure_topics(bootstrap, {topic: PARTITIONS})
                    topics[name].append(topic)
                    load = os.getloadavg()[0]
                    if tool == TOOLS[0]:
                        run = run_ours(bootstrap, topic, args.input, args.trips)
                    else:
                        run = run_java(bootstrap, topic, args.trips, record_size, libs)
                    run.update(tool=tool, kafka=name, repeat=repeat, load_average_1min=round(load, 2))
                    runs.append(run)
                    print(f"  run {repeat}  {name:<38} {tool:<25} {run['trips_per_s']:>9,} trips/s  "
                          f"{run['mb_per_s']:6.1f} MB/s  {run['elapsed_s']:6.2f} s  (load {load:.2f})", flush=True)
    finally:
        if args.bootstrap:
            for name, bootstrap in targets.items():
                delete_topics(bootstrap, topics[name])
    by_kafka = {}
    for name in targets:
        medians = {tool: statistics.median(r["trips_per_s"] for r in runs if r["kafka"] == name and r["tool"] == tool)
                   for tool in TOOLS}
        by_kafka[name] = {"median_trips_per_s": medians,
                          "ratio_ours_to_java": round(medians[TOOLS[0]] / medians[TOOLS[1]], 3)}
    result: dict[str, Any] = {"record_size_bytes": record_size, "runs": runs, "by_kafka": by_kafka,
                              **by_kafka[next(iter(targets))]}
    if len(targets) == 2:
        first, second = (by_kafka[name]["median_trips_per_s"] for name in targets)
        result["ratio_second_to_first"] = {tool: round(second[tool] / first[tool], 3) for tool in TOOLS}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_producer",
        description="Maximum rate of kafka_producer.py next to Kafka's Java ProducerPerformance, same broker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", type=Path, default=config.SAMPLE_CSV, help="trips to replay (Kaggle layout)")
    parser.add_argument("--trips", type=int, default=200_000, help="trips (records) per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each producer, alternating")
    parser.add_argument("--brokers", default="1",
                        help="private Kafka to start: 1 (the single broker), 3 (a three-broker cluster, RF 3, "
                             "min ISR 2) or 1,3 (both, alternated run by run)")
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="use this running broker instead of starting a private one (default: private)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="where the JSON result is written")
    args = parser.parse_args(argv)
    if args.trips < 1000:
        parser.error(f"--trips must be at least 1000 for a meaningful rate; got {args.trips}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    try:
        args.brokers = brokers.parse_broker_counts(args.brokers)
    except ValueError as error:
        parser.error(str(error))
    if args.bootstrap and args.brokers != [1]:
        parser.error("--bootstrap uses a running broker; it cannot be combined with --brokers")
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file (the shipped sample is {config.SAMPLE_CSV})")

    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    machine = print_machine()
    versions = {"kafka-python": installed("kafka-python"), "crc32c": installed("crc32c"),
                "kafka": kafka_local.kafka_version(), "java": java_version()}
    print("  " + ", ".join(f"{name} {version}" for name, version in versions.items()), flush=True)
    libs = kafka_local.fetch(kafka_local.BrokerFiles.of(kafka_local.default_state_dir()).libs)

    work = Path(tempfile.mkdtemp(prefix="periscope-bench-kafka-"))
    try:
        with contextlib.ExitStack() as stack:
            if args.bootstrap:
                wait_for_broker(args.bootstrap, "benchmark the producer", timeout_s=10)
                targets = {f"existing broker at {args.bootstrap}": args.bootstrap}
            else:
                targets = {brokers.label(nodes): stack.enter_context(
                    brokers.private_kafka(nodes, work / f"kafka-{nodes}", libs)) for nodes in args.brokers}
            for name, bootstrap in targets.items():
                print(f"kafka: {name} at {bootstrap}", flush=True)
            result = benchmark(targets, args, libs)
    except (BrokerUnavailable, kafka_local.KafkaLocalError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    broker = ", ".join(targets)

    for name, figures in result["by_kafka"].items():
        medians = figures["median_trips_per_s"]
        print(f"median on the {name}: kafka_producer.py {medians[TOOLS[0]]:,} trips/s, "
              f"Java ProducerPerformance {medians[TOOLS[1]]:,} records/s "
              f"-> ours/java = {figures['ratio_ours_to_java']:.2f}")
    if "ratio_second_to_first" in result:
        second, first = list(result["by_kafka"])[1], list(result["by_kafka"])[0]
        print(f"{second} / {first}: " + ", ".join(f"{tool} {ratio:.2f}"
                                                   for tool, ratio in result["ratio_second_to_first"].items()))
    report = {"benchmark": "producer", "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "versions": versions, "broker": broker, "input": str(args.input),
              "trips_per_run": args.trips, "repeats": args.repeats,
              "producer_config": dict(PRODUCER_CONFIG),
              "java_command": f"java -cp '<libs>/*' {JAVA_TOOL} --topic <topic> --num-records {args.trips} "
                              f"--record-size {result['record_size_bytes']} --throughput -1 "
                              f"--bootstrap-server <broker> --producer-props acks=all",
              **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
