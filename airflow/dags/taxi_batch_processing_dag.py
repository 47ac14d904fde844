"""Airflow DAG ``taxi_batch_processing``: the batch layer on a schedule, with a data-quality gate.

    ingest_new_events -> compute_views -> quality_gate -> publish_views -> prune_speed_view

* ``ingest_new_events``: imports the CSV history once (a file already imported
  adds nothing) and drains every new ``taxi-trips`` event into the immutable
  Avro master dataset (``batch_processor.ingest_stream``: files named by their
  offset range, so an event is never stored twice).
* ``compute_views``: every batch view from *all* master data, later copies of
  a trip left out (``batch_processor.compute_views``, nothing published),
  staged on disk with the version's trip index under
  ``var/batch-staging/<run id>/`` because views are too big for XCom.
* ``quality_gate``: ``periscope.quality.check`` - row counts agree with the
  master files' own headers, master = distinct + duplicates, distinct = clean +
  rejected, the trip index holds every distinct trip, every view counts every
  clean trip, no negative durations or distances, views not empty, the share of
  trips the cleaning rules reject below ``max_rejected_share``, the watermark
  never behind the published one. A failure fails the run; nothing is published.
* ``publish_views``: ``batch_processor.publish`` - a new version, switched
  atomically. If the master files and the views are exactly those of the
  current version (a re-run with nothing new), no version is made.
* ``prune_speed_view``: deletes speed-view files at or below the new watermark.

Batch views are a function of all master data, not of the run's interval: the
interval only labels the run. Re-running or backfilling is therefore safe: a
run with no new events leaves master data and views untouched.

Settings: the ``PERISCOPE_*`` and ``KAFKA_BOOTSTRAP_SERVERS`` environment
variables (see ``periscope/config.py``) or the run's params.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task


def staging_dir(run_id: str) -> Path:
    from periscope import config

    return config.STATE_DIR / "batch-staging" / "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


@dag(
    dag_id="taxi_batch_processing",
    description="Ingest new events into master data, recompute, check and publish the batch views",
    schedule=CronDataIntervalTimetable("0 3 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 5, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "bootstrap": Param(None, type=["null", "string"], description="Kafka bootstrap servers (default: env)"),
        "topic": Param(None, type=["null", "string"], description="topic to ingest (default: env, taxi-trips)"),
        "history_csv": Param(None, type=["null", "string"],
                             description="CSV history imported once (default: the shipped sample; '' for none)"),
        "workers": Param(1, type="integer", minimum=1, description="processes reading master files"),
        "engine": Param("python", enum=["python", "spark"], description="how views are computed"),
        "keep": Param(5, type="integer", minimum=1, description="published versions to keep"),
        "max_rejected_share": Param(0.05, type="number", minimum=0, maximum=1,
                                    description="quality gate: most trips the cleaning rules may reject"),
        "min_clean_trips": Param(1, type="integer", minimum=0, description="quality gate: fewest clean trips"),
    },
    tags=["periscope", "batch"],
)
def taxi_batch_processing():
    @task
    def ingest_new_events(params=None) -> dict:
        """History up to the cutoff once, then every event published so far: idempotent, never twice."""
        import batch_processor
        from periscope import config
        from periscope.schema import parse_cutoff

        history = config.SAMPLE_CSV if params["history_csv"] is None else params["history_csv"]
        if history:
            imported = batch_processor.import_csv(Path(history), config.MASTER_DIR,
                                                  cutoff_ms=parse_cutoff(config.CUTOFF))
            batch_processor.print_import(imported)
        topic = params["topic"] or config.TRIPS_TOPIC
        result = batch_processor.ingest_stream(params["bootstrap"] or config.KAFKA_BOOTSTRAP_SERVERS, topic,
                                               config.BATCH_GROUP, config.MASTER_DIR)
        batch_processor.print_ingest(result, topic)
        return {"files": len(result.files), "events": result.rows}

    @task
    def compute_views(run_id=None, params=None) -> str:
        """All views from all master data, staged for the gate (nothing published)."""
        import batch_processor
        from periscope import config, quality

        version = batch_processor.compute_views(config.MASTER_DIR, params["workers"], progress=False,
                                                engine=params["engine"])
        staged = quality.stage(staging_dir(run_id), version)
        rows = version.manifest["rows"]
        print(f"staged {rows['clean']:,} clean trips of {rows['distinct']:,} distinct ({rows['duplicates']:,} "
              f"later copies left out of {rows['master']:,} master rows) in {staged}")
        return str(staged)

    @task
    def quality_gate(staged: str, params=None) -> str:
        """Fail the run, publishing nothing, unless the staged views pass every check."""
        from airflow.sdk.exceptions import AirflowFailException

        from periscope import config, quality, storage

        staged_version = quality.read_staged(Path(staged))
        current = storage.current_version(config.VIEWS_DIR)
        previous = storage.read_version(config.VIEWS_DIR)[1] if current else None
        thresholds = quality.Thresholds(params["max_rejected_share"], params["min_clean_trips"])
        batch_views, manifest = staged_version.views, staged_version.manifest
        problems = quality.check(batch_views, manifest, quality.master_rows(config.MASTER_DIR, manifest),
                                 previous, thresholds, staged_version.trip_ids)
        if problems:
            raise AirflowFailException(quality.report(problems))
        print(f"data-quality gate passed: {quality.summary(manifest)}")
        return staged

    @task
    def publish_views(staged: str, params=None) -> str:
        """Publish atomically, unless nothing changed since the current version."""
        import shutil

        import batch_processor
        from periscope import config, quality, storage, views

        version = quality.read_staged(Path(staged))
        batch_views, manifest = version.views, version.manifest
        current = storage.current_version(config.VIEWS_DIR)
        if current:
            current_views, previous = storage.read_version(config.VIEWS_DIR, current)
            if quality.same_inputs(manifest, previous) and views.views_equal(batch_views, current_views):
                print(f"master data unchanged since {current} ({len(manifest['input_files'])} input files) "
                      "and identical views: nothing to publish")
                shutil.rmtree(staged, ignore_errors=True)
                return current
        published = batch_processor.publish(config.VIEWS_DIR, version, params["keep"])
        batch_processor.print_manifest(published)
        shutil.rmtree(staged, ignore_errors=True)
        return published["version"]

    @task
    def prune_speed_view(version: str) -> int:
        """Speed rows at or below the published watermark are in the batch views now."""
        from periscope import config, speed_view, storage

        watermark = storage.read_version(config.VIEWS_DIR, version)[1]["watermark"]
        removed = speed_view.prune(config.SPEED_DIR, watermark)
        print(f"pruned {removed} speed-view files at or below the watermark of {version}: {watermark or 'none'}")
        return removed

    staged = compute_views()
    ingest_new_events() >> staged
    prune_speed_view(publish_views(quality_gate(staged)))


taxi_batch_processing()
