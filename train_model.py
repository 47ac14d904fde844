"""Train the trip-duration model (the ML part of Periscope), or score it.

The speed layers (``kafka_consumer.py``, ``spark_streaming.py``) predict the
duration of every trip as it arrives with the model this script writes. It
trains on the shipped 73k-trip Kaggle sample by default, with the features of
``periscope.features`` (only what is known at pickup) and a log-duration
target, so minimising squared error minimises RMSLE, the Kaggle metric.

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
that same hold-out and switches ``model/current.json`` only if the candidate
is better; the decision and its reason go to ``decision.json`` beside it.

Run it::

    python train_model.py                          # train, save, make it live
    python train_model.py --model random-forest    # the reference model
    python train_model.py --evaluate FILE --json   # score the live model on a labelled CSV
    python train_model.py --from-master data/master --split id --promote-if-better

Output: ``model/versions/<version>/`` with ``model.joblib``, ``metadata.json``
and ``holdout.csv.gz`` (the held-out real trips, to ``--evaluate`` on), and
``model/current.json`` pointing at the live version.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from threadpoolctl import threadpool_limits

from periscope import cli, config
from periscope.features import FEATURES, build_features, target
from periscope.model import (
    ModelMismatchError,
    ModelNotFoundError,
    TripDurationModel,
    current_version,
    library_versions,
    load_model,
    metrics,
    promote,
    read_metadata,
    save_model,
    version_dir,
)
from periscope.schema import first_broken_rule, format_time, FIELDS
from periscope.sources import CsvLayoutError, apply_rules, empty_trip_frame, read_trips
from periscope.storage import atomic_write_json, file_sha256, master_files, read_master_records

MODELS = ("hist-gradient-boosting", "random-forest")
SPLITS = ("random", "time", "id")
DECISION = "decision.json"
_COPY_SUFFIX = re.compile(r"-\d+$")


def make_estimator(kind: str, seed: int, threads: int):
    """The estimator for ``kind``; hyper-parameters chosen on the sample (see docs/MODEL.md).

    Gradient boosting stops at 80 trees: 320 trees at a lower learning rate
    score 0.397 instead of 0.401 but predict 3x slower, below the speed
    layer's budget of 200,000 trips/s on one core.
    """
    if kind == "random-forest":
        return RandomForestRegressor(
            n_estimators=60, max_depth=14, min_samples_leaf=5, max_features=0.6, n_jobs=threads, random_state=seed
        )
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


def base_id(trip_id: str) -> str:
    """The id of the original trip: replayed copies (``id2875421-2``) share it."""
    return _COPY_SUFFIX.sub("", trip_id)


def id_holdout_mask(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """True for trips held out by a seeded hash of their base id: stable as data grows, copies together."""
    cut = int(fraction * 2**32)
    hashes = [int.from_bytes(hashlib.blake2b(f"{seed}:{base_id(i)}".encode(), digest_size=4).digest(), "big")
              for i in ids]
    return np.asarray(hashes, dtype=np.uint64) < cut


def split_holdout(trips: pd.DataFrame, how: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of (train, hold-out): seeded random, the latest ``fraction`` by pickup, or by id hash."""
    n = len(trips)
    size = int(round(n * fraction))
    if how == "id":
        held = id_holdout_mask(trips["id"].tolist(), fraction, seed)
        return np.flatnonzero(~held), np.flatnonzero(held)
    if how == "time":
        order = np.argsort(trips["pickup_datetime"].to_numpy(), kind="stable")
    else:
        order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n - size]), np.sort(order[n - size:])


def labelled_metrics(model: TripDurationModel, trips: pd.DataFrame) -> dict[str, float]:
    """Metrics over all labelled trips and over those passing the cleaning rules."""
    labelled = trips[trips["trip_duration"] >= 0]
    predicted = model.predict_seconds(labelled)
    result = metrics(labelled["trip_duration"].to_numpy(), predicted)
    clean = first_broken_rule({name: labelled[name].to_numpy() for name in FIELDS[1:]}) < 0
    for name, value in metrics(labelled["trip_duration"].to_numpy()[clean], predicted[clean]).items():
        result[f"{name}_clean"] = value
    return result


def to_kaggle_csv(trips: pd.DataFrame, path: Path) -> None:
    """Write record-form trips back in the Kaggle layout (for ``--evaluate``)."""
    out = trips.copy()
    for name in ("pickup_datetime", "dropoff_datetime"):
        out[name] = [format_time(ms) for ms in out[name]]
    out["store_and_fwd_flag"] = np.where(out["store_and_fwd_flag"], "Y", "N")
    out[list(FIELDS)].to_csv(path, index=False, float_format="%.15g")


def read_master_trips(master_dir: Path) -> tuple[pd.DataFrame, dict]:
    """Every trip of the master dataset as a trip frame, and what identifies that data.

    Master files are immutable and named by content (CSV digest, Kafka offsets),
    so their names and row counts fingerprint the training data.
    """
    files = master_files(master_dir)
    if not files:
        raise FileNotFoundError(f"no master data in {master_dir}: run `python batch_processor.py` first")
    trips = pd.DataFrame.from_records(read_master_records(master_dir), columns=list(FIELDS))
    trips = trips.astype(empty_trip_frame().dtypes.to_dict()) if len(trips) else empty_trip_frame()
    listing = [str(path.relative_to(master_dir)) for path in files]
    source = {"master_dir": str(master_dir), "master_files": len(files),
              "sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest()}
    return trips, source


def load_training_data(args: argparse.Namespace) -> tuple[pd.DataFrame, dict]:
    """The trips to learn from (CSV or master data), and the metadata describing them."""
    if args.from_master:
        print(f"loading the master dataset {args.from_master}")
        trips, source = read_master_trips(args.from_master)
        print(f"{len(trips):,} trips in {source['master_files']} master files")
        return trips, {**source, "rows_read": len(trips), "rows_malformed": 0}
    print(f"loading {args.input}")
    trips, report = read_trips(args.input)
    for line in report.summary_lines():
        print(line)
    return trips, {"file": str(args.input), "sha256": file_sha256(Path(args.input)),
                   "rows_read": report.rows_read, "rows_malformed": report.rows_malformed}


def unseen_by(model_dir: Path, live: str | None, candidate: str, holdout: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The part of the candidate's hold-out that the live model did not train on either, and how it was found.

    A fair comparison scores both models on trips neither has seen. A live
    model trained with the same ``--split id`` held out the same trips; for
    another split, its own ``holdout.csv.gz`` says which trips it did not see
    (matched by base id, so a replayed copy of a training trip counts as seen).
    """
    if live is None or live == candidate:
        return holdout, "the candidate's hold-out"
    cand, seen = read_metadata(model_dir, candidate)["training_data"], read_metadata(model_dir, live)["training_data"]
    same = ("split", "seed", "holdout_fraction")
    if all(seen.get(key) == cand.get(key) for key in same) and cand.get("split") == "id":
        return holdout, "the candidate's hold-out (the live model held out the same trip ids)"
    live_holdout = version_dir(model_dir, live) / "holdout.csv.gz"
    if not live_holdout.exists():
        return holdout, (f"the candidate's hold-out; the live model's training trips are unknown "
                         f"(no {live_holdout.name}), so it may have seen some of them")
    unseen = {base_id(i) for i in read_trips(live_holdout)[0]["id"].tolist()}
    keep = np.fromiter((base_id(i) in unseen for i in holdout["id"].tolist()), dtype=bool, count=len(holdout))
    return holdout[keep], f"the trips of the candidate's hold-out that are also in {live}'s hold-out (seen by neither)"


def compare_and_promote(model_dir: Path, candidate: str, holdout: pd.DataFrame,
                        min_improvement: float = 0.0) -> dict:
    """Score the candidate and the live model on the same hold-out; promote the candidate only if better.

    Better means a hold-out RMSLE lower by more than ``min_improvement``. The
    decision, both scores and the reason are written to the candidate's
    ``decision.json``; every version stays on disk either way.
    """
    live = current_version(model_dir)
    holdout, holdout_note = unseen_by(model_dir, live, candidate, holdout)
    scores = {candidate: labelled_metrics(load_model(model_dir, candidate), holdout)}
    if live is None:
        promoted, reason = True, "no live model yet"
    elif len(holdout) == 0:
        promoted, reason = False, f"no hold-out trip that neither model trained on ({holdout_note}): cannot compare"
    elif live == candidate:
        promoted, reason = True, "the candidate is already live"
    else:
        try:
            scores[live] = labelled_metrics(load_model(model_dir, live), holdout)
        except ModelMismatchError as error:
            scores[live] = None
            promoted, reason = True, f"the live model {live} cannot be used with this code: {error}"
        else:
            new, old = scores[candidate]["rmsle"], scores[live]["rmsle"]
            promoted = new < old - min_improvement
            reason = (f"hold-out RMSLE {new:.4f} vs {old:.4f} of the live {live}: "
                      + ("better" if promoted else "not better")
                      + (f" by more than {min_improvement:g}" if min_improvement else ""))
    if promoted:
        promote(model_dir, candidate)
    decision = {"candidate": candidate, "previous_live": live, "promoted": promoted,
                "live": candidate if promoted else live, "reason": reason,
                "holdout_rows": int(len(holdout)), "holdout": holdout_note, "min_improvement": min_improvement,
                "scores": scores}
    atomic_write_json(version_dir(model_dir, candidate) / DECISION, decision)
    return decision


def train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    trips, source = load_training_data(args)
    if args.train_on == "clean":
        trips = apply_rules(trips)
        print(f"training on the {len(trips):,} trips that pass every cleaning rule")
    if len(trips) < 100:
        print(f"error: {args.from_master or args.input} has only {len(trips)} usable trips; need at least 100",
              file=sys.stderr)
        return 2

    train_rows, holdout_rows = split_holdout(trips, args.split, args.holdout_fraction, args.seed)
    train_set, holdout = trips.iloc[train_rows], trips.iloc[holdout_rows]
    print(f"split ({args.split}): {len(train_set):,} training trips, {len(holdout):,} held out")

    clock = time.perf_counter()
    features = build_features(train_set)
    print(f"built {features.shape[1]} features in {time.perf_counter() - clock:.2f} s")

    estimator = make_estimator(args.model, args.seed, args.threads)
    print(f"fitting {args.model} on log(1 + duration) ...", flush=True)
    clock = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        estimator.fit(features, target(train_set["trip_duration"]))
    fit_seconds = time.perf_counter() - clock
    rounds = getattr(estimator, "n_iter_", None) or getattr(estimator, "n_estimators", None)
    print(f"fitted in {fit_seconds:.1f} s ({rounds} trees)")

    version = args.version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    metadata = {
        "version": version,
        "model": args.model,
        "params": {k: v for k, v in estimator.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "features": list(FEATURES),
        "target": "log1p(trip_duration seconds)",
        "training_data": {
            **source,
            "train_on": args.train_on,
            "train_rows": len(train_set),
            "holdout_rows": len(holdout),
            "split": args.split,
            "holdout_fraction": args.holdout_fraction,
            "seed": args.seed,
            "pickup_range": [format_time(trips["pickup_datetime"].min()), format_time(trips["pickup_datetime"].max())],
        },
        "holdout_metrics": None,
        "trees": int(rounds) if rounds else None,
        "fit_seconds": round(fit_seconds, 2),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "libraries": library_versions(),
    }
    model = TripDurationModel(estimator, metadata)
    metadata["holdout_metrics"] = labelled_metrics(model, holdout)
    directory = save_model(estimator, metadata, args.model_dir)
    if args.save_holdout:
        to_kaggle_csv(holdout, directory / "holdout.csv.gz")
    decision = None
    if args.promote_if_better:
        decision = compare_and_promote(args.model_dir, version, holdout, args.min_improvement)
    elif args.promote:
        promote(args.model_dir, version)

    m = metadata["holdout_metrics"]
    print(f"hold-out ({m['rows']:,} real trips not used in training): "
          f"RMSLE {m['rmsle']:.4f}  MAE {m['mae']:.0f} s  RMSE {m['rmse']:.0f} s")
    print(f"  on the {m['rows_clean']:,} that pass the cleaning rules: RMSLE {m['rmsle_clean']:.4f}  "
          f"MAE {m['mae_clean']:.0f} s  RMSE {m['rmse_clean']:.0f} s")
    size_mb = (directory / "model.joblib").stat().st_size / 1e6
    if decision is not None:
        outcome = "made live" if decision["promoted"] else f"not promoted, {decision['live']} stays live"
    else:
        outcome = "made live" if args.promote else "not promoted"
    print(f"model {version} ({size_mb:.1f} MB) written to {directory}, {outcome}; "
          f"total {time.perf_counter() - started:.1f} s")
    if decision is not None:
        print(f"  why: {decision['reason']} (in {directory / DECISION})")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    model = load_model(args.model_dir)
    trips, report = read_trips(args.evaluate)
    result = {"file": str(args.evaluate), "model_version": model.version, "rows_malformed": report.rows_malformed}
    result.update(labelled_metrics(model, trips))
    if args.json:
        print(json.dumps(result))
    else:
        for line in report.summary_lines():
            print(line)
        print(f"model {model.version} on {result['rows']:,} labelled trips: RMSLE {result['rmsle']:.4f}  "
              f"MAE {result['mae']:.0f} s  RMSE {result['rmse']:.0f} s")
        print(f"  on the {result['rows_clean']:,} that pass the cleaning rules: RMSLE {result['rmsle_clean']:.4f}  "
              f"MAE {result['mae_clean']:.0f} s  RMSE {result['rmse_clean']:.0f} s")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the trip-duration model on a Kaggle-layout CSV, or score the live model.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--input", type=Path, default=config.SAMPLE_CSV,
                        help="training data, Kaggle NYC Taxi Trip Duration layout, plain or .gz")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="where model versions live (env PERISCOPE_MODEL_DIR)")
    parser.add_argument("--model", choices=MODELS, default=MODELS[0],
                        help="estimator; random-forest is the reference")
    parser.add_argument("--from-master", type=Path, metavar="MASTER_DIR",
                        help="train on the batch layer's Avro master dataset instead of --input")
    parser.add_argument("--split", choices=SPLITS, default="random",
                        help="hold-out: seeded random trips, the latest trips by pickup time, or by a hash of "
                             "the trip id (replayed copies stay together; use it with --from-master)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2, help="share of trips held out, in (0, 0.9]")
    parser.add_argument("--train-on", choices=("all", "clean"), default="all",
                        help="every well-formed trip, or only those passing the cleaning rules")
    parser.add_argument("--seed", type=int, default=42, help="seed for the split and the estimator")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for fitting")
    parser.add_argument("--version", help="version name (default: UTC time of training, e.g. 20261122T051400Z)")
    parser.add_argument("--no-promote", dest="promote", action="store_false",
                        help="save the new version without making it live")
    parser.add_argument("--promote-if-better", action="store_true",
                        help="score the new and the live model on the new hold-out; promote only if better")
    parser.add_argument("--min-improvement", type=float, default=0.0,
                        help="with --promote-if-better: RMSLE must drop by more than this")
    parser.add_argument("--no-save-holdout", dest="save_holdout", action="store_false",
                        help="do not write the held-out trips to holdout.csv.gz")
    parser.add_argument("--evaluate", type=Path, metavar="FILE",
                        help="instead of training, score the live model on this labelled CSV")
    parser.add_argument("--json", action="store_true",
                        help="with --evaluate: print one JSON line (rmsle, mae, rmse, rows, ..._clean)")
    args = parser.parse_args(argv)
    if not 0 < args.holdout_fraction <= 0.9:
        parser.error(f"--holdout-fraction must be in (0, 0.9], got {args.holdout_fraction}")
    if args.json and not args.evaluate:
        parser.error("--json only applies to --evaluate FILE")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.promote_if_better and not args.promote:
        parser.error("--promote-if-better and --no-promote contradict each other: choose one")
    if args.min_improvement < 0:
        parser.error(f"--min-improvement must be 0 or more, got {args.min_improvement}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return evaluate(args) if args.evaluate else train(args)
    except (FileNotFoundError, CsvLayoutError, ModelNotFoundError, ModelMismatchError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
