"""A real single-node Apache Kafka broker that the project fetches and starts itself.

Kafka is the stream in the middle of the Lambda architecture: kafka_producer.py
replays trips into the topic `taxi-trips`, the speed layer and the batch layer
read them back, and invalid records go to `taxi-trips-dlq`. With Docker,
docker-compose.yaml runs the official image. Without Docker, this module runs
the same broker from the Apache Kafka jars: Maven fetches them from Maven
Central (the version is pinned in infra/kafka/pom.xml) and Java runs them.

    python -m periscope.kafka_local start           # fetch jars if needed, start, create topics
    python -m periscope.kafka_local status          # exit code 0 when Kafka answers, 1 if not
    python -m periscope.kafka_local create-topics   # against any broker: --bootstrap HOST:PORT
    python -m periscope.kafka_local stop

The broker runs in KRaft mode (it is its own controller, no ZooKeeper) and
listens on 127.0.0.1 only. Everything it owns lives under <state dir>/kafka:
libs/ (jars), data/ (the log), server.properties, log4j2.properties,
logs/broker.log and broker.pid. The state dir is <project>/var unless
PERISCOPE_STATE_DIR or --state-dir say otherwise, so tests can run a second,
independent broker in a temporary directory on other ports.

Choices worth knowing:
- auto.create.topics.enable=false: a misspelt topic name fails loudly instead of
  silently creating a new topic; the project's topics are created explicitly,
  with the right partition counts, by `create-topics` (which `start` also runs).
- A static controller quorum (controller.quorum.voters) rather than
  `kafka-storage format --standalone`: the controller address is then read from
  server.properties on every start, so the ports can change between runs.
- Replication factor 1, 3 partitions for consumer offsets, no initial
  rebalance delay and a 512 MB heap: one node that starts in seconds and
  leaves room on a shared 2-core machine.
- Starting twice is harmless, and stop only signals the process whose command
  line names this state dir's server.properties: a stale pid file (after a
  reboot its number may belong to anything) is removed, never acted on
  (``periscope.daemons``).

The same machinery (``start_nodes``, ``stop_nodes``) starts the three-node
cluster of ``periscope.cluster``: each node is broker and controller, the
quorum is all of them, and the replication factor is min(3, nodes) with
min.insync.replicas one less (never below 1).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from periscope import cli, daemons
from periscope.daemons import free_ports, tail

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POM = PROJECT_ROOT / "infra" / "kafka" / "pom.xml"
TOPIC, DLQ_TOPIC = "taxi-trips", "taxi-trips-dlq"
DEFAULT_PORT, DEFAULT_CONTROLLER_PORT = 9092, 9093
DEFAULT_HEAP = "512m"  # plenty for a teaching broker on a shared laptop-sized box

SERVER_PROPERTIES = """\
# Written by periscope.kafka_local on every start.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data_dir}
num.partitions=3
default.replication.factor={replicas}
min.insync.replicas={min_isr}
auto.create.topics.enable=false
offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=3
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
"""

LOG4J2_PROPERTIES = """\
# The broker logs to stdout, which kafka_local redirects to logs/broker.log.
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
"""


class KafkaLocalError(RuntimeError):
    """Something the user can fix; the message says what and how."""


@dataclass(frozen=True)
class BrokerFiles:
    """Where one broker keeps everything: <state dir>/kafka (a cluster's nodes: a directory each)."""

    root: Path
    libs: Path
    data: Path
    log_file: Path
    properties: Path
    log4j: Path
    pid_file: Path

    @classmethod
    def of(cls, state_dir: Path) -> BrokerFiles:
        """The single broker of state_dir."""
        return cls.at(Path(state_dir).resolve() / "kafka")

    @classmethod
    def at(cls, root: Path, libs: Path | None = None) -> BrokerFiles:
        """A broker kept in root; libs elsewhere lets several brokers share one copy of the jars."""
        return cls(root, libs=libs or root / "libs", data=root / "data", log_file=root / "logs" / "broker.log",
                   properties=root / "server.properties", log4j=root / "log4j2.properties",
                   pid_file=root / "broker.pid")

    @property
    def daemon(self) -> daemons.Daemon:
        return daemons.Daemon("Kafka broker", self.pid_file, f" kafka.Kafka {self.properties}", self.log_file)


@dataclass(frozen=True)
class KraftNode:
    """One Kafka process, broker and KRaft controller in one: its files and its two ports."""

    files: BrokerFiles
    node_id: int
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        """Where it listens: as last configured if it runs, else on its port."""
        return _configured_bootstrap(self.files) or f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class BrokerInfo:
    """A running broker, as start_broker hands it back."""

    pid: int
    bootstrap: str
    log_file: Path
    started: bool  # False when the broker was already running


@dataclass(frozen=True)
class BrokerStatus:
    """What `status` reports; running and reachable differ when another Kafka holds the port."""

    running: bool  # a broker started from this state dir is alive
    pid: int | None
    bootstrap: str
    reachable: bool  # a Kafka broker (ours or any other) answers at bootstrap


def default_state_dir() -> Path:
    return Path(os.environ.get("PERISCOPE_STATE_DIR") or PROJECT_ROOT / "var")


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version pinned in the pom, the one source of truth for it."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    return ET.parse(pom).getroot().findtext("m:properties/m:kafka.version", namespaces=ns)


def _require(program: str, fix: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise KafkaLocalError(f"`{program}` is not on PATH: {fix}")
    return path


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return _require("java", "install a Java 17+ runtime (Debian/Ubuntu: apt-get install "
                    "openjdk-17-jre-headless; macOS: brew install openjdk@17) or set JAVA_HOME.")


def fetch(libs_dir: Path, pom: Path = POM) -> Path:
    """Copy every jar the broker needs into libs_dir with Maven, unless already done.

    A marker holding the pom's hash is written only after Maven succeeded, so an
    interrupted download, or a new Kafka version in the pom, is fetched again
    rather than run from a half-complete classpath.
    """
    marker = libs_dir / ".fetched"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    if marker.is_file() and marker.read_text().strip() == digest:
        log.info("Kafka %s jars already in %s", kafka_version(pom), libs_dir)
        return libs_dir
    _java()
    mvn = _require("mvn", "install Maven 3.6+ (Debian/Ubuntu: apt-get install maven; "
                   "macOS: brew install maven).")
    libs_dir.mkdir(parents=True, exist_ok=True)
    for old_jar in libs_dir.glob("*.jar"):
        old_jar.unlink()
    log.info("Fetching Kafka %s jars with Maven into %s (the first time downloads ~45 MB) ...",
             kafka_version(pom), libs_dir)
    began = time.monotonic()
    result = subprocess.run([mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
                             f"-DoutputDirectory={libs_dir}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise KafkaLocalError(f"Maven could not fetch the Kafka jars. It needs to reach Maven Central, or "
                              f"a mirror configured in ~/.m2/settings.xml. Maven said:\n{result.stdout}{result.stderr}")
    marker.write_text(digest + "\n")
    log.info("Fetched %d jars in %.0f s.", len(list(libs_dir.glob("*.jar"))), time.monotonic() - began)
    return libs_dir


def running_pid(state_dir: Path) -> int | None:
    """The pid of the broker started from state_dir, if it is still running."""
    return daemons.running_pid(BrokerFiles.of(state_dir).daemon)


def _configured_bootstrap(files: BrokerFiles) -> str | None:
    """The address the broker of this state dir was last configured to listen on."""
    try:
        lines = files.properties.read_text().splitlines()
    except OSError:
        return None
    prefix = "advertised.listeners=PLAINTEXT://"
    return next((line[len(prefix):] for line in lines if line.startswith(prefix)), None)


def is_reachable(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when a Kafka broker answers a metadata request at bootstrap.

    An open port is checked first: it is cheap, and it spares kafka-python a
    background thread and a long timeout for every "not yet" while waiting.
    """
    if not any(daemons.port_open(address, timeout) for address in bootstrap.split(",")):
        return False
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=int(timeout * 1000),
                                 request_timeout_ms=int(timeout * 1000))
    except KafkaError:
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout: float = 15.0) -> list[str]:
    """Create each topic (name -> partitions) that does not exist yet; return those created.

    Idempotent and broker-agnostic, so it serves the local broker, the Docker one
    and any cluster alike. The replication factor is the broker's default
    (1 on a single node, 3 on periscope.cluster's, with min.insync.replicas 2).
    Existing topics are left exactly as they are.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=int(timeout * 1000),
                             request_timeout_ms=int(timeout * 1000))
    try:
        existing = set(admin.list_topics())
        missing = {name: {"num_partitions": partitions, "replication_factor": -1}
                   for name, partitions in topics.items() if name not in existing}
        if missing:
            response = admin.create_topics(missing, raise_errors=False, wait_for_metadata=True)
            for topic in response["topics"]:
                if topic["error_code"] not in (0, TopicAlreadyExistsError.errno):
                    raise KafkaLocalError(f"could not create topic {topic['name']}: {topic['error_message']}")
        return sorted(missing)
    finally:
        admin.close()


def _cluster_id(nodes: Sequence[KraftNode]) -> str:
    """The id the nodes' data dirs were formatted with, or a new one: every node of a cluster shares it."""
    for node in nodes:
        try:
            lines = (node.files.data / "meta.properties").read_text().splitlines()
        except OSError:
            continue
        found = next((line.split("=", 1)[1] for line in lines if line.startswith("cluster.id=")), None)
        if found:
            return found
    cluster_id = "-"
    while cluster_id.startswith("-"):  # as Kafka's own Uuid.randomUuid: a leading '-' reads as an option
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    return cluster_id


def _format_storage(java: str, classpath: str, nodes: Sequence[KraftNode], cluster_id: str) -> None:
    """Give each data dir its KRaft identity once (all at the same time); a formatted dir keeps its data."""
    formats = {}
    for files in (node.files for node in nodes if not (node.files.data / "meta.properties").is_file()):
        log.info("Formatting %s for KRaft (cluster id %s)", files.data, cluster_id)
        formats[files.data] = subprocess.Popen(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id,
             "--config", str(files.properties), "--ignore-formatted"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = [(data, run.communicate()[0]) for data, run in formats.items() if run.wait() != 0]
    if failed:
        raise KafkaLocalError("\n".join(f"formatting {data} failed:\n{said}" for data, said in failed))


def server_properties(node: KraftNode, quorum: Sequence[KraftNode]) -> str:
    """node's server.properties in a cluster of quorum (every node a voter): RF min(3, n), min ISR one less."""
    replicas = min(3, len(quorum))
    voters = ",".join(f"{voter.node_id}@127.0.0.1:{voter.controller_port}" for voter in quorum)
    return SERVER_PROPERTIES.format(node_id=node.node_id, voters=voters, port=node.port,
                                    controller_port=node.controller_port, data_dir=node.files.data,
                                    replicas=replicas, min_isr=max(1, replicas - 1))


def _configure(node: KraftNode, quorum: Sequence[KraftNode]) -> None:
    node.files.log_file.parent.mkdir(parents=True, exist_ok=True)
    node.files.properties.write_text(server_properties(node, quorum))
    node.files.log4j.write_text(LOG4J2_PROPERTIES)


def _launch(node: KraftNode, java: str, classpath: str, heap: str, name: str) -> int:
    files = node.files
    log.info("Starting Kafka %s%s at 127.0.0.1:%d (log: %s)", kafka_version(), name, node.port, files.log_file)
    return daemons.launch(files.daemon, [
        java, f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={files.log4j}", "-cp", classpath, "kafka.Kafka", str(files.properties)],
        cwd=files.root)


def start_nodes(nodes: Sequence[KraftNode], *, heap: str = DEFAULT_HEAP, libs_dir: Path | None = None,
                timeout: float = 60.0) -> list[BrokerInfo]:
    """Start those of nodes (one KRaft quorum) that do not run, and return once every node answers.

    Nodes already running are left as they are, so after one node died this
    starts just that one, which rejoins the others. A port in use stops
    everything before anything starts; a node that fails to come up stops the
    nodes this call started, and the error points to its log.
    """
    pids = [daemons.running_pid(node.files.daemon) for node in nodes]
    missing = [node for node, pid in zip(nodes, pids) if pid is None]
    for node in missing:
        for wanted in (node.port, node.controller_port):
            if not daemons.port_free(wanted):
                raise KafkaLocalError(f"127.0.0.1:{wanted} is already in use by another program (another "
                                      "Kafka?). Stop it, or choose other ports (see --help).")
    started: dict[int, int] = {}
    if missing:
        java = _java()
        classpath = str(fetch(libs_dir or missing[0].files.libs) / "*")
        for node in missing:
            _configure(node, nodes)
        _format_storage(java, classpath, missing, _cluster_id(nodes))
        for node in missing:
            name = f" node {node.node_id}" if len(nodes) > 1 else ""
            started[node.node_id] = _launch(node, java, classpath, heap, name)
    deadline = time.monotonic() + timeout
    try:
        infos = []
        for node, pid in zip(nodes, pids):
            pid = pid or started[node.node_id]
            _wait_until_up(pid, node.bootstrap, node.files, max(deadline - time.monotonic(), 1.0), timeout)
            infos.append(BrokerInfo(pid, node.bootstrap, node.files.log_file, started=node.node_id in started))
        return infos
    except KafkaLocalError:
        stop_nodes(missing)
        raise


def start_broker(state_dir: Path, port: int = DEFAULT_PORT, controller_port: int = DEFAULT_CONTROLLER_PORT,
                 *, heap: str = DEFAULT_HEAP, libs_dir: Path | None = None,
                 timeout: float = 60.0) -> BrokerInfo:
    """Start the broker of state_dir in the background and return once it answers.

    Already running: returns it as is. libs_dir lets several brokers share one
    copy of the (read-only) jars. Either a working broker comes back, or nothing
    is left running and the error points to the log.
    """
    node = KraftNode(BrokerFiles.of(state_dir), 1, port, controller_port)
    return start_nodes([node], heap=heap, libs_dir=libs_dir, timeout=timeout)[0]


def _wait_until_up(pid: int, bootstrap: str, files: BrokerFiles, timeout: float, allowed: float) -> None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if not daemons.alive(pid):
            raise KafkaLocalError(f"the broker exited while starting. Last lines of {files.log_file}:\n"
                                  f"{tail(files.log_file)}\n(Kafka 4 needs Java 17 or newer.)")
        if is_reachable(bootstrap):
            log.info("Kafka answers at %s (pid %d) after %.1f s", bootstrap, pid, time.monotonic() - began)
            return
        time.sleep(0.5)
    raise KafkaLocalError(f"the broker did not answer at {bootstrap} within {allowed:.0f} s, so it was "
                          f"stopped again. See {files.log_file}")


def stop_nodes(nodes: Sequence[KraftNode], timeout: float = 30.0) -> list[int | None]:
    """Stop the nodes that run (all at once); return their pids, None for those that did not run.

    SIGTERM first, which lets Kafka close its logs cleanly (a few seconds);
    SIGKILL only if one still runs after timeout.
    """
    return daemons.stop([node.files.daemon for node in nodes], timeout)


def stop_broker(state_dir: Path, timeout: float = 30.0) -> int | None:
    """Stop the broker started from state_dir; return its pid, or None if none was running."""
    return daemons.stop([BrokerFiles.of(state_dir).daemon], timeout)[0]


def broker_status(state_dir: Path, port: int = DEFAULT_PORT, timeout: float = 2.0) -> BrokerStatus:
    """Whether the broker of state_dir runs, and whether Kafka answers where it should."""
    pid = running_pid(state_dir)
    bootstrap = f"127.0.0.1:{port}"
    if pid is not None:
        bootstrap = _configured_bootstrap(BrokerFiles.of(state_dir)) or bootstrap
    return BrokerStatus(pid is not None, pid, bootstrap, is_reachable(bootstrap, timeout))


def _parser() -> argparse.ArgumentParser:
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", type=Path, default=default_state_dir(),
                       help="where the broker keeps jars, data, logs and its pid file, under kafka/ "
                            "(env PERISCOPE_STATE_DIR)")
    port = argparse.ArgumentParser(add_help=False)
    port.add_argument("--port", type=int, default=int(os.environ.get("KAFKA_PORT", DEFAULT_PORT)),
                      help="port of the broker's client listener on 127.0.0.1 (env KAFKA_PORT)")
    topics = argparse.ArgumentParser(add_help=False)
    topics.add_argument("--partitions", type=int, default=3, help=f"partitions of {TOPIC}, if it is created")
    topics.add_argument("--dlq-partitions", type=int, default=1,
                        help=f"partitions of {DLQ_TOPIC}, if it is created")

    parser = argparse.ArgumentParser(prog="python -m periscope.kafka_local", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, parents=parents,
                                   formatter_class=cli.HelpFormatter)

    command("fetch", "Download the Kafka jars with Maven into <state dir>/kafka/libs, unless already there.", state)
    start = command("start", "Start the broker in the background unless it runs, wait until it answers, "
                             "and create the topics.", state, port, topics)
    start.add_argument("--controller-port", type=int,
                       default=int(os.environ.get("KAFKA_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT)),
                       help="port of the KRaft controller listener on 127.0.0.1 (env KAFKA_CONTROLLER_PORT)")
    start.add_argument("--heap", default=DEFAULT_HEAP, help="maximum Java heap of the broker (-Xmx)")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker to answer")
    stop = command("stop", "Stop the broker started from the state dir, if it runs; nothing else.", state)
    stop.add_argument("--timeout", type=float, default=30.0, help="seconds to wait after SIGTERM before SIGKILL")
    command("status", "Say whether the broker of the state dir runs and whether Kafka answers (where it "
                      "listens, else at --port). Exit code 0 if Kafka answers, 1 if not.", state, port)
    create = command("create-topics", f"Create {TOPIC} and {DLQ_TOPIC} on any broker, unless they exist.", topics)
    create.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                        help="bootstrap servers, host:port[,host:port...] (env KAFKA_BOOTSTRAP_SERVERS)")
    return parser


def _create_topics(bootstrap: str, args: argparse.Namespace) -> None:
    try:
        created = ensure_topics(bootstrap, {TOPIC: args.partitions, DLQ_TOPIC: args.dlq_partitions})
    except KafkaError as error:
        raise KafkaLocalError(f"cannot create topics at {bootstrap} ({error}). Is Kafka running there? "
                              "Start the local one with: python -m periscope.kafka_local start") from error
    print(f"Topics at {bootstrap}: " + (f"created {', '.join(created)}." if created
                                          else f"{TOPIC} and {DLQ_TOPIC} already exist."))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # our own messages say what went wrong
    try:
        if args.command == "fetch":
            fetch(BrokerFiles.of(args.state_dir).libs)
        elif args.command == "start":
            info = start_broker(args.state_dir, args.port, args.controller_port, heap=args.heap,
                                timeout=args.timeout)
            if not info.started:
                print(f"Kafka is already running at {info.bootstrap} (pid {info.pid}).")
            _create_topics(info.bootstrap, args)
            print(f"Kafka is up at {info.bootstrap} (pid {info.pid}); log: {info.log_file}")
        elif args.command == "stop":
            pid = stop_broker(args.state_dir, timeout=args.timeout)
            print(f"Stopped Kafka (pid {pid})." if pid else "No Kafka broker from this state dir is running.")
        elif args.command == "status":
            status = broker_status(args.state_dir, args.port)
            owner = f"running, pid {status.pid}" if status.running else "not running from this state dir"
            answer = "answers" if status.reachable else "does not answer"
            print(f"Local broker: {owner}. Kafka at {status.bootstrap} {answer}.")
            return 0 if status.reachable else 1
        elif args.command == "create-topics":
            _create_topics(args.bootstrap, args)
    except KafkaLocalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
