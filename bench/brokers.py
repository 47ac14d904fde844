"""Private Kafka for a benchmark: the single broker, or a three-broker quorum, on free ports.

``nodes=1`` is ``periscope.kafka_local``'s broker (replication factor 1), what
a laptop runs; ``nodes=3`` is ``periscope.cluster``'s Kafka part (three KRaft
nodes, replication factor 3, ``min.insync.replicas=2``), so with ``acks=all``
every batch is written to two brokers before it counts. Both use the
project's Maven-fetched jars and a temporary state dir, and are stopped
afterwards: a benchmark never touches a broker you run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from periscope import cluster, kafka_local


def parse_broker_counts(text: str) -> list[int]:
    """``"1,3"`` -> ``[1, 3]``; only 1 (the single broker) and 3 (the cluster's quorum) exist."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(count not in (1, 3) for count in counts) or len(set(counts)) != len(counts):
        raise ValueError(f"--brokers takes 1, 3 or 1,3 (the single broker, the three-broker cluster); got {text!r}")
    return counts


def label(nodes: int) -> str:
    return "single broker" if nodes == 1 else f"{nodes}-broker cluster (RF 3, min ISR 2)"


@contextlib.contextmanager
def private_kafka(nodes: int, state_dir: Path, libs: Path) -> Iterator[str]:
    """Start a private Kafka of ``nodes`` nodes under state_dir; yield its bootstrap servers; stop it."""
    if nodes == 1:
        port, controller_port = kafka_local.free_ports(2)
        try:
            yield kafka_local.start_broker(state_dir, port, controller_port, libs_dir=libs).bootstrap
        finally:
            kafka_local.stop_broker(state_dir)
        return
    ports = kafka_local.free_ports(2 * nodes)
    quorum = cluster.Cluster(state_dir / "cluster",
                             cluster.Layout(kafka_ports=tuple(ports[:nodes]), controller_ports=tuple(ports[nodes:])))
    try:
        cluster.start_kafka(quorum, kafka_local.DEFAULT_HEAP, timeout=120.0, libs_dir=libs)
        yield quorum.layout.bootstrap
    finally:
        kafka_local.stop_nodes(quorum.kafka_nodes())
