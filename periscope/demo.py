"""The whole pipeline in one command: ``make demo`` (``python -m periscope.demo``).

In one terminal, in order, it

1. starts the local Kafka broker (unless one already runs) and creates the topics;
2. trains the model (unless one is live already);
3. imports the shipped sample's trips picked up before the cutoff (``config.CUTOFF``,
   2016-06-01) as history and publishes the first batch version;
4. starts the speed layer (``kafka_consumer.py``, or ``spark_streaming.py`` with ``--speed-layer spark``);
5. replays the sample's trips from the cutoff on into Kafka at a classroom-friendly
   rate, so the stream continues where the history ends; at the end of the file it
   starts over with new trip ids (``--loop``: ``id2875421-2``, ...);
6. serves the dashboard on http://127.0.0.1:8501;
7. re-runs the batch layer (ingest the stream, recompute, publish, prune the
   speed view) every ``--batch-every`` seconds while trips keep flowing;

and prints a status line every ``--status-every`` seconds: what the speed
layer has seen, which batch version is live, and the merged total the
dashboard shows. Each service writes its log to ``var/demo/logs/``.

Ctrl-C stops everything this command started, and nothing else: a broker that
was already running is left running. From another terminal, ``make down``
(``python -m periscope.demo down``) does the same. Running it again resumes
where the last run stopped: the import is idempotent, the model is kept, the
consumer continues from its committed offsets, and the producer skips the
trips already on the topic (``resuming after ... trips``). Each trip is a fact
with an identity (its id), so even a trip sent twice is counted once.

With ``--cluster`` (``make demo CLUSTER=1``) the same pipeline runs on the
clusters of ``periscope.cluster`` instead: three Kafka brokers (replication
factor 3) and a Spark master with two workers, which the Spark speed layer
(``--speed-layer spark``) runs on; Ctrl-C stops the clusters too if the demo
started them.

Ctrl-C works the same when the output goes through a pipe (``make demo | tee
demo.log``): the terminal interrupts the reader too, and the demo keeps
stopping its services after it can no longer print.

    python -m periscope.demo                   # up, in the foreground
    python -m periscope.demo --rate 20         # a calmer stream
    python -m periscope.demo --cluster         # on three brokers and a Spark standalone cluster
    python -m periscope.demo down              # stop what a demo started
    python -m periscope.demo status            # what a demo runs right now
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from periscope import cli, cluster, config, kafka_local, model, serving, speed_view, storage

DEMO_DIR = config.STATE_DIR / "demo"
STATE_FILE = DEMO_DIR / "state.json"
LOG_DIR = DEMO_DIR / "logs"
DEFAULT_RATE = 50.0
DEFAULT_DASHBOARD_PORT = 8501
STOP_TIMEOUT_S = 20.0
DASHBOARD_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Service:
    """A long-running process of the demo: its name, command line and log file."""

    name: str
    command: list[str]
    log: Path


# --- what to run ---------------------------------------------------------------------------


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


def speed_layer_command(kind: str, model_dir: Path) -> list[str]:
    if kind == "spark":
        return python_command("spark_streaming.py", "--model-dir", str(model_dir))
    return python_command("kafka_consumer.py", "--consumer-id", "demo-speed", "--model-dir", str(model_dir))


def services(args: argparse.Namespace) -> list[Service]:
    """The long-running processes, in the order they start (and the reverse order they stop)."""
    return [
        Service("speed layer", speed_layer_command(args.speed_layer, args.model_dir), LOG_DIR / "speed.log"),
        Service("producer", python_command("kafka_producer.py", "--rate", f"{args.rate:g}", "--loop",
                                           "--progress", "10"), LOG_DIR / "producer.log"),
        Service("dashboard", python_command("-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                            "--server.address", "127.0.0.1", "--server.port", str(args.dashboard_port),
                                            "--browser.gatherUsageStats", "false"), LOG_DIR / "dashboard.log"),
    ]


def batch_command() -> list[str]:
    return python_command("batch_processor.py", "run", "--from-stream")


def status_line(model_dir: Path, views_dir: Path, speed_dir: Path) -> str:
    """One line for the terminal: the speed layer, the batch layer and what the dashboard merges."""
    combined = serving.combined_views(views_dir, speed_dir)
    statuses = [s for s in speed_view.read_statuses(speed_dir) if s.get("state") == "running"]
    lag = sum(s.get("total_lag") or 0 for s in statuses)
    p99 = max((s["latency_ms"]["p99"] for s in statuses if s.get("latency_ms", {}).get("p99") is not None),
              default=None)
    speed = f"speed layer {combined.speed_trips:,} trips above the watermark, lag {lag:,}" + (
        f", p99 {p99:,.0f} ms" if p99 is not None else "")
    batch = (f"batch {combined.batch_version} ({combined.batch_trips:,} trips)" if combined.batch_version
             else "batch: no version yet")
    copies = f" ({combined.speed_duplicates:,} copies left out)" if combined.speed_duplicates else ""
    return f"{speed} | {batch} | dashboard total {combined.batch_trips + combined.speed_trips:,}{copies} | " \
           f"model {model.current_version(model_dir) or '-'}"


# --- processes we started, and only those ---------------------------------------------------


def read_state() -> dict:
    return json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {"processes": [], "broker_started": False}


def write_state(state: dict) -> None:
    storage.atomic_write_json(STATE_FILE, state)


def ours(entry: dict) -> psutil.Process | None:
    """The process of a state entry if it still is the one we started (same pid and start time)."""
    try:
        process = psutil.Process(entry["pid"])
        return process if abs(process.create_time() - entry["create_time"]) < 1.0 else None
    except psutil.Error:
        return None


def start(service: Service, env: dict[str, str]) -> dict:
    service.log.parent.mkdir(parents=True, exist_ok=True)
    with open(service.log, "ab") as log:
        # A session of its own: Ctrl-C reaches this command only, which then stops each child in order.
        process = subprocess.Popen(service.command, cwd=config.PROJECT_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return {"name": service.name, "pid": process.pid, "create_time": psutil.Process(process.pid).create_time(),
            "log": str(service.log), "command": service.command}


def stop_processes(entries: list[dict]) -> None:
    """SIGTERM (each layer finishes its batch and commits), then SIGKILL after a timeout."""
    for entry in reversed(entries):
        process = ours(entry)
        if process is None:
            continue
        print(f"stopping {entry['name']} (pid {entry['pid']})", flush=True)
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            print(f"  {entry['name']} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it", flush=True)
            process.kill()


def down() -> int:
    """Stop what the last ``up`` started: its processes, and the broker if it started it.

    From another terminal, the foreground ``up`` is asked to stop first (SIGTERM,
    as Ctrl-C), so it shuts its services down in order and says so itself.
    """
    state = read_state()
    watcher = ours(state["watcher"]) if state.get("watcher") else None
    if watcher is not None and watcher.pid != os.getpid():
        print(f"asking the demo (pid {watcher.pid}) to stop", flush=True)
        watcher.terminate()
        try:
            watcher.wait(STOP_TIMEOUT_S * (len(state["processes"]) + 1))
        except psutil.TimeoutExpired:
            print("  it did not stop in time; stopping its services from here", flush=True)
        state = read_state()
    stop_processes(state["processes"])
    if state.get("broker_started"):
        pid = kafka_local.stop_broker(config.STATE_DIR)
        print(f"stopped the Kafka broker (pid {pid})" if pid else "the Kafka broker had already stopped", flush=True)
    if state.get("cluster_started"):
        stopped = cluster.down(config.STATE_DIR)
        print(f"stopped the clusters ({', '.join(stopped) or 'they had already stopped'})", flush=True)
    STATE_FILE.unlink(missing_ok=True)
    return 0


# --- up ----------------------------------------------------------------------------------------


def run_step(title: str, command: list[str], env: dict[str, str], log: Path | None = None) -> None:
    """A one-off step in the foreground (or into ``log``); a failure stops the demo with its output."""
    print(f"== {title}: {' '.join(Path(c).name if c == sys.executable else c for c in command)}", flush=True)
    if log is None:
        result = subprocess.run(command, cwd=config.PROJECT_ROOT, env=env)
    else:
        with open(log, "ab") as handle:
            result = subprocess.run(command, cwd=config.PROJECT_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        ending = f"; end of {log}:\n{kafka_local.tail(log, 15)}" if log else ""
        raise RuntimeError(f"{title} failed (exit {result.returncode}){ending}")


def start_broker(port: int, controller_port: int) -> tuple[str, bool]:
    print(f"== Kafka broker on 127.0.0.1:{port}", flush=True)
    info = kafka_local.start_broker(config.STATE_DIR, port, controller_port)
    kafka_local.ensure_topics(info.bootstrap, {config.TRIPS_TOPIC: 3, config.DLQ_TOPIC: 1})
    print(f"   {'started' if info.started else 'already running'} (pid {info.pid}); log {info.log_file}", flush=True)
    return info.bootstrap, info.started


def start_clusters() -> tuple[dict[str, str], bool]:
    """The clusters of ``periscope.cluster`` (unless they run): the variables pointing the layers at them."""
    print("== clusters: 3 Kafka brokers, a Spark master and 2 workers (python -m periscope.cluster up)", flush=True)
    clusters, started = cluster.up(config.STATE_DIR)
    print(f"   {'started' if started else 'already running'}; Spark UI {clusters.layout.spark_ui}; "
          f"logs under {clusters.root}", flush=True)
    return {"KAFKA_BOOTSTRAP_SERVERS": clusters.layout.bootstrap, "SPARK_MASTER": clusters.layout.spark_master}, started


def wait_for_dashboard(port: int, entry: dict, timeout: float = DASHBOARD_START_TIMEOUT_S) -> None:
    """Until Streamlit's health endpoint answers, so the printed URL works when it is printed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ours(entry) is None:
            raise RuntimeError(f"the dashboard exited; end of {entry['log']}:\n"
                               f"{kafka_local.tail(Path(entry['log']), 15)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the dashboard did not answer on port {port} within {timeout:.0f} s; see {entry['log']}")


def print_banner(args: argparse.Namespace, bootstrap: str, entries: list[dict]) -> None:
    print()
    print("== Periscope is running")
    print(f"   dashboard      http://127.0.0.1:{args.dashboard_port}")
    print(f"   Kafka          {bootstrap}  topics {config.TRIPS_TOPIC}, {config.DLQ_TOPIC}")
    for entry in entries:
        print(f"   {entry['name']:<14} pid {entry['pid']:<8} log {entry['log']}")
    print(f"   batch layer    every {args.batch_every:g} s: {' '.join(batch_command()[1:])}; log {LOG_DIR / 'batch.log'}")
    print(f"   data           {config.MASTER_DIR}, {config.VIEWS_DIR}, {config.SPEED_DIR}, {args.model_dir}")
    print("   stop           Ctrl-C here, or `make down` in another terminal")
    print(flush=True)


def watch(args: argparse.Namespace, env: dict[str, str], entries: list[dict]) -> None:
    """Until Ctrl-C: recompute the batch layer on schedule, print status, notice a dead service."""
    next_batch = time.monotonic() + args.batch_every
    next_status = time.monotonic()
    while True:
        for entry in entries:
            if ours(entry) is None:
                raise RuntimeError(f"{entry['name']} exited; end of {entry['log']}:\n"
                                   f"{kafka_local.tail(Path(entry['log']), 15)}")
        now = time.monotonic()
        if now >= next_status:
            print(time.strftime("%H:%M:%S ") + status_line(args.model_dir, config.VIEWS_DIR, config.SPEED_DIR),
                  flush=True)
            next_status = now + args.status_every
        if now >= next_batch:
            started = time.monotonic()
            run_step("batch layer: ingest the stream, recompute, publish", batch_command(), env, LOG_DIR / "batch.log")
            manifest = storage.read_version(config.VIEWS_DIR)[1]
            print(f"   published {manifest['version']} in {time.monotonic() - started:.1f} s, "
                  f"watermark {manifest['watermark']}", flush=True)
            next_batch = time.monotonic() + args.batch_every
        time.sleep(0.5)


class _StdoutOrNothing:
    """Standard output that turns into /dev/null once its reader is gone (a broken pipe)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (BrokenPipeError, ValueError, OSError):
            self.stream = open(os.devnull, "w")
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.stream = open(os.devnull, "w")


def keep_going_without_a_reader() -> None:
    """Ctrl-C in ``make demo | tee demo.log`` interrupts ``tee`` as well: printing then fails with
    a broken pipe, which must not stop the shutdown half-way (services left running)."""
    sys.stdout, sys.stderr = _StdoutOrNothing(sys.stdout), _StdoutOrNothing(sys.stderr)


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a closing terminal) stops the demo as Ctrl-C does."""
    raise KeyboardInterrupt


def up(args: argparse.Namespace) -> int:
    previous = read_state()
    earlier = previous["processes"] + ([previous["watcher"]] if previous.get("watcher") else [])
    if any(ours(entry) for entry in earlier):
        print("error: a demo is already running (see `python -m periscope.demo status`); "
              "stop it first with `make down`", file=sys.stderr)
        return 2
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    state = {"processes": [], "broker_started": previous.get("broker_started", False),
             "watcher": {"pid": os.getpid(), "create_time": psutil.Process().create_time()}}
    signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.cluster:
            addresses, started = start_clusters()
            state["cluster_started"] = previous.get("cluster_started", False) or started
            bootstrap = addresses["KAFKA_BOOTSTRAP_SERVERS"]
        else:
            bootstrap, started = start_broker(args.kafka_port, args.controller_port)
            state["broker_started"] = state["broker_started"] or started
            addresses = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}
        write_state(state)
        env = {**os.environ, **addresses, "PYTHONUNBUFFERED": "1"}
        if model.current_version(args.model_dir) is None:
            run_step("train the model", python_command("train_model.py", "--model-dir", str(args.model_dir)), env)
        else:
            print(f"== model {model.current_version(args.model_dir)} is live in {args.model_dir} "
                  "(python train_model.py trains a new one)", flush=True)
        run_step("batch layer: import the history, ingest the stream, publish views", batch_command(), env)
        for service in services(args):
            print(f"== start {service.name}", flush=True)
            state["processes"].append(start(service, env))
            write_state(state)
        wait_for_dashboard(args.dashboard_port, state["processes"][-1])
        print_banner(args, bootstrap, state["processes"])
        watch(args, env, state["processes"])
    except (KeyboardInterrupt, BrokenPipeError):
        keep_going_without_a_reader()
        print("\nstopping what the demo started", flush=True)
        return down()
    except (RuntimeError, kafka_local.KafkaLocalError) as error:
        keep_going_without_a_reader()
        print(f"error: {error}", file=sys.stderr, flush=True)
        down()
        return 1
    return 0


def status() -> int:
    state = read_state()
    running = [entry for entry in state["processes"] if ours(entry)]
    if not running:
        print("no demo is running (start one with `make demo`)")
        return 1
    for entry in running:
        print(f"{entry['name']:<14} pid {entry['pid']:<8} log {entry['log']}")
    print(f"broker         {'started by the demo' if state.get('broker_started') else 'was already running'}")
    if state.get("cluster_started"):
        print("clusters       started by the demo")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m periscope.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("command", nargs="?", choices=("up", "down", "status"), default="up",
                        help="up: start everything and watch it; down: stop what a demo started; status: list it")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="trips per second the producer replays")
    parser.add_argument("--batch-every", type=float, default=60.0, metavar="SECONDS",
                        help="how often the batch layer ingests the stream, recomputes and publishes")
    parser.add_argument("--status-every", type=float, default=10.0, metavar="SECONDS",
                        help="how often to print the status line")
    parser.add_argument("--speed-layer", choices=("python", "spark"), default="python",
                        help="python: kafka_consumer.py; spark: spark_streaming.py (needs `make spark-fetch`)")
    parser.add_argument("--cluster", action="store_true",
                        help="run on the clusters of periscope.cluster (3 Kafka brokers, a Spark master and 2 "
                             "workers; started unless they run) instead of the single broker and local Spark")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                        help="port of the dashboard on 127.0.0.1")
    parser.add_argument("--kafka-port", type=int, default=int(os.environ.get("KAFKA_PORT", kafka_local.DEFAULT_PORT)),
                        help="port of the local broker on 127.0.0.1 (env KAFKA_PORT)")
    parser.add_argument("--controller-port", type=int,
                        default=int(os.environ.get("KAFKA_CONTROLLER_PORT", kafka_local.DEFAULT_CONTROLLER_PORT)),
                        help="port of the broker's KRaft controller on 127.0.0.1 (env KAFKA_CONTROLLER_PORT)")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR, help="model versions (env PERISCOPE_MODEL_DIR)")
    args = parser.parse_args(argv)
    if not args.rate > 0:
        parser.error(f"--rate must be a positive number of trips per second, e.g. --rate {DEFAULT_RATE:g}; got {args.rate:g}")
    for flag in ("batch_every", "status_every"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be a positive number of seconds; got {getattr(args, flag):g}")
    for flag in ("dashboard_port", "kafka_port", "controller_port"):
        if not 0 < getattr(args, flag) < 65536:
            parser.error(f"--{flag.replace('_', '-')} must be a TCP port (1-65535); got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"up": up, "down": lambda _: down(), "status": lambda _: status()}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
