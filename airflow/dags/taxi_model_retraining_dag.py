"""Airflow DAG ``taxi_model_retraining``: retrain on the master data, promote only if better.

    train_candidate -> evaluate_and_promote

* ``train_candidate``: ``train_model.py --from-master --split id --no-promote``
  trains a candidate named after the run's interval (``<end>-retrain``; a
  manual run without a logical date: after its trigger time) on
  every trip of the master dataset, holding out trips by a hash of their id.
  A re-run finds the version and does not train again.
* ``evaluate_and_promote``: ``periscope.promotion.compare_and_promote`` scores the
  candidate and the live model on the same hold-out (the trips neither
  trained on) and switches ``model/current.json`` only if the candidate's
  RMSLE is lower by more than ``min_improvement``. Every version stays in
  ``model/versions/``; the decision, both scores and the reason are in the
  candidate's ``decision.json`` and in the task log.

The speed layer (``kafka_consumer.py``) checks ``model/current.json`` every
10 s and switches to a promoted model without a restart (it logs "model
switched from ... to ..."; each speed row records its model version).

Settings: ``PERISCOPE_MASTER_DIR``, ``PERISCOPE_MODEL_DIR`` or the run's params.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task


@dag(
    dag_id="taxi_model_retraining",
    description="Train a candidate model on the master data; promote it only if it beats the live one",
    schedule=CronDataIntervalTimetable("0 4 * * 1", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 5, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "min_improvement": Param(0.0, type="number", minimum=0,
                                 description="promote only if hold-out RMSLE drops by more than this"),
        "threads": Param(1, type="integer", minimum=1,
                         description="CPU threads for fitting (1: see docs/MODEL.md)"),
    },
    tags=["periscope", "ml"],
)
def taxi_model_retraining():
    @task
    def train_candidate(data_interval_end=None, dag_run=None, params=None) -> str:
        """A candidate trained on all master data, not promoted; once per run."""
        import train_model
        from periscope import config
        from periscope.model import version_dir

        named_after = data_interval_end or dag_run.run_after  # a manual run may have no logical date
        version = named_after.strftime("%Y%m%dT%H%M%SZ") + "-retrain"
        if (version_dir(config.MODEL_DIR, version) / "metadata.json").exists():
            print(f"candidate {version} was trained by an earlier attempt of this run: not training again")
            return version
        code = train_model.main(["--from-master", str(config.MASTER_DIR), "--model-dir", str(config.MODEL_DIR),
                                 "--version", version, "--split", "id", "--no-promote",
                                 "--threads", str(params["threads"])])
        if code != 0:
            raise RuntimeError(f"train_model.py failed with exit code {code} (see the log above)")
        return version

    @task
    def evaluate_and_promote(candidate: str, params=None) -> dict:
        """Both models on the same hold-out; promote only if the candidate is better. Decided once."""
        from periscope import config
        from periscope.model import version_dir
        from periscope.promotion import DECISION, compare_and_promote
        from periscope.storage import read_json
        from periscope.training_data import read_holdout

        directory = version_dir(config.MODEL_DIR, candidate)
        if (directory / DECISION).exists():
            decision = read_json(directory / DECISION)
            print(f"already decided by an earlier attempt: {decision['reason']}")
        else:
            holdout = read_holdout(directory)
            decision = compare_and_promote(config.MODEL_DIR, candidate, holdout,
                                           params["min_improvement"])
        verdict = "promoted" if decision["promoted"] else "not promoted"
        print(f"candidate {candidate} {verdict}: {decision['reason']}; live model: {decision['live']} "
              f"(before: {decision['previous_live']}); decision in {directory / DECISION}")
        return {key: decision[key] for key in ("candidate", "promoted", "live", "previous_live", "reason")}

    evaluate_and_promote(train_candidate())


taxi_model_retraining()
