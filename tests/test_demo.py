"""`make demo` for real: the whole pipeline comes up, merges, and stops only what it started.

The demo runs as a subprocess in a private state/data/model directory with its
own Kafka and dashboard ports, exactly as `python -m periscope.demo` runs from
the Makefile.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from periscope import kafka_local

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


def demo_env(base: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PERISCOPE_STATE_DIR": str(base / "var"),
        "PERISCOPE_DATA_DIR": str(base / "data"),
        "PERISCOPE_MODEL_DIR": str(base / "model"),
        "PERISCOPE_SAMPLE_CSV": str(ROOT / "data" / "nyc_taxi_trip_duration_sample.csv.gz"),
        "PYTHONUNBUFFERED": "1",
    }


def demo_command(ports: list[int]) -> list[str]:
    kafka, controller, dashboard = ports
    return [sys.executable, "-m", "periscope.demo", "--rate", "200", "--batch-every", "15", "--status-every", "5",
            "--kafka-port", str(kafka), "--controller-port", str(controller), "--dashboard-port", str(dashboard)]


def start_demo(base: Path, ports: list[int], log: Path) -> subprocess.Popen:
    return subprocess.Popen(demo_command(ports), cwd=ROOT, env=demo_env(base), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def start_demo_through_tee(base: Path, ports: list[int], log: Path) -> subprocess.Popen:
    """``make demo | tee demo.log`` in a terminal of its own: one process group, as a shell runs it."""
    pipeline = " ".join(shlex.quote(part) for part in demo_command(ports)) + f" 2>&1 | tee {shlex.quote(str(log))}"
    return subprocess.Popen(["bash", "-c", pipeline], cwd=ROOT, env=demo_env(base), stdout=subprocess.DEVNULL,
                            start_new_session=True)


def text(log: Path) -> str:
    """What the log holds so far ("" before ``tee`` has created it)."""
    return log.read_text() if log.exists() else ""


def demo_watcher(base: Path) -> psutil.Process:
    """The demo's own process (the one that stops the others), from its state file."""
    entry = json.loads((base / "var" / "demo" / "state.json").read_text())["watcher"]
    return psutil.Process(entry["pid"])


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode} while waiting for {what}:\n{text(log)}")
        time.sleep(1)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{text(log)[-4000:]}")


def merged_by_both_layers(base: Path) -> tuple[int, int] | None:
    """(batch trips, speed trips) once the dashboard's merge holds both and a stream watermark exists."""
    from periscope import serving

    combined = serving.combined_views(base / "data" / "views", base / "data" / "speed")
    if combined.batch_version and combined.watermark and combined.speed_trips > 0:
        return combined.batch_trips, combined.speed_trips
    return None


def started_processes(base: Path) -> list[dict]:
    return json.loads((base / "var" / "demo" / "state.json").read_text())["processes"]


def dashboard_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_demo_runs_merges_and_stops_only_what_it_started(tmp_path: Path):
    ports = kafka_local.free_ports(3)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    log = tmp_path / "demo-1.log"

    # First run, its output through `| tee`: nothing is running; the demo starts the broker and
    # everything else. Ctrl-C in a terminal interrupts the whole pipeline, `tee` first.
    demo = start_demo_through_tee(tmp_path, ports, log)
    try:
        wait_for(lambda: "Periscope is running" in text(log), 240, "banner", demo, log)
        assert dashboard_answers(ports[2])
        wait_for(lambda: merged_by_both_layers(tmp_path), 120, "batch version with a stream watermark plus speed trips",
                 demo, log)
        children = [psutil.Process(entry["pid"]) for entry in started_processes(tmp_path)]
        assert {entry["name"] for entry in started_processes(tmp_path)} == {"speed layer", "producer", "dashboard"}
        watcher = demo_watcher(tmp_path)
        os.killpg(demo.pid, signal.SIGINT)
        watcher.wait(90)  # not our child: psutil cannot tell its exit code, only that it ended
        demo.wait(30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    assert not kafka_local.is_reachable(f"127.0.0.1:{ports[0]}"), "the demo started the broker, so it stops it"
    assert bystander.poll() is None, "a process the demo did not start was touched"

    # Second run: the broker is already running (not the demo's), model and history are kept.
    state_dir = tmp_path / "var"
    kafka_local.start_broker(state_dir, ports[0], ports[1])
    log2 = tmp_path / "demo-2.log"
    demo = start_demo(tmp_path, ports, log2)
    try:
        wait_for(lambda: "Periscope is running" in log2.read_text(), 240, "banner", demo, log2)
        second = log2.read_text()
        assert "already running" in second
        assert "is live in" in second, "the second run keeps the trained model"
        assert "already in master data" in second, "the history is not imported twice"
        producer_log = tmp_path / "var" / "demo" / "logs" / "producer.log"
        wait_for(lambda: "resuming after" in producer_log.read_text(), 60, "the producer's resume line", demo, log2)
        down = subprocess.run([sys.executable, "-m", "periscope.demo", "down"], cwd=ROOT, env=demo_env(tmp_path),
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "asking the demo" in down.stdout and "stopped the Kafka broker" not in down.stdout
        assert demo.wait(60) == 0, log2.read_text()
        assert "stopping what the demo started" in log2.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
        assert kafka_local.is_reachable(f"127.0.0.1:{ports[0]}"), "a broker the demo did not start keeps running"
        kafka_local.stop_broker(state_dir)
        bystander.kill()
