# One image for every Python layer of Periscope: the speed layers (kafka_consumer.py,
# spark_streaming.py), the batch layer, the producer, Airflow, the dashboard, and the Spark
# worker (its executors run the same Python code as the driver, so they need the same
# interpreter and libraries). docker-compose.yaml builds it as periscope:local.
#
#   docker build -t periscope:local .
#   docker run --rm periscope:local python batch_processor.py --help
#
# Spark reads Kafka and the Avro master data with its own connectors (spark-sql-kafka-0-10,
# spark-avro), fetched with Maven for the installed pyspark (`make spark-fetch`, see
# docs/SPARK.md) into /opt/periscope/spark-jars: outside /app/var, which compose mounts a volume on.

# Debian 12 (bookworm) has OpenJDK 17, the Java the project is tested with (Spark 4 needs 17+).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PERISCOPE_SPARK_JARS_DIR=/opt/periscope/spark-jars

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

# An unprivileged user owns every directory that docker-compose.yaml mounts a named volume on;
# a new volume takes over the ownership of the directory it is mounted on.
RUN useradd --create-home --uid 1000 periscope \
 && mkdir -p data/master data/views data/speed model var/airflow \
 && chown -R periscope:periscope /app

COPY --chown=periscope:periscope . .
RUN python -m periscope.spark_session fetch && rm -rf /root/.m2

USER periscope

CMD ["python", "-m", "periscope.summary"]
