"""Airflow DAG ``taxi_api_simulation``: a simulated trips API publishing each hour's trips to Kafka.

Every hourly run publishes to ``taxi-trips`` exactly the trips whose (retimed)
pickup falls in its data interval ``[data_interval_start, data_interval_end)``:
the shipped 2016 sample, shifted by whole weeks so weekday and hour stay true,
cycling forever from ``START``. No trip goes out twice across runs, none is
skipped, and re-running a run (or a retry) publishes nothing new: a ledger per
interval under ``var/simulation/`` records what was sent. How, and what it
guarantees after a crash: ``periscope/simulation.py``.

A manual trigger without a logical date (Airflow 3's default) publishes the
last whole hour before the trigger, once like any other. Catch-up is off, so
turning the DAG on publishes from the current hour;
``airflow dags backfill taxi_api_simulation --start-date ... --end-date ...``
publishes past hours (each exactly once, too).

Settings come from the environment (``KAFKA_BOOTSTRAP_SERVERS``,
``PERISCOPE_TRIPS_TOPIC``, ``PERISCOPE_SAMPLE_CSV``, ``PERISCOPE_STATE_DIR``)
or from the run's params ``bootstrap`` and ``topic``.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

START = pendulum.datetime(2026, 1, 5, tz="UTC")
"""A Monday: the simulated API's first week begins here (cycle 0 of the sample)."""


@dag(
    dag_id="taxi_api_simulation",
    description="Publish each hour's trips (the shipped sample, retimed) to Kafka, exactly once",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=START,
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "bootstrap": Param(None, type=["null", "string"], description="Kafka bootstrap servers (default: env)"),
        "topic": Param(None, type=["null", "string"], description="topic to publish to (default: env, taxi-trips)"),
    },
    tags=["periscope", "ingestion"],
)
def taxi_api_simulation():
    @task
    def publish_trips(data_interval_start=None, data_interval_end=None, dag_run=None, params=None) -> dict:
        """Publish the interval's trips once; a re-run finds the ledger and sends nothing."""
        from kafka_producer import replay_order
        from periscope import config, simulation
        from periscope.sources import read_trips

        if data_interval_start is None:  # triggered without a logical date: the hour before the trigger
            start, end = simulation.last_whole_hour(simulation.to_ms(dag_run.run_after))
        else:
            start, end = simulation.to_ms(data_interval_start), simulation.to_ms(data_interval_end)
        trips = replay_order(read_trips(config.SAMPLE_CSV)[0])
        timeline = simulation.make_timeline(trips["pickup_datetime"].to_numpy(), simulation.to_ms(START))
        outcome = simulation.publish_interval(
            trips, timeline, start, end,
            params["bootstrap"] or config.KAFKA_BOOTSTRAP_SERVERS, params["topic"] or config.TRIPS_TOPIC,
            config.STATE_DIR / "simulation",
        )
        print(outcome.line())
        return {"ledger": str(outcome.ledger), "planned": outcome.planned, "sent": outcome.sent,
                "already_published": outcome.skipped_as_published}

    publish_trips()


taxi_api_simulation()
