"""The clusters of periscope.cluster, for real: three KRaft brokers, a Spark master and two workers.

One set of clusters serves every test (the session fixture ``clusters``, on
free ports in a temporary state dir). The fault tests kill a part with
``kill -9`` while work runs through it, check that nothing was lost or
counted twice (against pandas over the input), and start the part again
before they end, as ``make cluster-up`` would.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

import batch_processor
from periscope import cluster, config, daemons, kafka_local, speed_view, storage, views
from tests.conftest import assert_exactly_once, consumer_args, produce, read_topic, trip_messages, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "periscope.cluster", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def pids(state_dir: Path) -> list[int | None]:
    return [daemons.running_pid(d) for d in cluster.cluster_of(state_dir).all_daemons()]


def fresh_topics(bootstrap: str) -> tuple[str, str]:
    """A trips and a dead-letter topic of this test only, created the way `cluster up` creates the project's."""
    stem = uuid.uuid4().hex[:8]
    trips, dlq = f"trips-{stem}", f"dlq-{stem}"
    assert kafka_local.ensure_topics(bootstrap, {trips: 3, dlq: 1}) == sorted([dlq, trips])
    return trips, dlq


def describe(bootstrap: str, topics: list[str]) -> dict[str, list[dict]]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {topic["name"]: topic["partitions"] for topic in admin.describe_topics(topics)}
    finally:
        admin.close()


def in_sync_everywhere(bootstrap: str, topics: list[str], replicas: int = 3) -> bool:
    return all(len(p["isr_nodes"]) == replicas for partitions in describe(bootstrap, topics).values() for p in partitions)


def test_status_says_every_part_answers(clusters):
    result = cli("status", "--state-dir", str(clusters.state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all("running, pid" in line for line in lines)
    assert all(f"127.0.0.1:{port} answers" in result.stdout for port in clusters.layout.kafka_ports)
    assert f"{clusters.layout.spark_master} answers" in result.stdout
    assert result.stdout.count("alive at the master") == 2


def test_starting_again_is_harmless(clusters):
    before = pids(clusters.state_dir)
    result = cli("up", "--state-dir", str(clusters.state_dir))  # default ports: the running ones win
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert f"KAFKA_BOOTSTRAP_SERVERS={clusters.bootstrap}" in result.stdout
    assert f"SPARK_MASTER={clusters.layout.spark_master}" in result.stdout
    assert pids(clusters.state_dir) == before and None not in before


def test_stop_stops_only_what_its_state_dir_started(clusters, unrelated_process, tmp_path):
    """Pid files naming a process that is not ours, and the running clusters' own brokers and master:
    another state dir's `down` removes them and signals nothing."""
    running = pids(clusters.state_dir)
    other = cluster.cluster_of(tmp_path, clusters.layout)
    for daemon, pid in zip(other.all_daemons(), [unrelated_process.pid, *running[1:]]):
        daemon.pid_file.parent.mkdir(parents=True, exist_ok=True)
        daemon.pid_file.write_text(f"{pid}\n")
    result = cli("down", "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Nothing of a cluster from this state dir is running" in result.stdout
    assert unrelated_process.poll() is None
    assert pids(clusters.state_dir) == running
    assert not any(d.pid_file.exists() for d in other.all_daemons())


def test_topics_have_three_replicas_and_min_isr_two(clusters):
    created = fresh_topics(clusters.bootstrap)
    wanted = {created[0]: 3, created[1]: 1, config.TRIPS_TOPIC: 3, config.DLQ_TOPIC: 1}

    def partitions_known() -> bool:  # the broker asked may learn of a new topic's partitions a moment later
        return {name: len(partitions) for name, partitions in describe(clusters.bootstrap, list(wanted)).items()} \
            == wanted

    wait_for(partitions_known, 30, "every broker knowing the new topics' partitions")
    described = describe(clusters.bootstrap, list(wanted))
    assert all(len(p["replica_nodes"]) == 3 for partitions in described.values() for p in partitions)
    wait_for(lambda: None not in min_insync_replicas(clusters.bootstrap, list(wanted)).values(), 30,
             "every broker knowing the new topics' configs")
    assert min_insync_replicas(clusters.bootstrap, list(wanted)) == {name: "2" for name in wanted}


def min_insync_replicas(bootstrap: str, topics: list[str]) -> dict[str, str | None]:
    """Each topic's min.insync.replicas as the broker asked reports it (None: it has not heard of it yet)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name, {"min.insync.replicas": None})
                                          for name in topics], config_filter="all")
    finally:
        admin.close()
    return {name: configs["topic"].get(name, {}).get("min.insync.replicas", {}).get("value") for name in topics}


def test_a_broker_killed_mid_stream_loses_and_duplicates_no_trip(clusters, sample_raw, trained_model_dir,
                                                                independent_clean_mask, tmp_path):
    """Producer and speed layer keep going through a `kill -9` of the leader of partition 0 (acks=all,
    min ISR 2); the broker, started again, rejoins every partition's ISR."""
    topics = fresh_topics(clusters.bootstrap)
    june = sample_raw[pd.to_datetime(sample_raw["pickup_datetime"]) >= pd.Timestamp("2016-06-01")]
    expected = set(june.loc[independent_clean_mask(june), "id"])
    speed_dir = tmp_path / "speed"
    env = clusters.env()
    with open(tmp_path / "consumer.log", "wb") as log:
        consumer = subprocess.Popen([sys.executable, "kafka_consumer.py", *consumer_args(
            clusters.bootstrap, topics, speed_dir, trained_model_dir, idle=None)], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT)
    leader = describe(clusters.bootstrap, [topics[0]])[topics[0]][0]["leader_id"]
    victim = cluster.cluster_of(clusters.state_dir).kafka_nodes()[leader - 1]
    producer = None
    try:
        wait_for(lambda: speed_view.read_statuses(speed_dir), 90, "the speed layer polling")
        with open(tmp_path / "producer.log", "wb") as log:
            producer = subprocess.Popen([sys.executable, "kafka_producer.py", "--topic", topics[0], "--rate", "500"],
                                        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # the first trips through, then the kill: 23 s of sending at 500/s leave time under any load
        wait_for(lambda: bool(speed_view.batch_files(speed_dir)), 60, "the first trips in the speed view")
        assert producer.poll() is None, "the broker must die while the producer sends"
        os.kill(daemons.running_pid(victim.files.daemon), signal.SIGKILL)
        assert producer.wait(timeout=120) == 0, (tmp_path / "producer.log").read_text()
        wait_for(lambda: len(speed_view.read_speed(speed_dir)) >= len(expected), 120, "every trip in the speed view")
    finally:
        if producer is not None:
            producer.kill()
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=60)
        clusters.restart()
    assert consumer.returncode == 0, (tmp_path / "consumer.log").read_text()
    assert_exactly_once(speed_view.read_speed(speed_dir), expected)
    on_topic = read_topic(clusters.bootstrap, topics[0])
    assert sorted(m.key.decode() for m in on_topic) == sorted(june["id"])
    wait_for(lambda: in_sync_everywhere(clusters.bootstrap, list(topics)), 60, "the broker back in every ISR")


def test_batch_recompute_on_the_spark_cluster_survives_a_killed_worker(clusters, sample_csv, sample_raw,
                                                                      assert_views_match_pandas, tmp_path):
    """`batch_processor.py recompute --engine spark` on the workers, one of them `kill -9`ed while the job
    runs on both: the job completes, its views equal the python engine's and pandas'."""
    master_dir = tmp_path / "master"
    batch_processor.import_csv(sample_csv, master_dir, cutoff_ms=None)
    python_views = batch_processor.compute_views(master_dir, workers=1, progress=False).views
    command = [sys.executable, "batch_processor.py", "--master-dir", str(master_dir), "--views-dir",
               str(tmp_path / "views"), "--speed-dir", str(tmp_path / "speed"), "recompute", "--engine", "spark"]
    worker = cluster.cluster_of(clusters.state_dir).workers()[0]
    with open(tmp_path / "spark.log", "wb") as log:
        job = subprocess.Popen(command, cwd=ROOT, env=clusters.env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: all(w["coresused"] == 1 for w in busy_workers(clusters.layout)), 120,
                 "executors on both workers")
        wait_for(lambda: "recomputing batch views" in (tmp_path / "spark.log").read_text(), 120, "the job running")
        os.kill(daemons.running_pid(worker), signal.SIGKILL)
        assert job.wait(timeout=300) == 0, (tmp_path / "spark.log").read_text()[-3000:]
    finally:
        job.kill()
        clusters.restart()
    spark_views, manifest = storage.read_version(tmp_path / "views")
    assert manifest["engine"] == "spark"
    assert views.views_equal(spark_views, python_views)
    assert_views_match_pandas(spark_views, sample_raw)


def busy_workers(layout: cluster.Layout) -> list[dict]:
    """The master's view of this layout's workers that are alive (two while none was killed)."""
    state = cluster.master_state(layout) or {}
    ours = {f"http://127.0.0.1:{port}" for port in layout.worker_ui_ports}
    alive = [w for w in state.get("workers", []) if w["state"] == "ALIVE" and w["webuiaddress"] in ours]
    return alive if len(alive) == 2 else [{"coresused": 0}]


def test_the_spark_streaming_driver_killed_on_the_cluster_resumes_from_its_checkpoint(
        clusters, sample_trips, sample_raw, trained_model_dir, independent_clean_mask, tmp_path):
    """`spark_streaming.py` on the workers, its driver `kill -9`ed mid-stream: run again, it resumes from its
    checkpoint and the speed view holds each valid trip once."""
    trips, raw = sample_trips.head(2000), sample_raw.head(2000)
    assert list(trips["id"]) == list(raw["id"])
    expected = set(raw.loc[independent_clean_mask(raw), "id"])
    topics = fresh_topics(clusters.bootstrap)
    produce(clusters.bootstrap, topics[0], trip_messages(trips))
    speed_dir, checkpoint = tmp_path / "speed", tmp_path / "checkpoint"
    argv = ["spark_streaming.py", "--topic", topics[0], "--dlq-topic", topics[1], "--speed-dir", str(speed_dir),
            "--model-dir", str(trained_model_dir), "--checkpoint-dir", str(checkpoint), "--no-windows",
            "--trigger", "100 milliseconds", "--max-offsets-per-trigger", "700"]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=clusters.env(), stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(speed_view.batch_files(speed_dir)) >= 3, 240, "the first speed files", poll_s=0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert "on spark://127.0.0.1" in (tmp_path / "first.log").read_text()
    assert 0 < len(speed_view.read_speed(speed_dir)) < len(expected), "killed mid-stream"

    again = subprocess.run([sys.executable, *argv, "--stop-when-idle", "3"], cwd=ROOT, env=clusters.env(),
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_exactly_once(speed_view.read_speed(speed_dir), expected)


def test_a_taken_spark_port_is_reported_and_nothing_is_started(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        ports = daemons.free_ports(10)
        layout = cluster.Layout(tuple(ports[0:3]), tuple(ports[3:6]), taken.getsockname()[1], ports[7],
                                tuple(ports[8:10]))
        with pytest.raises(cluster.ClusterError, match=f"127.0.0.1:{taken.getsockname()[1]}, a port of the Spark "
                                                        "master, is already in use"):
            cluster.start_spark(cluster.cluster_of(tmp_path, layout), timeout=10)
    finally:
        taken.close()
    assert not any(d.pid_file.exists() for d in cluster.cluster_of(tmp_path).spark_daemons())
