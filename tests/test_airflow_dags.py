"""airflow/dags: the three DAGs parsed by a real DagBag and run for real with ``dag.test()``.

Airflow reads ``AIRFLOW_HOME`` when it is imported, so every Airflow step runs
in a subprocess whose environment points Airflow and every Periscope directory
at this test's temporary directories (``periscope.airflow_local.airflow_env``);
the metadata database is migrated once per module. The effects are read back
from Kafka and from disk in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

import batch_processor
import kafka_producer
import train_model
from periscope import airflow_local, config, simulation, speed_view, storage, views
from periscope.model import current_version, list_versions
from periscope.schema import NOT_RECORDED
from periscope.storage import read_json

ROOT = Path(__file__).resolve().parent.parent
DAG_IDS = ("taxi_api_simulation", "taxi_batch_processing", "taxi_model_retraining")

RUN_DAG = """
import json, sys
import pendulum
from airflow.dag_processing.dagbag import DagBag
dag_id, logical_date, conf = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
bag = DagBag(dag_folder=sys.argv[4])
run = bag.dags[dag_id].test(logical_date=pendulum.parse(logical_date), run_conf=conf)
states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
print("RESULT " + json.dumps({"state": str(run.state), "start": run.data_interval_start.isoformat(),
                              "end": run.data_interval_end.isoformat(), "tasks": states}))
"""

PARSE_DAGS = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("periscope", "batch_processor", "train_model", "kafka_producer", "kafka", "sklearn",
                           "pyarrow", "fastavro") if m in sys.modules)
print("RESULT " + json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "heavy_imports": heavy,
    "dags": {d.dag_id: {"tasks": {t.task_id: sorted(t.downstream_task_ids) for t in d.tasks},
                        "timetable": type(d.timetable).__name__, "cron": getattr(d.timetable, "expression", None),
                        "catchup": d.catchup, "max_active_runs": d.max_active_runs,
                        "params": sorted(d.params)} for d in bag.dags.values()}}))
"""


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    """A temporary AIRFLOW_HOME, migrated once with ``python -m periscope.airflow_local init``."""
    home = tmp_path_factory.mktemp("airflow-home")
    done = subprocess.run([sys.executable, "-m", "periscope.airflow_local", "init", "--home", str(home)],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (home / "airflow.db").exists()
    return home


def project_env(airflow_home: Path, root: Path, bootstrap: str = "127.0.0.1:1",
                topic: str = "unused") -> dict[str, str]:
    """Airflow's settings plus every Periscope directory under ``root``."""
    base = {**os.environ, "PERISCOPE_MASTER_DIR": str(root / "master"), "PERISCOPE_VIEWS_DIR": str(root / "views"),
            "PERISCOPE_SPEED_DIR": str(root / "speed"), "PERISCOPE_MODEL_DIR": str(root / "model"),
            "PERISCOPE_STATE_DIR": str(root / "state"), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "PERISCOPE_TRIPS_TOPIC": topic, "PERISCOPE_BATCH_GROUP": f"batch-{root.name}"}
    return airflow_local.airflow_env(airflow_home, base=base)


def airflow_python(code: str, args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-6000:] + done.stderr[-6000:]
    return {**json.loads(lines[-1][len("RESULT "):]), "log": done.stdout + done.stderr}


def run_dag(env: dict[str, str], dag_id: str, logical_date: str, **conf) -> dict:
    return airflow_python(RUN_DAG, [dag_id, logical_date, json.dumps(conf), env["AIRFLOW__CORE__DAGS_FOLDER"]], env)


def test_the_dag_folder_parses_into_the_three_dags(airflow_home, tmp_path):
    env = project_env(airflow_home, tmp_path)
    parsed = airflow_python(PARSE_DAGS, [env["AIRFLOW__CORE__DAGS_FOLDER"]], env)
    assert parsed["errors"] == {}
    assert parsed["heavy_imports"] == [], "DAG files must import the project's modules inside tasks"
    dags = parsed["dags"]
    assert sorted(dags) == sorted(DAG_IDS)
    assert dags["taxi_api_simulation"]["tasks"] == {"publish_trips": []}
    assert dags["taxi_batch_processing"]["tasks"] == {
        "ingest_new_events": ["compute_views"], "compute_views": ["quality_gate"],
        "quality_gate": ["publish_views"], "publish_views": ["prune_speed_view"], "prune_speed_view": []}
    assert dags["taxi_model_retraining"]["tasks"] == {"train_candidate": ["evaluate_and_promote"],
                                                      "evaluate_and_promote": []}
    assert {d: (dags[d]["timetable"], dags[d]["cron"]) for d in DAG_IDS} == {
        "taxi_api_simulation": ("CronDataIntervalTimetable", "0 * * * *"),
        "taxi_batch_processing": ("CronDataIntervalTimetable", "0 3 * * *"),
        "taxi_model_retraining": ("CronDataIntervalTimetable", "0 4 * * 1")}
    assert all(not dags[d]["catchup"] and dags[d]["max_active_runs"] == 1 for d in DAG_IDS)
    assert "max_rejected_share" in dags["taxi_batch_processing"]["params"]


def test_airflow_env_is_project_local_and_bound_to_localhost(tmp_path):
    env = airflow_local.airflow_env(tmp_path / "home", port=8099, base={})
    assert env["AIRFLOW_HOME"] == str((tmp_path / "home").resolve())
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(ROOT / "airflow" / "dags")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///")
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "8099"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8099/execution/"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 2


def test_standalone_refuses_a_busy_port(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert airflow_local.main(["standalone", "--home", str(tmp_path), "--port", str(port)]) == 2
    assert f"--port {port + 1}" in capsys.readouterr().err


def test_standalone_serves_the_ui_on_localhost_and_stops_everything(airflow_home):
    """`make airflow` for real: healthy, the login works, the DAGs are listed; SIGTERM stops every component."""
    import signal
    import time
    import urllib.request

    from periscope.kafka_local import free_ports

    port = free_ports(1)[0]
    env = {**os.environ, "AIRFLOW_HOME": str(airflow_home)}
    process = subprocess.Popen([sys.executable, "-m", "periscope.airflow_local", "standalone", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "ready after" in line or "error" in line:
                break
        assert "ready after" in "".join(lines), "".join(lines)[-3000:]
        assert f"http://127.0.0.1:{port}" in "".join(lines)
        password_file = airflow_home / airflow_local.PASSWORD_FILE
        assert str(password_file) in "".join(lines) + next(process.stdout)
        url = f"http://127.0.0.1:{port}"
        login = json.dumps({"username": "admin", "password": read_json(password_file)["admin"]}).encode()
        request = urllib.request.Request(f"{url}/auth/token", login, {"Content-Type": "application/json"})
        token = json.load(urllib.request.urlopen(request, timeout=30))["access_token"]
        for _ in range(30):  # the DAG processor parses the folder within seconds of starting
            listed = urllib.request.Request(f"{url}/api/v2/dags", headers={"Authorization": f"Bearer {token}"})
            dags = {d["dag_id"] for d in json.load(urllib.request.urlopen(listed, timeout=30))["dags"]}
            if dags:
                break
            time.sleep(2)
        assert dags == set(DAG_IDS)
        assert not airflow_local.port_free("127.0.0.1", port)
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=90)[0]
    assert process.returncode == 0 and "Airflow stopped" in rest
    assert airflow_local.port_free("127.0.0.1", port)


@pytest.mark.kafka
def test_simulation_dag_publishes_exactly_the_intervals_trips_once(airflow_home, kafka_bootstrap, topics, sample_trips,
                                                                   tmp_path):
    topic, _ = topics
    env = project_env(airflow_home, tmp_path, kafka_bootstrap, topic)
    run = run_dag(env, "taxi_api_simulation", "2026-01-05T18:00:00+00:00")
    assert run["state"] == "success", run["log"][-4000:]
    assert (run["start"], run["end"]) == ("2026-01-05T17:00:00+00:00", "2026-01-05T18:00:00+00:00")

    trips = kafka_producer.replay_order(sample_trips)
    start = datetime(2026, 1, 5, tzinfo=timezone.utc)  # the DAG's START
    timeline = simulation.make_timeline(trips["pickup_datetime"].to_numpy(), simulation.to_ms(start))
    lo = simulation.to_ms(datetime(2026, 1, 5, 17, tzinfo=timezone.utc))
    expected = simulation.to_messages(simulation.select_interval(trips, timeline, lo, lo + 3_600_000))
    in_topic = [(m.key, m.value) for m in simulation.read_topic(kafka_bootstrap, topic, {})]
    assert len(expected) > 5 and sorted(in_topic) == sorted(expected)

    again = run_dag(env, "taxi_api_simulation", "2026-01-05T18:00:00+00:00")
    assert again["state"] == "success" and "already published" in again["log"]
    assert len(simulation.read_topic(kafka_bootstrap, topic, {})) == len(expected)
    ledger = read_json(tmp_path / "state" / "simulation" / topic / "20260105T170000--20260105T180000.json")
    assert ledger["status"] == "published" and ledger["trips"] == len(expected)


def speed_file(speed_dir: Path, trips, partition: int, first: int) -> Path:
    rows = trips.head(3).assign(partition=partition, offset=range(first, first + 3), kafka_timestamp_ms=0,
                                visible_at_ms=0, predicted_duration_s=600.0, model_version="v")
    return speed_view.write_batch(speed_dir, partition, rows.reindex(columns=list(speed_view.COLUMNS),
                                                                     fill_value=NOT_RECORDED))


def master_snapshot(master: Path) -> dict[str, bytes]:
    return {str(p.relative_to(master)): p.read_bytes() for p in storage.master_files(master)}


@pytest.mark.kafka
def test_batch_dag_publishes_checked_views_and_reruns_change_nothing(airflow_home, kafka_bootstrap, topics,
                                                                    sample_trips, sample_raw, tmp_path):
    topic, _ = topics
    env = project_env(airflow_home, tmp_path, kafka_bootstrap, topic)
    trips = kafka_producer.replay_order(sample_trips)
    timeline = simulation.make_timeline(trips["pickup_datetime"].to_numpy(),
                                        simulation.to_ms(datetime(2026, 1, 5, tzinfo=timezone.utc)))
    lo = simulation.to_ms(datetime(2026, 1, 6, tzinfo=timezone.utc))
    sent = simulation.publish_interval(trips, timeline, lo, lo + 6 * 3_600_000, kafka_bootstrap, topic,
                                       tmp_path / "ledger")
    master, views_dir, speed_dir = tmp_path / "master", tmp_path / "views", tmp_path / "speed"
    below, above = speed_file(speed_dir, trips, 0, 0), speed_file(speed_dir, trips, 0, 1_000_000)

    run = run_dag(env, "taxi_batch_processing", "2026-01-07T03:00:00+00:00")
    assert run["state"] == "success", run["log"][-4000:]
    published, manifest = storage.read_version(views_dir)
    assert manifest["version"] == "v000001"
    direct, direct_manifest, *_ = batch_processor.compute_views(master, workers=1, progress=False)
    assert views.views_equal(published, direct)
    history = int((pd.to_datetime(sample_raw["pickup_datetime"]) < pd.Timestamp(config.CUTOFF)).sum())
    assert manifest["rows"]["master"] == history + sent.planned == direct_manifest["rows"]["master"]
    ends = simulation.end_offsets(kafka_bootstrap, topic)
    assert manifest["watermark"] == {str(p): end - 1 for p, end in ends.items() if end}
    assert not below.exists() and above.exists()
    assert not any((tmp_path / "state" / "batch-staging").iterdir())

    before = master_snapshot(master)
    listing = sorted(p.name for p in views_dir.iterdir())
    again = run_dag(env, "taxi_batch_processing", "2026-01-07T03:00:00+00:00")
    assert again["state"] == "success" and "nothing to publish" in again["log"]
    assert master_snapshot(master) == before
    assert sorted(p.name for p in views_dir.iterdir()) == listing
    assert storage.current_version(views_dir) == "v000001"

    simulation.publish_interval(trips, timeline, lo + 6 * 3_600_000, lo + 9 * 3_600_000, kafka_bootstrap, topic,
                                tmp_path / "ledger")
    strict = run_dag(env, "taxi_batch_processing", "2026-01-08T03:00:00+00:00", max_rejected_share=0.001)
    assert strict["state"] == "failed"
    assert strict["tasks"]["quality_gate"] == "failed" and strict["tasks"]["publish_views"] == "upstream_failed"
    assert "data-quality gate failed, nothing published" in strict["log"]
    assert sorted(p.name for p in views_dir.iterdir()) == listing
    assert storage.current_version(views_dir) == "v000001"
    assert len(master_snapshot(master)) > len(before), "the new events are in master data, just not published"


@pytest.mark.slow  # two real trainings
def test_retraining_dag_promotes_only_a_better_model_and_says_why(airflow_home, trained_model_dir, sample_csv,
                                                                 tmp_path):
    env = project_env(airflow_home, tmp_path)
    master, model_dir = tmp_path / "master", tmp_path / "model"
    batch_processor.import_csv(sample_csv, master)
    holdout = trained_model_dir / "versions" / "test-v1" / "holdout.csv.gz"
    shutil.copytree(trained_model_dir, model_dir)
    weak = ["--model-dir", str(model_dir), "--input", str(holdout), "--version", "weak", "--no-save-holdout"]
    assert train_model.main(weak) == 0  # 14k trips: a worse live model than one trained on all master data
    assert current_version(model_dir) == "weak"

    run = run_dag(env, "taxi_model_retraining", "2026-01-12T04:00:00+00:00")
    assert run["state"] == "success", run["log"][-4000:]
    candidate = "20260112T040000Z-retrain"
    decision = read_json(model_dir / "versions" / candidate / "decision.json")
    assert decision["promoted"] and decision["live"] == candidate and decision["previous_live"] == "weak"
    assert decision["scores"][candidate]["rmsle"] < decision["scores"]["weak"]["rmsle"]
    assert decision["scores"][candidate]["rows"] == decision["scores"]["weak"]["rows"] == decision["holdout_rows"]
    assert "better" in decision["reason"] and "not better" not in decision["reason"]
    assert current_version(model_dir) == candidate
    assert {"test-v1", "weak", candidate} <= set(list_versions(model_dir))

    again = run_dag(env, "taxi_model_retraining", "2026-01-12T04:00:00+00:00")
    assert again["state"] == "success" and "not training again" in again["log"]
    assert "already decided" in again["log"] and current_version(model_dir) == candidate

    strict = run_dag(env, "taxi_model_retraining", "2026-01-19T04:00:00+00:00", min_improvement=1.0)
    assert strict["state"] == "success"
    rejected = read_json(model_dir / "versions" / "20260119T040000Z-retrain" / "decision.json")
    assert not rejected["promoted"] and rejected["live"] == candidate
    assert "not better by more than 1" in rejected["reason"]
    assert current_version(model_dir) == candidate
