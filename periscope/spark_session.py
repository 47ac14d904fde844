"""Spark for Periscope: one way to build the session, the connector jars, and the trip schema in Spark.

Both Spark paths (``spark_streaming.py``, the speed layer, and
``batch_processor.py --engine spark``, the batch layer) start Spark through
``get_session``: on ``config.SPARK_MASTER`` (``local[*]`` unless the
environment variable ``SPARK_MASTER`` names a cluster such as
``spark://host:7077``), with small defaults for a two-core machine, quiet
logs, Spark's Kafka and Avro connectors, and the ``periscope`` package shipped
to the executors (no script: what executors run lives in ``periscope/``), so
the same call works on a laptop and on a cluster.

The connectors are Spark's own: ``spark-sql-kafka-0-10`` (``format("kafka")``)
and ``spark-avro`` (``format("avro")``), at exactly the installed pyspark's
version and Scala version, with what they need at run time
(``spark-token-provider-kafka-0-10``, ``kafka-clients``, ``commons-pool2``).
pyspark's wheel does not contain them, so they are fetched with Maven from
Maven Central (``infra/spark/pom.xml``) into ``var/spark/jars`` (under
``PERISCOPE_STATE_DIR``; ``PERISCOPE_SPARK_JARS_DIR`` moves it), leaving out
every jar pyspark already ships, and given to Spark as local jars
(``spark.jars``; on a cluster the driver serves them to the executors)::

    make spark-fetch                       # = python -m periscope.spark_session fetch
    python -m periscope.spark_session start --master spark://host:7077   # a one-line job, to check

Without them, or with jars of another Spark version than pyspark's,
``get_session`` raises ``SparkSetupError`` naming ``make spark-fetch``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql.types import BooleanType, DataType, DoubleType, LongType, StringType, StructField, StructType

from periscope import cli, config
from periscope.schema import (AVRO_SCHEMA, FIELDS, FLOAT_FIELDS, INT_FIELDS, REVENUE_FIELDS, TIME_FIELDS,
                              ZONE_FIELDS)

PROJECT_ROOT = config.PROJECT_ROOT

JIT_HUGE_METHODS = "-XX:-DontCompileHugeMethods"
"""Let the JVM compile methods of more than 8,000 bytes of bytecode. The code Spark generates for
the batch engine's rules and facts in one projection is such a method; left to the interpreter it
made that projection 4x slower (10.9 s against 2.4 s over 1.5 M trips; docs/SPARK.md)."""

SPARK_DEFAULTS: dict[str, str] = {
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "4",
    "spark.driver.memory": "1g",
    "spark.executor.memory": "1g",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "20000",
    "spark.ui.showConsoleProgress": "false",
    "spark.ui.enabled": "false",
    "spark.sql.streaming.noDataMicroBatches.enabled": "true",
    "spark.driver.extraJavaOptions": JIT_HUGE_METHODS,
    "spark.executor.extraJavaOptions": JIT_HUGE_METHODS,
}
"""Small for a shared 2-core machine: 4 shuffle partitions instead of 200, 1 GB heaps, no UI.
The session time zone is UTC so that trip times (New York wall clock with no zone attached,
see ``periscope.schema``) are shown as they are. Any of these can be overridden with
``get_session(conf={...})`` or spark-defaults.conf on a cluster (a key set here wins over the
same key in spark-defaults.conf)."""

POM = PROJECT_ROOT / "infra" / "spark" / "pom.xml"
JARS_DIR = Path(os.environ.get("PERISCOPE_SPARK_JARS_DIR") or config.STATE_DIR / "spark" / "jars")
"""Where ``fetch`` puts the connector jars and ``get_session`` takes them from."""
CONNECTORS = ("spark-sql-kafka-0-10", "spark-avro")
"""The Spark modules Periscope reads with: ``format("kafka")`` and ``format("avro")``."""
FETCH_COMMAND = "make spark-fetch"
MARKER = ".fetched"

log = logging.getLogger(__name__)


class SparkSetupError(RuntimeError):
    """Spark cannot start here; the message says what to install or set."""


# --- the one trip schema, in Spark types ------------------------------------------------------------


def spark_type(field: str) -> DataType:
    """Spark type of a trip field in record form, read off ``periscope.schema``'s field groups."""
    if field in INT_FIELDS or field in TIME_FIELDS or field in ZONE_FIELDS:
        return LongType()
    if field in FLOAT_FIELDS or field in REVENUE_FIELDS:
        return DoubleType()
    if field == "store_and_fwd_flag":
        return BooleanType()
    return StringType()


def trip_struct(fields: Sequence[str] = FIELDS) -> StructType:
    """The trip as a Spark row (record form: times as ms, the flag as boolean): derived, never hand-written.

    Integer fields are 64-bit, as in the speed view's Parquet files.
    """
    return StructType([StructField(name, spark_type(name), nullable=True) for name in fields])


AVRO_COLUMNS: tuple[str, ...] = tuple(name for name in FIELDS if name != "id")
"""The trip fields the batch views need (those ``storage.iter_avro_columns`` reads)."""

MASTER_AVRO_OPTIONS: dict[str, str] = {"avroSchema": json.dumps(AVRO_SCHEMA)}
"""How Spark reads master files: with the one trip schema as the reader schema, so files written
before the TLC fields (``schema.KAGGLE_AVRO_SCHEMA``) read them as null (Avro schema resolution).
The Spark batch engine and the SQL catalog's ``periscope.master`` table both read with it."""


# --- the connector jars ----------------------------------------------------------------------------------


def pyspark_jars() -> Path:
    """The jars pyspark ships (Spark itself): what the connectors run on."""
    import pyspark

    return Path(pyspark.__file__).parent / "jars"


def scala_binary_version(shipped: Path | None = None) -> str:
    """``2.13``: the Scala line pyspark is built with, read off its ``scala-library-2.13.x.jar``."""
    shipped = shipped or pyspark_jars()
    for jar in shipped.glob("scala-library-*.jar"):
        match = re.fullmatch(r"scala-library-(\d+\.\d+)\.\d+\.jar", jar.name)
        if match:
            return match.group(1)
    raise SparkSetupError(f"no scala-library-*.jar in {shipped}: the pyspark installation looks broken; "
                          "reinstall it with `pip install -r requirements.txt`")


def artifact_name(jar: str) -> str:
    """``kafka-clients-3.9.0.jar`` -> ``kafka-clients``: a jar's name without its version."""
    return re.sub(r"-\d+\.[\w.+-]*\.jar$", "", jar)


def already_shipped(jars: Sequence[str], shipped: Sequence[str]) -> list[str]:
    """The jars of ``jars`` whose artifact pyspark ships too (at any version): never two copies of a class."""
    names = {artifact_name(jar) for jar in shipped}
    return [jar for jar in jars if artifact_name(jar) in names]


def connector_file(module: str, spark_version: str, scala: str) -> str:
    return f"{module}_{scala}-{spark_version}.jar"


def marker_text(spark_version: str, scala: str, pom: Path = POM) -> str:
    """What a complete fetch for this Spark, Scala and pom leaves in the marker file."""
    return f"spark {spark_version} scala {scala} pom {hashlib.sha256(pom.read_bytes()).hexdigest()}"


def connector_jars(jars_dir: Path, spark_version: str, scala: str) -> list[Path]:
    """Every fetched jar, checked: complete, and the connectors are of ``spark_version``; else SparkSetupError.

    The message names the command that fixes it, because a missing or
    mismatched connector otherwise surfaces only at the first read, as
    ``Failed to find data source: kafka`` or a ``NoSuchMethodError`` deep in Spark.
    """
    fix = f"fetch them with `{FETCH_COMMAND}` (python -m periscope.spark_session fetch; needs Maven)"
    names = sorted(path.name for path in jars_dir.glob("*.jar")) if jars_dir.is_dir() else []
    wanted = [connector_file(module, spark_version, scala) for module in CONNECTORS]
    if not names:
        raise SparkSetupError(f"Spark's Kafka and Avro connector jars are not in {jars_dir}: {fix}")
    missing = [name for name in wanted if name not in names]
    if missing:
        found = [name for name in names if artifact_name(name).startswith(tuple(CONNECTORS))]
        raise SparkSetupError(f"{jars_dir} has no {', '.join(missing)} (pyspark is {spark_version}, Scala {scala}; "
                              f"found {', '.join(found) or 'no connector'}): {fix} again")
    marker = jars_dir / MARKER
    if not marker.is_file() or marker.read_text().split()[:4] != ["spark", spark_version, "scala", scala]:
        raise SparkSetupError(f"the connector jars in {jars_dir} are from an unfinished fetch: {fix} again")
    return [jars_dir / name for name in names]


def fetch(jars_dir: Path = JARS_DIR, pom: Path = POM) -> list[Path]:
    """Copy the connectors for the installed pyspark into ``jars_dir`` with Maven, unless already done.

    Spark's version comes from ``pyspark.__version__`` and the Scala version from
    pyspark's own jars, passed to the pom as properties, so the connectors can
    never drift from the Spark that runs them. A marker naming both (and the
    pom's hash) is written only after Maven succeeded.
    """
    import pyspark

    spark_version, scala = pyspark.__version__, scala_binary_version()
    marker = jars_dir / MARKER
    if marker.is_file() and marker.read_text().strip() == marker_text(spark_version, scala, pom):
        log.info("Spark %s connector jars already in %s", spark_version, jars_dir)
        return connector_jars(jars_dir, spark_version, scala)
    problem = java_problem()
    if problem:
        raise SparkSetupError(problem)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SparkSetupError("`mvn` is not on PATH: install Maven 3.6+ (Debian/Ubuntu: apt-get install maven; "
                              "macOS: brew install maven)")
    jars_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for old in jars_dir.glob("*.jar"):
        old.unlink()
    log.info("Fetching Spark %s's Kafka and Avro connectors (Scala %s) with Maven into %s ...",
             spark_version, scala, jars_dir)
    began = time.monotonic()
    result = subprocess.run([mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
                             f"-Dspark.version={spark_version}", f"-Dscala.binary.version={scala}",
                             f"-DoutputDirectory={jars_dir}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SparkSetupError(f"Maven could not fetch Spark {spark_version}'s connectors (Scala {scala}). It needs "
                              f"Maven Central, or a mirror in ~/.m2/settings.xml, to have "
                              f"{' and '.join(connector_file(m, spark_version, scala) for m in CONNECTORS)} and what "
                              f"they depend on. Maven said:\n{result.stdout}{result.stderr}")
    duplicates = already_shipped([jar.name for jar in jars_dir.glob("*.jar")],
                                 [jar.name for jar in pyspark_jars().glob("*.jar")])
    for name in duplicates:
        (jars_dir / name).unlink()
    if duplicates:
        log.info("Left out %s: pyspark ships them (add them to the pom's exclusions)", ", ".join(duplicates))
    marker.write_text(marker_text(spark_version, scala, pom) + "\n")
    jars = connector_jars(jars_dir, spark_version, scala)
    log.info("Fetched %d jars in %.0f s: %s", len(jars), time.monotonic() - began, ", ".join(j.name for j in jars))
    return jars


# --- the session ---------------------------------------------------------------------------------------


def java_problem() -> str | None:
    """What is wrong with Java for Spark 4 (17 or newer), or None."""
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    if java is None or not Path(java).exists():
        return ("Spark needs Java 17 or newer, and no `java` is on PATH (Debian/Ubuntu: apt-get install "
                "openjdk-17-jre-headless; macOS: brew install openjdk@17), or set JAVA_HOME")
    result = subprocess.run([str(java), "-version"], capture_output=True, text=True)
    text = result.stderr + result.stdout
    try:
        major = int(text.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        return None
    if major < 17:
        return f"Spark 4 needs Java 17 or newer; {java} is Java {major}. Install 17+ or point JAVA_HOME at one"
    return None


def project_zip(directory: Path) -> Path:
    """``periscope/`` zipped for ``addPyFile``: all the executors import of the project.

    What Spark runs on executors (the speed layer's ``mapInArrow`` function) lives in
    ``periscope/`` (``speed_core``), never in a script, so no script is shipped; the
    data files the model's features read travel in the same zip (``config.SHIPPED_DATA``).
    """
    target = directory / "periscope-code.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((PROJECT_ROOT / "periscope").rglob("*.py")):
            archive.write(path, path.relative_to(PROJECT_ROOT).as_posix())
        for name in config.SHIPPED_DATA:
            archive.write(PROJECT_ROOT / "data" / name, f"data/{name}")
    return target


def get_session(master: str | None = None, app_name: str = "periscope",
                conf: Mapping[str, str] | None = None, jars_dir: Path | None = None) -> SparkSession:
    """The Spark session of this process (created once): on ``master``, with the connectors and Periscope's code.

    On a cluster, the executors need the project's Python requirements (the
    same ``requirements.txt``); the ``periscope`` package and the connector jars
    are shipped with the job.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    problem = java_problem()
    if problem:
        raise SparkSetupError(problem)
    import pyspark

    jars = connector_jars(jars_dir or JARS_DIR, pyspark.__version__, scala_binary_version())
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # local mode: workers import periscope
    master = master or config.SPARK_MASTER
    builder = SparkSession.builder.master(master).appName(app_name).config("spark.jars", ",".join(map(str, jars)))
    if master.startswith(("local", "spark://127.0.0.1:", "spark://localhost:")):  # this machine only
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for key, value in {**SPARK_DEFAULTS, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.sparkContext.addPyFile(str(project_zip(Path(tempfile.mkdtemp(prefix="periscope-spark-")))))
    return spark


# --- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m periscope.spark_session",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetching = commands.add_parser("fetch", help="fetch Spark's Kafka and Avro connectors for the installed pyspark "
                                                 "with Maven (once)", formatter_class=parser.formatter_class)
    fetching.add_argument("--jars-dir", type=Path, default=JARS_DIR,
                          help="where the jars go (env PERISCOPE_SPARK_JARS_DIR)")
    start = commands.add_parser("start", help="start a session on --master and run a one-line job",
                                formatter_class=parser.formatter_class)
    start.add_argument("--master", default=config.SPARK_MASTER, help="Spark master URL (env SPARK_MASTER)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if args.command == "fetch":
            fetch(args.jars_dir)
            return 0
        spark = get_session(args.master, "periscope-check")
    except SparkSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    rows = spark.range(1000).selectExpr("sum(id) AS total").collect()[0]["total"]
    print(f"Spark {spark.version} on {spark.sparkContext.master}: sum(0..999) = {rows}; "
          f"connectors {', '.join(Path(jar).name for jar in spark.conf.get('spark.jars').split(','))}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
