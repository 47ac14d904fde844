"""Paths and service addresses, with environment-variable fallbacks.

Every script takes its defaults from here so that one exported variable (for
example ``PERISCOPE_DATA_DIR`` in a classroom where the repository is
read-only) moves every layer at once.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

SHIPPED_DATA: tuple[str, ...] = ("zones/taxi_zone_centroids.csv", "zones/taxi_zones.geojson.gz",
                                 "central_park_weather.csv")
"""The files under data/ that the model's features read (zones, weather), wherever they run."""


def shipped_data(name: str) -> Path | zipfile.Path:
    """``data/<name>`` of the project, opened with ``.open("rb")`` and joined with ``/``.

    On a Spark executor ``periscope`` is imported from the zip the job ships
    (``spark_session.project_zip``), which holds ``SHIPPED_DATA`` too: there
    this is the path inside the zip.
    """
    if zipfile.is_zipfile(PROJECT_ROOT):
        return zipfile.Path(PROJECT_ROOT, "data/") / name
    return PROJECT_ROOT / "data" / name


def _path_from_env(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


DATA_DIR = _path_from_env("PERISCOPE_DATA_DIR", PROJECT_ROOT / "data")
"""Shipped sample data plus everything the pipeline writes (master, views, speed)."""

STATE_DIR = _path_from_env("PERISCOPE_STATE_DIR", PROJECT_ROOT / "var")
"""Local infrastructure state: Kafka logs and data, Airflow home, pid files."""

SAMPLE_CSV = _path_from_env("PERISCOPE_SAMPLE_CSV", DATA_DIR / "nyc_taxi_trip_duration_sample.csv.gz")
MASTER_DIR = _path_from_env("PERISCOPE_MASTER_DIR", DATA_DIR / "master")
VIEWS_DIR = _path_from_env("PERISCOPE_VIEWS_DIR", DATA_DIR / "views")
MODEL_DIR = _path_from_env("PERISCOPE_MODEL_DIR", PROJECT_ROOT / "model")
SPEED_DIR = _path_from_env("PERISCOPE_SPEED_DIR", DATA_DIR / "speed")

KAFKA_BOOTSTRAP_SERVERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
TRIPS_TOPIC = os.environ.get("PERISCOPE_TRIPS_TOPIC", "taxi-trips")
DLQ_TOPIC = os.environ.get("PERISCOPE_DLQ_TOPIC", "taxi-trips-dlq")
SPEED_GROUP = os.environ.get("PERISCOPE_SPEED_GROUP", "periscope-speed")
"""Consumer group of the speed layer: processes in it split the partitions."""

BATCH_GROUP = os.environ.get("PERISCOPE_BATCH_GROUP", "periscope-batch")
"""Consumer group of the batch layer's stream ingestion, independent of the speed layer's."""

CUTOFF = os.environ.get("PERISCOPE_CUTOFF", "2016-06-01")
"""Where history ends and the stream begins (pickup time, New York wall clock; ``none`` = no cutoff).

``batch_processor.py`` imports the trips picked up *before* it as history and
``kafka_producer.py`` replays the trips picked up *at or after* it, so the
stream continues where the history ends (the shipped sample: January-May 2016
is history, June 2016 the stream).
"""

SPARK_MASTER = os.environ.get("SPARK_MASTER", "local[*]")
"""Where both Spark paths run: ``local[*]`` on this machine, or a cluster URL such as ``spark://host:7077``."""

AIRFLOW_HOME = _path_from_env("AIRFLOW_HOME", STATE_DIR / "airflow")
"""Airflow's home: its config and its SQLite metadata database (``airflow.db``), which the dashboard reads."""
