# Periscope: the two commands a newcomer needs are `make demo` and `make test`.
# Everything else is a step of those, runnable on its own.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The Compose validator lives in its own venv: docker-compose 1.29.2 needs PyYAML 5, the project PyYAML 6.
COMPOSE_VENV := .venv-compose
COMPOSE      := $(COMPOSE_VENV)/bin/docker-compose

.DEFAULT_GOAL := help
.PHONY: help setup demo down test test-fast walkthrough sql bench kafka-fetch kafka-up kafka-down kafka-status cluster-up cluster-down cluster-status spark-fetch browser app airflow compose-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv, install the pinned dependencies and the project itself (editable)

# The project goes in editable (`-e`): `import periscope` and `import batch_processor` then work from
# any directory (Airflow's task processes, the benchmarks), always with this checkout's files.
$(STAMP): requirements.txt pyproject.toml
	@command -v java >/dev/null || { echo "error: java (17+) is needed for Kafka and Spark: apt-get install openjdk-17-jre-headless"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

demo: setup kafka-fetch $(if $(CLUSTER),spark-fetch)  ## the whole pipeline: broker, model, batch, speed layer, replay, dashboard (Ctrl-C stops it; CLUSTER=1: on the clusters)
	$(PY) -m periscope.demo $(if $(CLUSTER),--cluster)

down:  ## stop what `make demo` started (from another terminal), and nothing else
	-[ -x $(PY) ] && $(PY) -m periscope.demo down

TEST_WORKERS ?= 2
test: setup kafka-fetch spark-fetch browser $(COMPOSE)  ## run every test: unit, property and integration against real services (TEST_WORKERS=2 pytest processes)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations 15

test-fast: setup $(COMPOSE)  ## only the quick tests that need no broker
	$(PY) -m pytest -m "not kafka and not slow"

walkthrough: setup kafka-fetch spark-fetch  ## run every command of docs/WALKTHROUGH.md from a clean state; rewrite it with their output
	$(PY) -m periscope.walkthrough

sql: setup spark-fetch  ## SQL prompt over master data and the current batch version (batch_processor.py sql)
	$(PY) batch_processor.py sql

bench: setup kafka-fetch spark-fetch  ## run every benchmark, one after another (about an hour; see docs/BENCHMARKS.md)
	$(PY) bench/bench_model.py
	$(PY) bench/bench_batch.py
	$(PY) bench/bench_producer.py
	$(PY) bench/bench_speed_layer.py
	$(PY) bench/bench_spark.py
	$(PY) bench/bench_app.py

kafka-fetch: setup  ## fetch the Apache Kafka jars with Maven (once)
	$(PY) -m periscope.kafka_local fetch

kafka-up: setup  ## start the local Kafka broker on 127.0.0.1:9092 and create the topics
	$(PY) -m periscope.kafka_local start

kafka-down:  ## stop the local Kafka broker (only the one this project started)
	$(PY) -m periscope.kafka_local stop

kafka-status:  ## is the broker up?
	$(PY) -m periscope.kafka_local status

cluster-up: setup kafka-fetch spark-fetch  ## start 3 Kafka brokers (RF 3) and a Spark master with 2 workers on 127.0.0.1, create the topics (CLUSTER_ARGS="--spark-port 7078")
	$(PY) -m periscope.cluster up $(CLUSTER_ARGS)

cluster-down:  ## stop the clusters (only what cluster-up started)
	$(PY) -m periscope.cluster down

cluster-status:  ## do every broker, the Spark master and its workers answer?
	$(PY) -m periscope.cluster status

spark-fetch: setup  ## fetch Spark's Kafka and Avro connectors for the installed pyspark with Maven, into var/spark/jars (once)
	$(PY) -m periscope.spark_session fetch

browser:  ## install Debian's Chromium and ChromeDriver for the browser tests, where missing
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@chromium --version

app: setup  ## serve the dashboard on http://127.0.0.1:8501
	$(VENV)/bin/streamlit run app.py --server.address 127.0.0.1 --server.port 8501

airflow: setup kafka-fetch  ## Airflow on http://127.0.0.1:8080 with the project's DAGs, state in var/airflow (AIRFLOW_ARGS="--port 8081")
	$(PY) -m periscope.airflow_local standalone $(AIRFLOW_ARGS)

compose-check: $(COMPOSE)  ## validate docker-compose.yaml with Docker Compose from PyPI (no Docker needed)
	$(COMPOSE) -f docker-compose.yaml config -q && echo "docker-compose.yaml is valid"

$(COMPOSE): infra/compose/constraints.txt
	$(PYTHON) -m venv $(COMPOSE_VENV)
	PIP_CONSTRAINT=$(CURDIR)/infra/compose/constraints.txt $(COMPOSE_VENV)/bin/pip install --quiet docker-compose==1.29.2
	@touch $@

clean:  ## stop the demo and the broker, remove everything the pipeline made (model, data, state); keep .venv and the fetched jars
	-[ -x $(PY) ] && $(PY) -m periscope.demo down
	-[ -x $(PY) ] && $(PY) -m periscope.kafka_local stop
	-[ -x $(PY) ] && $(PY) -m periscope.cluster down
	rm -rf model data/master data/views data/speed data/generated test-artifacts artifacts
	find var -mindepth 1 -maxdepth 2 -not -path var/kafka -not -path var/kafka/libs \
	  -not -path var/spark -not -path var/spark/jars -exec rm -rf {} + 2>/dev/null || true
