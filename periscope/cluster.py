"""Clusters on this machine, for real: three Kafka brokers in one KRaft quorum, a Spark master and two workers.

The single broker of ``periscope.kafka_local`` and Spark's ``local[*]`` keep a
laptop simple; these are the same engines as a user runs on many machines, so
that growing past one machine is tested here:

- Kafka: three nodes, each broker and controller (combined KRaft mode, a
  quorum of three), from the same Maven-fetched jars. Topics have replication
  factor 3 and ``min.insync.replicas=2``: with the producer's ``acks=all``, one
  broker may die without a trip being lost or refused.
- Spark: a standalone master and two workers, started with ``spark-class`` from
  the pyspark install, one core and ``--worker-memory`` each. Jobs reach the
  master at ``spark://127.0.0.1:7077``; the connector jars and the ``periscope``
  package travel with each job (``periscope.spark_session``).

    python -m periscope.cluster up       # start what does not run, wait until all answers, create topics
    python -m periscope.cluster status   # exit code 0 when every broker and worker answers
    python -m periscope.cluster down     # stop what `up` started from this state dir, nothing else

Then every script runs on them unchanged, e.g.::

    export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194
    export SPARK_MASTER=spark://127.0.0.1:7077

Everything binds to 127.0.0.1 and lives under <state dir>/cluster: kafka-1..3/
(each as kafka_local's broker dir; the jars are shared with it), spark-master/,
spark-worker-1/ and -2/ (logs, work and scratch dirs), and layout.json, the
ports of the running cluster. The guarantees are the single broker's: starting
twice is harmless (and starts only what died, which rejoins), stopping stops
only the processes this state dir started (``periscope.daemons``), and ``up``
returns once every part answers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from periscope import cli, config, daemons, kafka_local
from periscope.kafka_local import BrokerFiles, KafkaLocalError, KraftNode

log = logging.getLogger(__name__)

SPARK_DAEMON_HEAP = "256m"
"""-Xmx of the master and worker JVMs themselves; executors get --worker-memory."""
MASTER_CONF = "spark.worker.timeout 10\nspark.master.rest.enabled false\n"
"""A worker that stops answering is given up after 10 s (default 60), so its work moves on sooner."""
WORKER_CONF = "spark.worker.timeout 10\nspark.worker.cleanup.enabled true\n"
"""A worker sends its heartbeat every quarter of its own spark.worker.timeout: the master's 10 s."""


class ClusterError(KafkaLocalError):
    """Something the user can fix (a port in use, a part that would not start); the message says what."""


@dataclass(frozen=True)
class Layout:
    """The ports of one cluster: a broker and a controller port per Kafka node, the master's, a UI per worker."""

    kafka_ports: tuple[int, ...] = (9192, 9193, 9194)
    controller_ports: tuple[int, ...] = (9195, 9196, 9197)
    spark_port: int = 7077
    spark_ui_port: int = 8090  # not Spark's 8080, which `make airflow` serves
    worker_ui_ports: tuple[int, ...] = (8091, 8092)
    worker_cores: int = 1
    worker_memory: str = "1g"

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.kafka_ports)

    @property
    def spark_master(self) -> str:
        return f"spark://127.0.0.1:{self.spark_port}"

    @property
    def spark_ui(self) -> str:
        return f"http://127.0.0.1:{self.spark_ui_port}"


@dataclass(frozen=True)
class Cluster:
    """The cluster of one state dir: where its parts keep their files, and how to recognise them."""

    root: Path
    layout: Layout

    def kafka_nodes(self) -> list[KraftNode]:
        libs = BrokerFiles.of(self.root.parent).libs
        return [KraftNode(BrokerFiles.at(self.root / f"kafka-{i}", libs), i, port, controller)
                for i, (port, controller) in enumerate(zip(self.layout.kafka_ports, self.layout.controller_ports), 1)]

    def master(self) -> daemons.Daemon:
        home = self.root / "spark-master"
        return daemons.Daemon("Spark master", home / "master.pid", f" --properties-file {home / 'spark.conf'}",
                              home / "master.log")

    def workers(self) -> list[daemons.Daemon]:
        homes = [self.root / f"spark-worker-{i}" for i in range(1, len(self.layout.worker_ui_ports) + 1)]
        return [daemons.Daemon(f"Spark worker {i}", home / "worker.pid", f" --properties-file {home / 'spark.conf'}",
                               home / "worker.log") for i, home in enumerate(homes, 1)]

    def spark_daemons(self) -> list[daemons.Daemon]:
        return [self.master(), *self.workers()]

    def all_daemons(self) -> list[daemons.Daemon]:
        return [node.files.daemon for node in self.kafka_nodes()] + self.spark_daemons()


def layout_file(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / "cluster" / "layout.json"


def cluster_of(state_dir: Path, wanted: Layout | None = None) -> Cluster:
    """The state dir's cluster: with the ports it runs on if any part of it runs, else with ``wanted``'s."""
    root = Path(state_dir).resolve() / "cluster"
    try:
        saved = json.loads(layout_file(state_dir).read_text())
        recorded = Cluster(root, Layout(**{key: tuple(value) if isinstance(value, list) else value
                                           for key, value in saved.items()}))
    except (OSError, ValueError, TypeError):
        recorded = None
    if recorded and any(daemons.running_pid(d) for d in recorded.all_daemons()):
        return recorded
    return Cluster(root, wanted or (recorded.layout if recorded else Layout()))


# --- Kafka -------------------------------------------------------------------------------------------


def start_kafka(cluster: Cluster, heap: str, timeout: float,
                libs_dir: Path | None = None) -> list[kafka_local.BrokerInfo]:
    """Start the nodes that do not run; return once every broker answers and all are in the cluster."""
    nodes = cluster.kafka_nodes()
    infos = kafka_local.start_nodes(nodes, heap=heap, libs_dir=libs_dir, timeout=timeout)
    wait_for_brokers(cluster.layout.bootstrap, len(nodes), timeout)
    return infos


def wait_for_brokers(bootstrap: str, count: int, timeout: float) -> None:
    """Until the cluster's metadata lists ``count`` brokers: before that, topics of RF 3 cannot be created."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            try:
                if len(admin.describe_cluster()["brokers"]) >= count:
                    return
            finally:
                admin.close()
        except KafkaError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"fewer than {count} brokers registered at {bootstrap} within {timeout:.0f} s")
        time.sleep(0.5)


# --- Spark ---------------------------------------------------------------------------------------------


def spark_home() -> Path:
    """pyspark's install: Spark itself, with bin/spark-class and jars/."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def spark_env(scratch: Path) -> dict[str, str]:
    return {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_DAEMON_MEMORY": SPARK_DAEMON_HEAP, "SPARK_LOCAL_DIRS": str(scratch),
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)}


def spark_commands(cluster: Cluster) -> list[list[str]]:
    """The master's and each worker's command line; each ends with its own properties file (its identity)."""
    layout, spark_class = cluster.layout, str(spark_home() / "bin" / "spark-class")
    master_conf = cluster.master().pid_file.parent / "spark.conf"
    commands = [[spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                 "--port", str(layout.spark_port), "--webui-port", str(layout.spark_ui_port),
                 "--properties-file", str(master_conf)]]
    for worker, ui_port in zip(cluster.workers(), layout.worker_ui_ports):
        home = worker.pid_file.parent
        commands.append([spark_class, "org.apache.spark.deploy.worker.Worker", layout.spark_master,
                         "--host", "127.0.0.1", "--cores", str(layout.worker_cores), "--memory", layout.worker_memory,
                         "--webui-port", str(ui_port), "--work-dir", str(home / "work"),
                         "--properties-file", str(home / "spark.conf")])
    return commands


def start_spark(cluster: Cluster, timeout: float) -> list[int]:
    """Start the master and the workers that do not run; return once the master counts every worker alive."""
    layout = cluster.layout
    spark_daemons, commands = cluster.spark_daemons(), spark_commands(cluster)
    own_ports = [(layout.spark_port, layout.spark_ui_port), *((port,) for port in layout.worker_ui_ports)]
    missing = [(d, c, p) for d, c, p in zip(spark_daemons, commands, own_ports) if daemons.running_pid(d) is None]
    for daemon, _, ports in missing:
        for port in ports:
            if not daemons.port_free(port):
                raise ClusterError(f"127.0.0.1:{port}, a port of the {daemon.name}, is already in use by another "
                                   "program; stop it, or choose other ports (see --help)")
    for daemon, command, _ in missing:
        home = daemon.pid_file.parent
        (home / "scratch").mkdir(parents=True, exist_ok=True)
        (home / "spark.conf").write_text(MASTER_CONF if daemon == cluster.master() else WORKER_CONF)
        log.info("Starting %s (log: %s)", daemon.name, daemon.log_file)
        daemons.launch(daemon, command, cwd=home, env=spark_env(home / "scratch"))
    wait_for_workers(cluster, timeout)
    return [daemons.running_pid(d) for d in spark_daemons]


def master_state(layout: Layout, timeout: float = 2.0) -> dict | None:
    """The master's own report (its web UI's /json/), or None if it does not answer."""
    try:
        with urllib.request.urlopen(f"{layout.spark_ui}/json/", timeout=timeout) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def alive_workers(layout: Layout, state: dict | None) -> list[int]:
    """The UI ports of this layout's workers that the master counts as ALIVE."""
    addresses = {w.get("webuiaddress") for w in (state or {}).get("workers", []) if w.get("state") == "ALIVE"}
    return [port for port in layout.worker_ui_ports if f"http://127.0.0.1:{port}" in addresses]


def wait_for_workers(cluster: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for daemon in cluster.spark_daemons():
            if daemons.running_pid(daemon) is None:
                raise ClusterError(f"the {daemon.name} exited while starting. Last lines of {daemon.log_file}:"
                                      f"\n{daemons.tail(daemon.log_file)}")
        state = master_state(cluster.layout)
        if state and state.get("status") == "ALIVE" and \
                len(alive_workers(cluster.layout, state)) == len(cluster.layout.worker_ui_ports):
            return
        time.sleep(0.5)
    raise ClusterError(f"the Spark master at {cluster.layout.spark_ui} did not count every worker alive "
                          f"within {timeout:.0f} s, so what this call started was stopped. See "
                          f"{cluster.master().log_file} and the workers' logs")


# --- the whole cluster ----------------------------------------------------------------------------------


def up(state_dir: Path, wanted: Layout | None = None, *, heap: str = kafka_local.DEFAULT_HEAP,
       libs_dir: Path | None = None, timeout: float = 120.0) -> tuple[Cluster, bool]:
    """Start every part that does not run, wait until all answer, create the topics (RF 3, min ISR 2).

    Returns the cluster and whether this call started anything. libs_dir: the
    Kafka jars, if not <state dir>/kafka/libs. On failure, what this call
    started is stopped again and KafkaLocalError says why.
    """
    cluster = cluster_of(state_dir, wanted)
    before = [daemons.running_pid(d) for d in cluster.all_daemons()]
    cluster.root.mkdir(parents=True, exist_ok=True)
    layout_file(state_dir).write_text(json.dumps(asdict(cluster.layout), indent=2) + "\n")
    try:
        with ThreadPoolExecutor(2) as pool:  # the JVMs start side by side: half the wait on two cores
            parts = [pool.submit(start_kafka, cluster, heap, timeout, libs_dir), pool.submit(start_spark, cluster, timeout)]
        for part in parts:
            part.result()
        kafka_local.ensure_topics(cluster.layout.bootstrap, {config.TRIPS_TOPIC: 3, config.DLQ_TOPIC: 1})
    except (KafkaLocalError, KafkaError):
        daemons.stop([d for d, pid in zip(cluster.all_daemons(), before) if pid is None])
        raise
    return cluster, None in before


def down(state_dir: Path, timeout: float = 30.0) -> dict[str, int]:
    """Stop the parts of state_dir's cluster that run, Spark first; return name -> pid of those stopped."""
    cluster = cluster_of(state_dir)
    spark, nodes = cluster.spark_daemons(), cluster.kafka_nodes()
    pids = daemons.stop(spark, timeout) + kafka_local.stop_nodes(nodes, timeout)
    names = [d.name for d in spark] + [f"Kafka node {node.node_id}" for node in nodes]
    return {name: pid for name, pid in zip(names, pids) if pid is not None}


def status_lines(state_dir: Path) -> tuple[list[str], bool]:
    """One line per part (does it run from this state dir, does it answer), and whether all answer."""
    cluster = cluster_of(state_dir)
    lines, healthy = [], True
    for node in cluster.kafka_nodes():
        pid = daemons.running_pid(node.files.daemon)
        address = f"127.0.0.1:{node.port}"
        answers = kafka_local.is_reachable(address)
        healthy &= answers
        lines.append(f"{f'Kafka node {node.node_id}':<15} {_owner(pid)}; {address} {_answers(answers)}")
    state = master_state(cluster.layout)
    alive = alive_workers(cluster.layout, state)
    master_ok = bool(state) and state.get("status") == "ALIVE"
    healthy &= master_ok
    lines.append(f"{'Spark master':<15} {_owner(daemons.running_pid(cluster.master()))}; "
                 f"{cluster.layout.spark_master} {_answers(master_ok)} (UI {cluster.layout.spark_ui})")
    for worker, port in zip(cluster.workers(), cluster.layout.worker_ui_ports):
        healthy &= port in alive
        lines.append(f"{worker.name:<15} {_owner(daemons.running_pid(worker))}; "
                     f"{'alive' if port in alive else 'not alive'} at the master (UI http://127.0.0.1:{port})")
    return lines, healthy


def _owner(pid: int | None) -> str:
    return f"running, pid {pid}" if pid else "not running from this state dir"


def _answers(answers: bool) -> str:
    return "answers" if answers else "does not answer"


def exports(layout: Layout) -> str:
    return f"export KAFKA_BOOTSTRAP_SERVERS={layout.bootstrap}\nexport SPARK_MASTER={layout.spark_master}"


# --- command line ------------------------------------------------------------------------------------------


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated TCP ports such as 9192,9193,9194; got {text!r}")
    if not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"TCP ports are 1-65535; got {text!r}")
    return ports


def _parser() -> argparse.ArgumentParser:
    default = Layout()
    parser = argparse.ArgumentParser(prog="python -m periscope.cluster", description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status"),
                        help="up: start what does not run and wait until all answers; down: stop what this "
                             "state dir started; status: exit code 0 if every part answers, 1 if not")
    parser.add_argument("--state-dir", type=Path, default=config.STATE_DIR,
                        help="where the cluster keeps its files, under cluster/ (env PERISCOPE_STATE_DIR)")
    join = ",".join
    parser.add_argument("--kafka-ports", type=_ports, default=default.kafka_ports,
                        help=f"the brokers' client ports, one per node (default: {join(map(str, default.kafka_ports))})")
    parser.add_argument("--controller-ports", type=_ports, default=default.controller_ports,
                        help="the KRaft controller ports, as many as brokers "
                             f"(default: {join(map(str, default.controller_ports))})")
    parser.add_argument("--spark-port", type=int, default=default.spark_port, help="the Spark master's port")
    parser.add_argument("--spark-ui-port", type=int, default=default.spark_ui_port, help="the master's web UI")
    parser.add_argument("--worker-ui-ports", type=_ports, default=default.worker_ui_ports,
                        help=f"one web UI port per Spark worker (default: {join(map(str, default.worker_ui_ports))})")
    parser.add_argument("--worker-memory", default=default.worker_memory, help="memory each worker gives executors")
    parser.add_argument("--heap", default=kafka_local.DEFAULT_HEAP, help="maximum Java heap of each broker (-Xmx)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for everything to answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.kafka_ports) != len(args.controller_ports):
        parser.error(f"--kafka-ports and --controller-ports need as many ports each; got "
                     f"{len(args.kafka_ports)} and {len(args.controller_ports)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    commands = {"up": lambda: _up(args), "down": lambda: _down(args), "status": lambda: _status(args)}
    try:
        return commands[args.command]()
    except (KafkaLocalError, KafkaError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    wanted = Layout(args.kafka_ports, args.controller_ports, args.spark_port, args.spark_ui_port,
                    args.worker_ui_ports, worker_memory=args.worker_memory)
    cluster, started = up(args.state_dir, wanted, heap=args.heap, timeout=args.timeout)
    print(("The cluster is up" if started else "The cluster was already running") +
          f" (state in {cluster.root}); Spark's UI: {cluster.layout.spark_ui}. Point the scripts at it:")
    print(exports(cluster.layout))
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = down(args.state_dir)
    print("Stopped " + ", ".join(f"{name} (pid {pid})" for name, pid in stopped.items()) + "."
          if stopped else "Nothing of a cluster from this state dir is running.")
    return 0


def _status(args: argparse.Namespace) -> int:
    lines, healthy = status_lines(args.state_dir)
    print("\n".join(lines))
    return 0 if healthy else 1

if __name__ == "__main__":
    sys.exit(main())
