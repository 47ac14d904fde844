"""Train the trip-duration model (the ML part of Periscope), or score it.

The speed layers (``kafka_consumer.py``, ``spark_streaming.py``) predict the
duration of every trip as it arrives with the model this script writes. It
trains on the shipped 73k-trip Kaggle sample by default, or on any mix of trip
files of every era (``--input`` several times, or a glob: Kaggle, TLC with
coordinates 2009 to mid-2016, TLC by taxi zone since), with the features of
``periscope.features`` (only what is known at pickup: zones, coordinates where
a trip has them, time, weather) and a log-duration target, so minimising
squared error minimises RMSLE, the Kaggle metric.

So that a model trained on trips with coordinates also predicts trips known by
their zones only, a share of the training trips with coordinates
(``--zone-only-share``, 20 %) is learnt as if it had its zones only (the zones
of its points): the model learns both ways of knowing a trip's place.

The steps, each a function below, called in order by ``main``:

    load -> split -> build features -> fit -> evaluate on the hold-out (per era)
         -> save the version -> promote

Hold-out: a seeded *random* 20 % of the trips. The stream replays trips from
the same January–June 2016 period the model learns from, and the Kaggle test
set is drawn the same way, so a random split measures what the speed layer
will see. ``--split time`` holds out the latest 20 % instead, to measure
forecasting further ahead (it scores worse: June is unseen, see docs).

Training uses every well-formed trip, outliers included, because RMSLE over
real trips includes them and a model can learn, e.g., that a zero-distance
ride is short; ``--train-on clean`` trains on rule-passing trips only.

Retraining on the master dataset (what the Airflow DAG ``taxi_model_retraining``
does) reads every trip the batch layer holds, holds out trips by a hash of
their id (``--split id``: all replayed copies of a trip, ``id2875421-2`` and
so on, fall on the same side, and a trip never changes side as data grows),
and with ``--promote-if-better`` scores the candidate and the live model on
trips neither trained on and switches ``model/current.json`` only if the
candidate is better; the decision and its reason go to ``decision.json``
beside it (``periscope/promotion.py``).

Run it (on the sample, about 4 s on an idle two-core machine, under a second of
it fitting, and about 12 s with ``--model random-forest``; the fit uses one
thread unless ``--threads`` says more, because on a busy machine two threads
waiting on each other took 8-86 s where one took 1-15 s: see docs/MODEL.md)::

    python train_model.py                          # train, save, make it live
    python train_model.py --model random-forest    # the reference model
    python train_model.py --input 'tlc/yellow_tripdata_sample_2020-*.csv.gz' --input data/kaggle.csv.gz
    python train_model.py --evaluate FILE --json   # score the live model on a trip file (any era)
    python train_model.py --from-master data/master --split id --promote-if-better

Output: ``model/versions/<version>/`` with ``model.joblib``, ``metadata.json``
and ``holdout.csv.gz`` (the held-out real trips with coordinates, to
``--evaluate`` on; those known by zones only go to ``holdout_yellow_zones.csv.gz``
and ``holdout_green_zones.csv.gz``), and ``model/current.json`` pointing at the
live version (``periscope/model.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from threadpoolctl import threadpool_limits

from periscope import cli, config, features, model, promotion, training_data
from periscope.schema import format_time
from periscope.sources import TripFileError, apply_rules

MODELS = ("hist-gradient-boosting", "random-forest")
SPLITS = ("random", "time", "id")
MIN_TRIPS = 100


def load(args: argparse.Namespace) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The trips to learn from (trip files or the master dataset), and the fingerprint naming them."""
    if args.from_master:
        print(f"loading the master dataset {args.from_master}")
        trips, source = training_data.read_master(args.from_master)
        print(f"{len(trips):,} trips in {source['master_files']} master files"
              + (f" ({source['rows_by_zone_only']:,} of them known by zones only)"
                 if source["rows_by_zone_only"] else ""))
    else:
        files = training_data.input_files(args.input)
        trips, reports = training_data.read_trip_files(files)
        for path, report in zip(files, reports):
            print(f"loading {path}")
            for line in report.summary_lines():
                print(line)
        source = training_data.files_fingerprint(files, reports)
        if len(files) > 1:
            print(f"{len(trips):,} trips from {len(files)} files")
    negative = int((trips["trip_duration"] < 0).sum())
    if negative:  # TLC records where the dropoff precedes the pickup: no duration to learn
        trips = trips[trips["trip_duration"] >= 0].reset_index(drop=True)
        print(f"left out {negative:,} trips whose dropoff precedes their pickup")
    if args.train_on == "clean":
        trips = apply_rules(trips)
        print(f"training on the {len(trips):,} trips that pass every cleaning rule")
    return trips, source


def split(trips: pd.DataFrame, how: str, fraction: float,
          seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training trips, held-out trips): seeded random, the latest by pickup, or by id hash."""
    if how == "id":
        held = training_data.id_holdout_mask(trips["id"].tolist(), fraction, seed)
        train_rows, holdout_rows = np.flatnonzero(~held), np.flatnonzero(held)
    else:
        if how == "time":
            order = np.argsort(trips["pickup_datetime"].to_numpy(), kind="stable")
        else:
            order = np.random.default_rng(seed).permutation(len(trips))
        cut = len(trips) - int(round(len(trips) * fraction))
        train_rows, holdout_rows = np.sort(order[:cut]), np.sort(order[cut:])
    train_set, holdout = trips.iloc[train_rows], trips.iloc[holdout_rows]
    print(f"split ({how}): {len(train_set):,} training trips, {len(holdout):,} held out")
    return train_set, holdout


def build_features(train_set: pd.DataFrame, zone_only_share: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``X``, the features known at pickup (the speed layers' code), and ``y``, log(1 + seconds).

    ``zone_only_share`` of the trips with coordinates are shown to the model
    as their zones only (``training_data.as_zone_only``).
    """
    clock = time.perf_counter()
    learnt, masked = training_data.as_zone_only(train_set, zone_only_share, seed)
    X = features.build_features(learnt)
    print(f"built {X.shape[1]} features in {time.perf_counter() - clock:.2f} s"
          + (f" ({masked:,} trips with coordinates learnt by their zones only)" if masked else ""))
    return X, features.target(train_set["trip_duration"])


def make_estimator(kind: str, seed: int, threads: int) -> Any:
    """The estimator for ``kind``; hyper-parameters chosen on the sample (see docs/MODEL.md).

    Gradient boosting stops at 80 trees: 320 trees at a lower learning rate
    score 0.397 instead of 0.401 but predict 3x slower, below the speed
    layer's budget of 200,000 trips/s on one core.
    """
    if kind == "random-forest":
        return RandomForestRegressor(n_estimators=60, max_depth=14, min_samples_leaf=5,
                                     max_features=0.6, n_jobs=threads, random_state=seed)
    return HistGradientBoostingRegressor(
        max_iter=80,
        learning_rate=0.2,
        max_leaf_nodes=63,
        min_samples_leaf=30,
        l2_regularization=1.0,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=30,
        random_state=seed,
    )


def trees(estimator: Any) -> int | None:
    """How many trees the fitted ensemble has (boosting may stop early)."""
    return getattr(estimator, "n_iter_", None) or getattr(estimator, "n_estimators", None)


def fit(kind: str, X: np.ndarray, y: np.ndarray, seed: int, threads: int) -> tuple[Any, float]:
    """The fitted estimator and the seconds it took, on at most ``threads`` CPU threads."""
    estimator = make_estimator(kind, seed, threads)
    print(f"fitting {kind} on log(1 + duration) ...", flush=True)
    clock = time.perf_counter()
    with threadpool_limits(limits=threads):  # more threads than free cores wait on each other
        estimator.fit(X, y)
    seconds = time.perf_counter() - clock
    print(f"fitted in {seconds:.1f} s ({trees(estimator)} trees)")
    return estimator, seconds


def evaluate(candidate: model.TripDurationModel, holdout: pd.DataFrame) -> dict[str, Any]:
    """The hold-out metrics: RMSLE, MAE, RMSE over every held-out trip, and over the clean ones;
    per service and era too when the hold-out spans more than one."""
    m = model.labelled_metrics(candidate, holdout, training_data.era_labels(holdout))
    print(f"hold-out ({m['rows']:,} real trips not used in training): "
          f"RMSLE {m['rmsle']:.4f}  MAE {m['mae']:.0f} s  RMSE {m['rmse']:.0f} s")
    print(f"  on the {m['rows_clean']:,} that pass the cleaning rules: "
          f"RMSLE {m['rmsle_clean']:.4f}  MAE {m['mae_clean']:.0f} s  RMSE {m['rmse_clean']:.0f} s")
    if len(m["by_group"]) > 1:
        print_eras(m["by_group"])
    return m


def print_eras(by_era: dict[str, dict[str, float]]) -> None:
    """One line per service and era: trips and RMSLE, all and clean."""
    print(f"  {'service and era':<28} {'trips':>7} {'RMSLE':>7} {'clean':>7} {'RMSLE':>7}")
    for era, m in by_era.items():
        print(f"  {era:<28} {m['rows']:>7,} {m['rmsle']:>7.4f} {m['rows_clean']:>7,} "
              f"{m['rmsle_clean']:>7.4f}")


def save(candidate: model.TripDurationModel, holdout: pd.DataFrame | None, model_dir: Path) -> Path:
    """A new version directory: the estimator, its metadata and (unless None) the hold-out trips."""
    directory = model.save_model(candidate.estimator, candidate.metadata, model_dir)
    if holdout is not None:
        training_data.write_holdout(holdout, directory)
    return directory


def promote(args: argparse.Namespace, version: str,
            holdout: pd.DataFrame) -> dict[str, Any] | None:
    """Make the version live: always, never (``--no-promote``), or only if better (then the
    decision is returned)."""
    if args.promote_if_better:
        return promotion.compare_and_promote(args.model_dir, version, holdout, args.min_improvement)
    if args.promote:
        model.promote(args.model_dir, version)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.evaluate:
            return score_live_model(args)
        started = time.perf_counter()
        # Load the trips, with what identifies them (it goes into the model's metadata)
        trips, source = load(args)
        if len(trips) < MIN_TRIPS:
            print(f"error: {args.from_master or ', '.join(args.input)} has only {len(trips)} usable trips; "
                  f"need at least {MIN_TRIPS}", file=sys.stderr)
            return 2
        # Hold out trips the model never sees while it learns
        train_set, holdout = split(trips, args.split, args.holdout_fraction, args.seed)
        # Build the features (only what is known at pickup) and the target, log(1 + duration)
        X, y = build_features(train_set, args.zone_only_share, args.seed)
        # Fit: squared error on log(1 + duration) is RMSLE, the Kaggle metric
        estimator, fit_seconds = fit(args.model, X, y, args.seed, args.threads)
        candidate = model.TripDurationModel(estimator, describe(
            args, estimator, fit_seconds, source=source, trips=trips, train_set=train_set,
            holdout=holdout))
        # Evaluate on the hold-out: the metrics travel with the model, in its metadata
        candidate.metadata["holdout_metrics"] = evaluate(candidate, holdout)
        # Save the version: a directory that never changes afterwards
        directory = save(candidate, holdout if args.save_holdout else None, args.model_dir)
        # Promote: switch model/current.json atomically; the speed layers follow it as they run
        decision = promote(args, candidate.version, holdout)
    except (FileNotFoundError, TripFileError, model.ModelNotFoundError, model.ModelMismatchError,
            FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_outcome(candidate.version, directory, decision, args.promote,
                  time.perf_counter() - started)
    return 0


# --- what main uses: the metadata, the outcome line, the --evaluate command, the flags ---


def describe(args: argparse.Namespace, estimator: Any, fit_seconds: float, *,
             source: dict[str, Any], trips: pd.DataFrame, train_set: pd.DataFrame,
             holdout: pd.DataFrame) -> dict[str, Any]:
    """The model's ``metadata.json``: what it is, what it learnt from, and (once ``evaluate``
    has filled in ``holdout_metrics``) how good it is."""
    rounds = trees(estimator)
    pickups = trips["pickup_datetime"]
    return {
        "version": args.version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "model": args.model,
        "params": {k: v for k, v in estimator.get_params().items()
                   if isinstance(v, (int, float, str, bool, type(None)))},
        "features": list(features.FEATURES),
        "target": "log1p(trip_duration seconds)",
        "training_data": {
            **source,
            "train_on": args.train_on,
            "zone_only_share": args.zone_only_share,
            "trips_by_era": training_data.era_labels(trips).value_counts().sort_index().to_dict(),
            "train_rows": len(train_set),
            "holdout_rows": len(holdout),
            "split": args.split,
            "holdout_fraction": args.holdout_fraction,
            "seed": args.seed,
            "pickup_range": [format_time(pickups.min()), format_time(pickups.max())],
        },
        "holdout_metrics": None,
        "trees": int(rounds) if rounds else None,
        "fit_seconds": round(fit_seconds, 2),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "libraries": model.library_versions(),
    }


def print_outcome(version: str, directory: Path, decision: dict[str, Any] | None,
                  promote_flag: bool, seconds: float) -> None:
    """Where the version went, whether it is live, and (with --promote-if-better) why."""
    size_mb = (directory / "model.joblib").stat().st_size / 1e6
    if decision is not None:
        outcome = ("made live" if decision["promoted"]
                   else f"not promoted, {decision['live']} stays live")
    else:
        outcome = "made live" if promote_flag else "not promoted"
    print(f"model {version} ({size_mb:.1f} MB) written to {directory}, {outcome}; "
          f"total {seconds:.1f} s")
    if decision is not None:
        print(f"  why: {decision['reason']} (in {directory / promotion.DECISION})")


def score_live_model(args: argparse.Namespace) -> int:
    """``--evaluate FILE``: the live model's metrics on a labelled trip file (any supported era),
    overall and per service and era, as text or one JSON line."""
    trips, reports = training_data.read_trip_files([args.evaluate])
    live = model.load_model(args.model_dir)
    result = {"file": str(args.evaluate), "model_version": live.version,
              "rows_malformed": reports[0].rows_malformed}
    result.update(model.labelled_metrics(live, trips, training_data.era_labels(trips)))
    result["by_era"] = result.pop("by_group")
    if args.json:
        print(json.dumps(result))
        return 0
    for line in reports[0].summary_lines():
        print(line)
    print(f"model {live.version} on {result['rows']:,} labelled trips: "
          f"RMSLE {result['rmsle']:.4f}  MAE {result['mae']:.0f} s  RMSE {result['rmse']:.0f} s")
    print(f"  on the {result['rows_clean']:,} that pass the cleaning rules: "
          f"RMSLE {result['rmsle_clean']:.4f}  MAE {result['mae_clean']:.0f} s  "
          f"RMSE {result['rmse_clean']:.0f} s")
    print_eras(result["by_era"])
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the trip-duration model on trip files of any era (Kaggle layout, TLC "
                    "records with coordinates or taxi zones, 2009 on) or the master dataset, or "
                    "score the live model.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--input", action="append", metavar="FILE_OR_GLOB",
                        help="training data, repeatable, a glob allowed: Kaggle NYC Taxi Trip "
                             "Duration layout, or TLC trip records of any era (coordinates or "
                             "zones; yellow or green); CSV, plain or .gz, or Parquet (default: "
                             f"{config.SAMPLE_CSV}, env PERISCOPE_SAMPLE_CSV)")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="where model versions live (env PERISCOPE_MODEL_DIR)")
    parser.add_argument("--model", choices=MODELS, default=MODELS[0],
                        help="estimator; random-forest is the reference")
    parser.add_argument("--from-master", type=Path, metavar="MASTER_DIR",
                        help="train on the batch layer's Avro master dataset instead of --input")
    parser.add_argument("--split", choices=SPLITS, default="random",
                        help="hold-out: seeded random trips, the latest trips by pickup time, or "
                             "by a hash of the trip id (replayed copies stay together; use it "
                             "with --from-master)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2,
                        help="share of trips held out, in (0, 0.9]")
    parser.add_argument("--train-on", choices=("all", "clean"), default="all",
                        help="every well-formed trip, or only those passing the cleaning rules")
    parser.add_argument("--zone-only-share", type=float, default=0.2,
                        help="share of the training trips with coordinates learnt as if known by "
                             "their zones only, so the model predicts zone-only trips, in [0, 1)")
    parser.add_argument("--seed", type=int, default=42, help="seed for the split and the estimator")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for fitting; more help only on idle cores (docs/MODEL.md)")
    parser.add_argument("--version",
                        help="version name (default: UTC time of training, e.g. 20261122T051400Z)")
    parser.add_argument("--no-promote", dest="promote", action="store_false",
                        help="save the new version without making it live")
    parser.add_argument("--promote-if-better", action="store_true",
                        help="score the new and the live model on trips neither trained on; "
                             "promote only if better")
    parser.add_argument("--min-improvement", type=float, default=0.0,
                        help="with --promote-if-better: RMSLE must drop by more than this "
                             "(default: 0, any drop)")
    parser.add_argument("--no-save-holdout", dest="save_holdout", action="store_false",
                        help="do not write the held-out trips (holdout.csv.gz, holdout_*_zones.csv.gz)")
    parser.add_argument("--evaluate", type=Path, metavar="FILE",
                        help="instead of training, score the live model on this trip file (any "
                             "--input layout), overall and per service and era")
    parser.add_argument("--json", action="store_true",
                        help="with --evaluate: print one JSON line "
                             "(rmsle, mae, rmse, rows, ..._clean, by_era)")
    args = parser.parse_args(argv)
    if not 0 < args.holdout_fraction <= 0.9:
        parser.error(f"--holdout-fraction must be in (0, 0.9], got {args.holdout_fraction}")
    if args.json and not args.evaluate:
        parser.error("--json only applies to --evaluate FILE")
    if not 0 <= args.zone_only_share < 1:
        parser.error(f"--zone-only-share must be in [0, 1), got {args.zone_only_share}")
    if args.input and args.from_master:
        parser.error("--input and --from-master name two sources of training data: choose one")
    args.input = args.input or [str(config.SAMPLE_CSV)]
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.promote_if_better and not args.promote:
        parser.error("--promote-if-better and --no-promote contradict each other: choose one")
    if args.min_improvement < 0:
        parser.error(f"--min-improvement must be 0 or more, got {args.min_improvement}")
    return args


if __name__ == "__main__":
    sys.exit(main())
