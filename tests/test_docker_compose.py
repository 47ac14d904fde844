"""docker-compose.yaml: valid for Docker Compose, and true to the project's rules.

Docker cannot run in CI, so two things are checked instead of starting containers:

1. Docker Compose itself parses and validates the file: the ``docker-compose``
   1.29.2 binary from PyPI (in ``.venv-compose``, installed by ``make
   compose-check`` and ``make test``) runs ``config -q``, and ``config`` gives
   the file back resolved (anchors, defaults, normalised ports and volumes).
2. The resolved file keeps the project's rules: ports on 127.0.0.1 only, a
   health check on every long-running service, start order by health or by
   successful completion, named volumes at the paths the scripts are told, no
   literal secrets, the environment variables of ``periscope/config.py``, and
   the Kafka and Spark versions the rest of the project pins.

Each rule is a pure function returning the problems it finds, so the tests
below also feed it a broken copy and watch it complain.
"""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from periscope import airflow_local, config, kafka_local

ROOT = config.PROJECT_ROOT
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
VALIDATOR = ROOT / ".venv-compose" / "bin" / "docker-compose"
PROJECT_IMAGE = "periscope:local"
APP_DIR = "/app"
"""Where the Dockerfile puts the repository inside the image."""

LONG_RUNNING = {"kafka", "spark-master", "spark-worker", "speed-layer", "spark-streaming", "airflow", "dashboard"}
ONE_SHOT = {"kafka-init", "model-init", "batch", "batch-spark", "producer"}
SCRIPT_VARIABLE = re.compile(r"^(PERISCOPE_\w+|KAFKA_\w+|SPARK_\w+|AIRFLOW_HOME)$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY$", re.IGNORECASE)
REQUIRED_VARIABLE = re.compile(r"^\$\{\w+:\?[^}]+\}$")
"""How a secret may appear: ``${NAME:?explanation}``, so Compose refuses to start without it."""


# --- reading the file ---------------------------------------------------------------------------------


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VALIDATOR), "-f", str(path), "config", "-q"], capture_output=True, text=True,
                          cwd=path.parent)


def resolved(path: Path) -> dict[str, Any]:
    """The file as Docker Compose resolves it (anchors merged, ports and volumes in their short form)."""
    result = subprocess.run([str(VALIDATOR), "-f", str(path), "config"], capture_output=True, text=True,
                            cwd=path.parent)
    if result.returncode != 0:
        pytest.fail(f"Docker Compose rejects {path.name}:\n{result.stderr}")
    return yaml.safe_load(result.stdout)


def config_variables(source: Path = ROOT / "periscope" / "config.py") -> set[str]:
    """Every environment variable periscope/config.py reads."""
    text = source.read_text()
    return set(re.findall(r"""(?:_path_from_env|os\.environ\.get)\(\s*["']([A-Z_]+)["']""", text))


def pyspark_pin(requirements: Path = ROOT / "requirements.txt") -> str:
    match = re.search(r"^pyspark==([\w.]+)\s*$", requirements.read_text(), re.MULTILINE)
    assert match, "requirements.txt pins no pyspark version"
    return match[1]


def is_project(service: dict) -> bool:
    return service.get("image") == PROJECT_IMAGE


def named_volume(entry: str | dict) -> tuple[str, str]:
    """(source, target) of a volume entry, short ('src:dst:mode') or long form."""
    if isinstance(entry, dict):
        return str(entry.get("source", "")), str(entry["target"])
    parts = entry.split(":")
    return (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])


# --- the rules: each returns the problems it finds ----------------------------------------------------


def port_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else (
                str(port).split(":")[0] if str(port).count(":") == 2 else None)
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {port} is not bound to 127.0.0.1")
    return problems


def lifecycle_problems(compose: dict) -> list[str]:
    """Long-running services restart and have a health check; one-shot jobs do neither."""
    problems = []
    services = compose["services"]
    for name in sorted((LONG_RUNNING | ONE_SHOT) - services.keys()):
        problems.append(f"{name}: missing")
    for name, service in services.items():
        restart = str(service.get("restart", "no"))
        if name in LONG_RUNNING:
            test = (service.get("healthcheck") or {}).get("test")
            if not test or service["healthcheck"].get("disable"):
                problems.append(f"{name}: long-running but no health check")
            if restart not in ("unless-stopped", "always"):
                problems.append(f"{name}: long-running but restart is {restart!r}")
        elif name in ONE_SHOT:
            if restart != "no":
                problems.append(f"{name}: a one-shot job must not restart (restart: {restart!r})")
        else:
            problems.append(f"{name}: neither long-running nor one-shot; add it to one of the lists in this test")
    return problems


def dependency_problems(compose: dict) -> list[str]:
    """Wait for health of a service, for success of a job: never merely for a container to exist."""
    problems = []
    for name, service in compose["services"].items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions")
            continue
        for target, rule in depends.items():
            wanted = "service_healthy" if target in LONG_RUNNING else "service_completed_successfully"
            if (rule or {}).get("condition") != wanted:
                problems.append(f"{name}: depends on {target} with {rule}, should be condition {wanted}")
    return problems


def volume_problems(compose: dict) -> list[str]:
    """Named volumes only, each always mounted at one path, which is the path the scripts are told."""
    problems = []
    declared = set(compose.get("volumes") or {})
    where: dict[str, str] = {}
    for name, service in compose["services"].items():
        told = {value for key, value in (service.get("environment") or {}).items()
                if key.endswith("_DIR") or key == "AIRFLOW_HOME"}
        for entry in service.get("volumes", []):
            source, target = named_volume(entry)
            if source not in declared:
                problems.append(f"{name}: {entry} is not a named volume declared under volumes:")
                continue
            if where.setdefault(source, target) != target:
                problems.append(f"{name}: volume {source} at {target}, elsewhere at {where[source]}")
            if is_project(service) and target not in told:
                problems.append(f"{name}: {target} is mounted but no *_DIR / AIRFLOW_HOME variable points there")
    return problems


def secret_problems(raw: dict) -> list[str]:
    """No literal passwords or secrets; a secret may only come from a required variable."""
    problems = []
    for name, service in raw["services"].items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            if SECRET_NAME.search(key) and not REQUIRED_VARIABLE.match(str(value)):
                problems.append(f"{name}: {key} has a literal value; use ${{{key}:?...}} or a generated one")
            if "ALL_ADMINS" in key and str(value).lower() == "true":
                problems.append(f"{name}: {key}=true switches Airflow's login off")
        command = " ".join(map(str, service.get("command") or []))
        if re.search(r"password|secret", command, re.IGNORECASE):
            problems.append(f"{name}: the command line carries a password or secret: {command}")
    return problems


def environment_problems(compose: dict, known: set[str]) -> list[str]:
    """Project services read exactly the variables the scripts read, and all agree on them."""
    problems = []
    expected = {"KAFKA_BOOTSTRAP_SERVERS", "PERISCOPE_DATA_DIR", "PERISCOPE_MASTER_DIR", "PERISCOPE_VIEWS_DIR",
                "PERISCOPE_SPEED_DIR", "PERISCOPE_MODEL_DIR", "PERISCOPE_STATE_DIR", "PERISCOPE_TRIPS_TOPIC",
                "PERISCOPE_DLQ_TOPIC", "SPARK_MASTER", "AIRFLOW_HOME"}
    reference: dict[str, str] | None = None
    for name, service in compose["services"].items():
        if not is_project(service):
            continue
        environment = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        for key in sorted(k for k in environment if SCRIPT_VARIABLE.match(k) and k not in known):
            problems.append(f"{name}: {key} is read by nothing (not in periscope/config.py)")
        for key in sorted(expected - environment.keys()):
            problems.append(f"{name}: {key} is not set")
        shared = {k: v for k, v in environment.items() if k in expected}
        reference = reference or shared
        if shared != reference:
            problems.append(f"{name}: the shared variables differ from the other services' ({shared})")
    return problems


def listener_map(text: str) -> dict[str, str]:
    """'INTERNAL://kafka:9092,HOST://127.0.0.1:9092' -> {'INTERNAL': 'kafka:9092', 'HOST': '127.0.0.1:9092'}."""
    return dict(item.split("://", 1) for item in text.split(","))


def kafka_problems(compose: dict, kafka_version: str) -> list[str]:
    problems = []
    kafka = compose["services"]["kafka"]
    image, _, tag = kafka["image"].partition(":")
    if image != "apache/kafka":
        problems.append(f"kafka: image {image}, not the official apache/kafka")
    if tag != kafka_version:
        problems.append(f"kafka: tag {tag!r}, but infra/kafka/pom.xml pins Kafka {kafka_version}")
    env = {k: str(v) for k, v in kafka["environment"].items()}
    if env.get("KAFKA_PROCESS_ROLES") != "broker,controller":
        problems.append("kafka: not a single-node KRaft broker+controller")
    if env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") != "false":
        problems.append("kafka: topics must be created explicitly (auto.create.topics.enable=false)")
    advertised, listening = listener_map(env["KAFKA_ADVERTISED_LISTENERS"]), listener_map(env["KAFKA_LISTENERS"])
    internal = advertised.get(env.get("KAFKA_INTER_BROKER_LISTENER_NAME", ""))
    for name, service in compose["services"].items():
        bootstrap = (service.get("environment") or {}).get("KAFKA_BOOTSTRAP_SERVERS")
        if is_project(service) and bootstrap != internal:
            problems.append(f"{name}: KAFKA_BOOTSTRAP_SERVERS={bootstrap}, the broker advertises {internal}")
    published = {str(port).split("/")[0] for port in kafka.get("ports", [])}
    for listener, address in advertised.items():
        host, _, port = address.rpartition(":")
        if host != "127.0.0.1":
            continue
        container_port = listening.get(listener, "").rpartition(":")[2]
        if f"127.0.0.1:{port}:{container_port}" not in published:
            problems.append(f"kafka: {listener} advertises {address}, but 127.0.0.1:{port} is not published "
                            f"to its container port {container_port} (published: {sorted(published)})")
    return problems


def spark_problems(compose: dict, spark_version: str) -> list[str]:
    problems = []
    master = compose["services"]["spark-master"]
    if master["image"] != f"apache/spark:{spark_version}":
        problems.append(f"spark-master: image {master['image']}, but requirements.txt pins pyspark=={spark_version}")
    worker = compose["services"]["spark-worker"]
    if not is_project(worker):
        problems.append("spark-worker: executors run the project's Python code, so the worker needs its image")
    url = f"spark://spark-master:{master['command'][master['command'].index('--port') + 1]}"
    for name, service in compose["services"].items():
        if is_project(service) and service["environment"].get("SPARK_MASTER") != url:
            problems.append(f"{name}: SPARK_MASTER={service['environment'].get('SPARK_MASTER')}, the master is {url}")
    if url not in worker["command"]:
        problems.append(f"spark-worker: does not register with {url}")
    return problems


def airflow_problems(compose: dict) -> list[str]:
    """Airflow runs with `python -m periscope.airflow_local standalone`'s settings, paths moved into the image.

    Only the addresses differ by design: the API server listens on every interface
    of its container (published on 127.0.0.1), and links point at the published address.
    PATH and PYTHONPATH are the image's own (its Python is on PATH, the code in /app).
    """
    by_design = {"AIRFLOW__API__HOST", "AIRFLOW__API__BASE_URL", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                 "PYTHONPATH", "PATH"}
    service = compose["services"]["airflow"]
    environment = {k: str(v) for k, v in service["environment"].items()}
    home = Path(environment["AIRFLOW_HOME"])
    local = airflow_local.airflow_env(home, host="127.0.0.1", port=8080, base={})
    problems = []
    for key, value in sorted(local.items()):
        value = value.replace(str(ROOT), APP_DIR)
        if key not in by_design and environment.get(key) != value:
            problems.append(f"airflow: {key}={environment.get(key)!r}, periscope.airflow_local uses {value!r}")
    port = environment.get("AIRFLOW__API__PORT")
    if f"127.0.0.1:{port}:{port}/tcp" not in service.get("ports", []):
        problems.append(f"airflow: API port {port} is not published on 127.0.0.1:{port}")
    if environment.get("AIRFLOW__API__BASE_URL") != f"http://127.0.0.1:{port}":
        problems.append("airflow: BASE_URL must be the published address, or the UI's links go nowhere")
    return problems


def image_problems(dockerfile: str, compose: dict) -> list[str]:
    problems = []
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not re.search(rf"^FROM python:{re.escape(python)}-slim", dockerfile, re.MULTILINE):
        problems.append(f"Dockerfile: the base image is not python:{python}-slim, the Python the tests run on")
    if "pip install -r requirements.txt" not in dockerfile:
        problems.append("Dockerfile: does not install requirements.txt")
    if not re.search(r"openjdk-(1[7-9]|2\d)-jre", dockerfile):
        problems.append("Dockerfile: no Java 17+ runtime for Spark")
    for name, service in compose["services"].items():
        if is_project(service) and Path(service.get("build", {}).get("context", "")).resolve() != ROOT:
            problems.append(f"{name}: not built from this repository's Dockerfile")
    return problems


# --- the tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    if not VALIDATOR.exists():
        pytest.fail(f"{VALIDATOR} is missing: `make compose-check` installs Docker Compose 1.29.2 into .venv-compose")
    return resolved(COMPOSE_FILE)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_docker_compose_validates_the_file(compose: dict) -> None:
    result = validate(COMPOSE_FILE)
    assert result.returncode == 0, result.stderr


def test_docker_compose_rejects_a_broken_file(compose: dict, tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: service_ready", 1))
    result = validate(broken)
    assert result.returncode != 0
    assert "service_ready" in result.stderr


@pytest.mark.parametrize("rule", [port_problems, lifecycle_problems, dependency_problems, volume_problems])
def test_structure_rules_hold(compose: dict, rule) -> None:
    assert rule(compose) == []


def test_no_literal_secrets(raw: dict) -> None:
    assert secret_problems(raw) == []


def test_environment_is_the_scripts_environment(compose: dict) -> None:
    known = config_variables()
    assert {"KAFKA_BOOTSTRAP_SERVERS", "PERISCOPE_SPEED_DIR", "SPARK_MASTER", "AIRFLOW_HOME"} <= known
    assert environment_problems(compose, known) == []


def test_kafka_is_the_official_image_at_the_pinned_version(compose: dict) -> None:
    assert kafka_problems(compose, kafka_local.kafka_version()) == []


def test_spark_matches_pyspark(compose: dict) -> None:
    assert spark_problems(compose, pyspark_pin()) == []


def test_airflow_runs_with_the_project_settings(compose: dict) -> None:
    assert airflow_problems(compose) == []


def test_one_image_for_the_python_layers(compose: dict) -> None:
    assert image_problems(DOCKERFILE.read_text(), compose) == []


def test_the_layers_run_the_scripts(compose: dict) -> None:
    services = compose["services"]
    assert services["kafka-init"]["command"] == ["python", "-m", "periscope.kafka_local", "create-topics"]
    assert services["speed-layer"]["command"][:2] == ["python", "kafka_consumer.py"]
    assert services["spark-streaming"]["command"][:2] == ["python", "spark_streaming.py"]
    assert services["batch"]["command"][:2] == ["python", "batch_processor.py"]
    assert services["producer"]["command"][:2] == ["python", "kafka_producer.py"]
    dashboard = services["dashboard"]["command"]
    assert dashboard[:3] == ["streamlit", "run", "app.py"]
    assert dashboard[dashboard.index("--server.address") + 1] == "0.0.0.0"  # inside; published on 127.0.0.1
    for script in ("kafka_consumer.py", "batch_processor.py", "kafka_producer.py", "train_model.py"):
        assert (ROOT / script).exists()


# --- every rule can fail -------------------------------------------------------------------------------


def broken(compose: dict, change) -> dict:
    copied = copy.deepcopy(compose)
    change(copied["services"])
    return copied


@pytest.mark.parametrize("change, rule, says", [
    (lambda s: s["dashboard"].update(ports=["8501:8501/tcp"]), port_problems, "not bound to 127.0.0.1"),
    (lambda s: s["airflow"].update(ports=["0.0.0.0:8080:8080/tcp"]), port_problems, "not bound to 127.0.0.1"),
    (lambda s: s["speed-layer"].pop("healthcheck"), lifecycle_problems, "no health check"),
    (lambda s: s["batch"].update(restart="always"), lifecycle_problems, "must not restart"),
    (lambda s: s.pop("spark-worker"), lifecycle_problems, "spark-worker: missing"),
    (lambda s: s["dashboard"]["depends_on"]["batch"].update(condition="service_started"), dependency_problems,
     "should be condition service_completed_successfully"),
    (lambda s: s["speed-layer"]["volumes"].append("./data:/app/data/speed:rw"), volume_problems,
     "not a named volume"),
    (lambda s: s["speed-layer"]["volumes"].append("model:/models:ro"), volume_problems, "elsewhere at"),
    (lambda s: s["batch"]["environment"].update(PERISCOPE_SPEED_DIR="/elsewhere"), volume_problems,
     "no *_DIR / AIRFLOW_HOME variable points there"),
])
def test_structure_rules_catch_mistakes(compose: dict, change, rule, says: str) -> None:
    problems = rule(broken(compose, change))
    assert any(says in problem for problem in problems), problems


def test_secret_rule_catches_a_literal_password(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["services"]["airflow"]["environment"]["AIRFLOW_ADMIN_PASSWORD"] = "admin"
    assert secret_problems(bad) == ["airflow: AIRFLOW_ADMIN_PASSWORD has a literal value; use "
                                    "${AIRFLOW_ADMIN_PASSWORD:?...} or a generated one"]
    bad["services"]["airflow"]["environment"]["AIRFLOW_ADMIN_PASSWORD"] = "${AIRFLOW_ADMIN_PASSWORD:?set it}"
    assert secret_problems(bad) == []


def test_environment_rule_catches_a_variable_nobody_reads(compose: dict) -> None:
    bad = broken(compose, lambda s: s["speed-layer"]["environment"].update(PERISCOPE_SPEED_FOLDER="/x"))
    assert environment_problems(bad, config_variables()) == [
        "speed-layer: PERISCOPE_SPEED_FOLDER is read by nothing (not in periscope/config.py)"]
    bad = broken(compose, lambda s: s["batch"]["environment"].pop("PERISCOPE_TRIPS_TOPIC"))
    assert "batch: PERISCOPE_TRIPS_TOPIC is not set" in environment_problems(bad, config_variables())


def test_version_rules_catch_drift(compose: dict) -> None:
    assert any("pins Kafka 9.9.9" in p for p in kafka_problems(compose, "9.9.9"))
    assert any("pyspark==9.9.9" in p for p in spark_problems(compose, "9.9.9"))
    bad = broken(compose, lambda s: s["kafka"].update(image="bitnami/kafka:4.3.1"))
    assert any("not the official apache/kafka" in p for p in kafka_problems(bad, kafka_local.kafka_version()))
    bad = broken(compose, lambda s: s["kafka"].update(ports=["127.0.0.1:9093:19092/tcp"]))
    assert any("127.0.0.1:9092 is not published" in p for p in kafka_problems(bad, kafka_local.kafka_version()))
    bad = broken(compose, lambda s: s["airflow"]["environment"].update(AIRFLOW__CORE__LOAD_EXAMPLES="True"))
    assert any("AIRFLOW__CORE__LOAD_EXAMPLES" in p for p in airflow_problems(bad))
