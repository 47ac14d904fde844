"""The project's own Kafka broker, for real: nothing mocked.

One broker serves the whole module. It runs from a temporary state dir on free
ports, so it never touches the developer's broker on 9092. The jars are
read-only, so it shares the project's copy (fetched once, on first use) instead
of fetching its own. The last test stops it; the fixture's own stop then checks
that stopping twice is harmless.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from periscope import kafka_local

pytestmark = pytest.mark.kafka

PROJECT_ROOT = Path(kafka_local.__file__).resolve().parent.parent
SHARED_LIBS = kafka_local.BrokerFiles.of(kafka_local.default_state_dir()).libs


class LocalBroker(NamedTuple):
    state_dir: Path
    port: int
    controller_port: int
    info: kafka_local.BrokerInfo


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "periscope.kafka_local", *args], cwd=PROJECT_ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def broker(tmp_path_factory, unrelated_process) -> LocalBroker:
    """A broker whose state dir begins with a stale pid file, as after a reboot."""
    state_dir = tmp_path_factory.mktemp("state")
    pid_file = kafka_local.BrokerFiles.of(state_dir).pid_file
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{unrelated_process.pid}\n")
    port, controller_port = kafka_local.free_ports(2)
    info = kafka_local.start_broker(state_dir, port, controller_port, libs_dir=SHARED_LIBS)
    kafka_local.ensure_topics(info.bootstrap, {kafka_local.TOPIC: 3, kafka_local.DLQ_TOPIC: 1})
    yield LocalBroker(state_dir, port, controller_port, info)
    kafka_local.stop_broker(state_dir)


def test_started_broker_answers_on_its_own_port(broker):
    assert broker.info.started
    assert broker.info.bootstrap == f"127.0.0.1:{broker.port}"
    assert kafka_local.is_reachable(broker.info.bootstrap)
    assert kafka_local.running_pid(broker.state_dir) == broker.info.pid


def test_stale_pid_file_was_replaced_and_its_process_left_alone(broker, unrelated_process):
    assert unrelated_process.poll() is None
    assert broker.info.pid != unrelated_process.pid
    assert kafka_local.BrokerFiles.of(broker.state_dir).pid_file.read_text().strip() == str(broker.info.pid)


def test_starting_again_is_harmless(broker):
    again = kafka_local.start_broker(broker.state_dir, broker.port, broker.controller_port, libs_dir=SHARED_LIBS)
    assert (again.pid, again.started) == (broker.info.pid, False)

    result = cli("start", "--state-dir", str(broker.state_dir), "--port", str(broker.port))
    assert result.returncode == 0, result.stderr
    assert f"already running at {broker.info.bootstrap} (pid {broker.info.pid})" in result.stdout
    assert kafka_local.running_pid(broker.state_dir) == broker.info.pid


def test_a_taken_port_is_reported_and_nothing_is_started(broker, tmp_path):
    with pytest.raises(kafka_local.KafkaLocalError, match=f"127.0.0.1:{broker.port} is already in use"):
        kafka_local.start_broker(tmp_path, broker.port, kafka_local.free_ports(1)[0], libs_dir=SHARED_LIBS)
    assert kafka_local.running_pid(tmp_path) is None


def test_topics_exist_with_their_partition_counts(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.info.bootstrap)
    try:
        described = admin.describe_topics([kafka_local.TOPIC, kafka_local.DLQ_TOPIC])
    finally:
        admin.close()
    partitions = {topic["name"]: len(topic["partitions"]) for topic in described}
    assert partitions == {kafka_local.TOPIC: 3, kafka_local.DLQ_TOPIC: 1}
    assert kafka_local.ensure_topics(broker.info.bootstrap, {kafka_local.TOPIC: 3}) == []


def test_create_topics_command_works_against_any_bootstrap(broker):
    result = cli("create-topics", KAFKA_BOOTSTRAP_SERVERS=broker.info.bootstrap)
    assert result.returncode == 0, result.stderr
    assert "already exist" in result.stdout


def test_a_message_makes_the_round_trip(broker):
    trip_id = f"id-{uuid.uuid4().hex}"
    producer = KafkaProducer(bootstrap_servers=broker.info.bootstrap)
    producer.send(kafka_local.TOPIC, key=trip_id.encode(), value=json.dumps({"id": trip_id}).encode()).get(10)
    producer.close()

    consumer = KafkaConsumer(kafka_local.TOPIC, bootstrap_servers=broker.info.bootstrap,
                             group_id=f"test-{trip_id}", auto_offset_reset="earliest",
                             consumer_timeout_ms=15_000)
    try:
        received = next((json.loads(record.value) for record in consumer if record.key == trip_id.encode()), None)
    finally:
        consumer.close()
    assert received == {"id": trip_id}


def test_status_exit_codes(broker, tmp_path):
    up = cli("status", "--state-dir", str(broker.state_dir))
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"running, pid {broker.info.pid}" in up.stdout and broker.info.bootstrap in up.stdout

    down = cli("status", "--state-dir", str(tmp_path), "--port", str(kafka_local.free_ports(1)[0]))
    assert down.returncode == 1
    assert "not running" in down.stdout and "does not answer" in down.stdout


def test_stop_without_a_broker_is_harmless_and_kills_nothing_else(tmp_path, unrelated_process):
    pid_file = kafka_local.BrokerFiles.of(tmp_path).pid_file
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{unrelated_process.pid}\n")

    assert kafka_local.stop_broker(tmp_path) is None
    assert kafka_local.stop_broker(tmp_path) is None
    assert unrelated_process.poll() is None
    assert not pid_file.exists()
    assert not kafka_local.broker_status(tmp_path, port=kafka_local.free_ports(1)[0]).running


def test_stop_stops_our_broker(broker):
    """Runs last in this module: afterwards the shared broker is gone."""
    began = time.monotonic()
    assert kafka_local.stop_broker(broker.state_dir) == broker.info.pid
    assert time.monotonic() - began < 30
    assert not process_exists(broker.info.pid)
    assert not kafka_local.BrokerFiles.of(broker.state_dir).pid_file.exists()
    assert not kafka_local.is_reachable(broker.info.bootstrap)
    assert cli("status", "--state-dir", str(broker.state_dir), "--port", str(broker.port)).returncode == 1
    assert cli("stop", "--state-dir", str(broker.state_dir)).returncode == 0
