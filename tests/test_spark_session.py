"""periscope.spark_session: the connector jars (checked before Spark starts) and the one-line cluster check."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest

from periscope import spark_session
from periscope.spark_session import SparkSetupError

ROOT = Path(__file__).resolve().parent.parent
SCALA = spark_session.scala_binary_version()


def fake_fetch(jars_dir: Path, spark_version: str, names: list[str], marker: bool = True) -> Path:
    """A jar directory as a fetch for ``spark_version`` leaves it (empty files: only names are checked here)."""
    jars_dir.mkdir(parents=True)
    for name in names:
        (jars_dir / name).write_bytes(b"")
    if marker:
        (jars_dir / spark_session.MARKER).write_text(spark_session.marker_text(spark_version, SCALA) + "\n")
    return jars_dir


def connectors(version: str) -> list[str]:
    return [spark_session.connector_file(module, version, SCALA) for module in spark_session.CONNECTORS]


def test_scala_and_the_shipped_jars_come_from_pyspark_itself():
    assert SCALA == "2.13", "pyspark 4 is built with Scala 2.13"
    shipped = [jar.name for jar in spark_session.pyspark_jars().glob("*.jar")]
    assert f"spark-core_{SCALA}-{pyspark.__version__}.jar" in shipped
    assert spark_session.artifact_name("kafka-clients-3.9.0.jar") == "kafka-clients"
    assert spark_session.artifact_name("spark-avro_2.13-4.0.0.jar") == "spark-avro_2.13"
    assert spark_session.already_shipped(["snappy-java-1.1.10.5.jar", "kafka-clients-3.9.0.jar"], shipped) == \
        ["snappy-java-1.1.10.5.jar"], "another version of a jar pyspark ships is still a duplicate"


def test_complete_jars_of_pysparks_version_are_handed_to_spark(tmp_path):
    names = connectors(pyspark.__version__) + ["kafka-clients-3.9.0.jar"]
    jars = spark_session.connector_jars(fake_fetch(tmp_path / "jars", pyspark.__version__, names),
                                        pyspark.__version__, SCALA)
    assert sorted(jar.name for jar in jars) == sorted(names)


@pytest.mark.parametrize("case, expected", [
    ("missing", "are not in"),
    ("other version", "found spark-avro_2.13-3.5.1.jar, spark-sql-kafka-0-10_2.13-3.5.1.jar"),
    ("unfinished", "unfinished fetch"),
])
def test_missing_or_mismatched_jars_name_the_command_that_fetches_them(tmp_path, case, expected):
    jars_dir = tmp_path / "jars"
    if case == "other version":
        fake_fetch(jars_dir, "3.5.1", connectors("3.5.1"))
    elif case == "unfinished":
        fake_fetch(jars_dir, pyspark.__version__, connectors(pyspark.__version__), marker=False)
    with pytest.raises(SparkSetupError, match="make spark-fetch") as error:
        spark_session.connector_jars(jars_dir, pyspark.__version__, SCALA)
    assert expected in str(error.value)


def test_a_session_without_the_jars_is_refused_before_spark_starts(tmp_path):
    """The real command, in its own process (a session of this test process may exist already)."""
    env = {**os.environ, "PERISCOPE_SPARK_JARS_DIR": str(tmp_path / "no-jars")}
    result = subprocess.run([sys.executable, "-m", "periscope.spark_session", "start"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "error: Spark's Kafka and Avro connector jars are not in" in result.stderr
    assert "`make spark-fetch`" in result.stderr and str(tmp_path / "no-jars") in result.stderr


def test_the_fetched_jars_are_complete_and_duplicate_nothing_pyspark_ships():
    """What `make spark-fetch` left in var/spark/jars (the Spark tests use it): the five jars, of pyspark's version."""
    jars = [jar.name for jar in spark_session.connector_jars(spark_session.JARS_DIR, pyspark.__version__, SCALA)]
    assert {spark_session.artifact_name(jar) for jar in jars} == {
        f"spark-sql-kafka-0-10_{SCALA}", f"spark-token-provider-kafka-0-10_{SCALA}", "kafka-clients",
        "commons-pool2", f"spark-avro_{SCALA}"}
    assert spark_session.already_shipped(jars, [jar.name for jar in spark_session.pyspark_jars().glob("*.jar")]) == []
