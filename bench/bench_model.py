"""Benchmark of the trip-duration model: training time, size, accuracy, and prediction speed.

The speed layer predicts every trip as it arrives, with the model that
``train_model.py`` writes; the model-retrain DAG runs that script on a
schedule. This benchmark measures both ends:

* **training**, as the DAG runs it: ``train_model.py`` on the shipped sample
  into a temporary model directory, for each estimator; wall time, fit time,
  model file size and hold-out RMSLE come from the run and its metadata;
* **batch prediction on one core**: ``TripDurationModel.predict_seconds`` on a
  million generated trips in record form (what a consumer hands it),
  feature building included, and feature building alone. It runs in a child
  process pinned to one CPU, with every math library limited to one thread
  (set before numpy is imported), so the figure is per core whatever the
  machine; the median of several runs is reported.

Targets (from the model issue): hold-out RMSLE <= 0.42, model file <= 50 MB,
training <= 2 minutes, prediction >= 200,000 trips/s on one core.

Run it (about 3 minutes)::

    python -m bench.bench_model
    python -m bench.bench_model --models hist-gradient-boosting --trips 200000 --runs 3
    python bench/bench_model.py      # also works as a file (make bench)

Results are printed as a table and written to ``bench/results/model-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: python bench/bench_model.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import children_cpu_s, machine_busy_s, print_machine  # noqa: E402
from periscope import config, generate  # noqa: E402
from periscope.features import build_features  # noqa: E402
from periscope.model import load_model, read_metadata  # noqa: E402
from periscope.sources import read_trips  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
MODELS = ("hist-gradient-boosting", "random-forest")
MB = 1e6

ONE_THREAD = {name: "1" for name in (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
)}
"""Read by the math libraries when they load, so they are set for the child, never in this process."""

TARGET_RMSLE = 0.42
TARGET_MODEL_MB = 50.0
TARGET_TRAIN_S = 120.0
TARGET_TRIPS_PER_S = 200_000


def median_seconds(action, runs: int) -> tuple[float, list[float]]:
    """Median wall time of ``runs`` calls of ``action()``, and every time."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def measure_prediction(model_dir: Path, trips: int, runs: int, seed: int) -> dict[str, Any]:
    """In this process: pin to one CPU, then time feature building and ``predict_seconds``.

    The benchmark runs this in a child whose environment already limits the
    math libraries to one thread; pinning makes sure of one core even for
    code that starts threads of its own (the random forest's ``n_jobs``).
    """
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    model = load_model(model_dir)
    if hasattr(model.estimator, "n_jobs"):
        model.estimator.n_jobs = 1
    source, _ = read_trips(config.SAMPLE_CSV)
    frame = generate.resample(source, trips, np.random.default_rng(seed))
    columns = {name: frame[name].to_numpy() for name in frame.columns}

    features_s, features_runs = median_seconds(lambda: build_features(columns), runs)
    predict_s, predict_runs = median_seconds(lambda: model.predict_seconds(columns), runs)
    estimator = model.estimator
    return {
        "model": model.metadata["model"],
        "trees": int(getattr(estimator, "n_iter_", 0) or len(getattr(estimator, "estimators_", []))),
        "cpu": cpu,
        "trips": trips,
        "runs": runs,
        "features_s": round(features_s, 4),
        "features_runs_s": [round(t, 4) for t in features_runs],
        "features_trips_per_s": round(trips / features_s),
        "predict_s": round(predict_s, 4),
        "predict_runs_s": [round(t, 4) for t in predict_runs],
        "predict_trips_per_s": round(trips / predict_s),
    }


def train(model: str, model_dir: Path, log: Path) -> dict[str, Any]:
    """Run ``train_model.py`` for ``model`` as the retrain DAG would; time it, read its metadata."""
    command = [sys.executable, str(PROJECT_ROOT / "train_model.py"), "--model", model,
               "--model-dir", str(model_dir), "--no-save-holdout"]
    cpu_before, busy_before = children_cpu_s(), machine_busy_s()
    started = time.perf_counter()
    with open(log, "wb") as output:
        finished = subprocess.run(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    cpu = children_cpu_s() - cpu_before
    others = max(0.0, machine_busy_s() - busy_before - cpu)
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {finished.returncode}:\n{log.read_text()[-3000:]}")
    metadata = read_metadata(model_dir)
    holdout = metadata["holdout_metrics"]
    return {
        "model": model,
        "train_wall_s": round(wall, 2),
        "train_cpu_s": round(cpu, 2),
        "train_others_cpu_s": round(others, 1),
        "fit_s": metadata["fit_seconds"],
        "model_mb": round(metadata["model_bytes"] / MB, 2),
        "holdout_rmsle": round(holdout["rmsle"], 4),
        "holdout_rmsle_clean": round(holdout["rmsle_clean"], 4),
        "holdout_mae_s": round(holdout["mae"], 1),
        "holdout_rows": holdout["rows"],
    }


def predict_in_one_core_child(model_dir: Path, trips: int, runs: int, seed: int) -> dict[str, Any]:
    """Run ``measure_prediction`` in a fresh one-thread, one-core child and return its result."""
    command = [sys.executable, "-m", "bench.bench_model", "--measure-prediction", str(model_dir),
               "--trips", str(trips), "--runs", str(runs), "--seed", str(seed)]
    cpu_before, busy_before = children_cpu_s(), machine_busy_s()
    finished = subprocess.run(command, cwd=PROJECT_ROOT, env={**os.environ, **ONE_THREAD},
                              capture_output=True, text=True)
    others = max(0.0, machine_busy_s() - busy_before - (children_cpu_s() - cpu_before))
    if finished.returncode != 0:
        raise RuntimeError(f"prediction benchmark failed:\n{finished.stderr[-3000:]}")
    return {**json.loads(finished.stdout.strip().splitlines()[-1]), "others_cpu_s": round(others, 1)}


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target for each model: what was measured and whether it is met."""
    checks = []
    for r in results:
        name = r["model"]
        checks += [
            {"target": f"{name}: hold-out RMSLE <= {TARGET_RMSLE}", "measured": f"{r['holdout_rmsle']:.4f}",
             "met": r["holdout_rmsle"] <= TARGET_RMSLE},
            {"target": f"{name}: model file <= {TARGET_MODEL_MB:.0f} MB", "measured": f"{r['model_mb']:.1f} MB",
             "met": r["model_mb"] <= TARGET_MODEL_MB},
            {"target": f"{name}: training <= {TARGET_TRAIN_S / 60:.0f} min (whole train_model.py run)",
             "measured": f"{r['train_wall_s']:.1f} s", "met": r["train_wall_s"] <= TARGET_TRAIN_S},
            {"target": f"{name}: prediction >= {TARGET_TRIPS_PER_S:,} trips/s on one core (with features)",
             "measured": f"{r['predict_trips_per_s']:,} trips/s", "met": r["predict_trips_per_s"] >= TARGET_TRIPS_PER_S},
        ]
    return checks


def results_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'model':<24} {'trees':>5} {'train s':>8} {'fit s':>7} {'MB':>6} {'RMSLE':>7} {'RMSLE clean':>11} "
             f"{'features/s':>11} {'predict/s':>11}"]
    for r in results:
        lines.append(f"{r['model']:<24} {r['trees']:>5} {r['train_wall_s']:>8.1f} {r['fit_s']:>7.1f} {r['model_mb']:>6.1f} "
                     f"{r['holdout_rmsle']:>7.4f} {r['holdout_rmsle_clean']:>11.4f} "
                     f"{r['features_trips_per_s']:>11,} {r['predict_trips_per_s']:>11,}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_model",
        description="Benchmark the trip-duration model: training time, size, hold-out RMSLE, one-core prediction speed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"estimators to benchmark, comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--trips", type=int, default=1_000_000, help="generated trips per prediction run")
    parser.add_argument("--runs", type=int, default=5, help="prediction runs per model; the median is reported")
    parser.add_argument("--seed", type=int, default=7, help="seed for the generated trips to predict")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON result file is written")
    parser.add_argument("--measure-prediction", type=Path, metavar="MODEL_DIR",
                        help="the one-core child step: time prediction with MODEL_DIR's live model in this process "
                             "and print one JSON line (the benchmark runs itself this way, with one-thread settings)")
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models must name one or more of {', '.join(MODELS)}; got {unknown or 'none'}")
    if args.trips < 1000:
        parser.error(f"--trips must be at least 1000 so the timing means something, got {args.trips}")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.seed < 0:
        parser.error(f"--seed must be zero or positive, got {args.seed}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure_prediction:
        print(json.dumps(measure_prediction(args.measure_prediction, args.trips, args.runs, args.seed)))
        return 0

    machine = print_machine()
    print(f"model benchmark: {', '.join(args.models)}; training on {config.SAMPLE_CSV.name}; "
          f"prediction on {args.trips:,} generated trips, one core, median of {args.runs}\n")
    results = []
    with tempfile.TemporaryDirectory(prefix="periscope-bench-model-") as scratch:
        for model in args.models:
            model_dir = Path(scratch) / model
            print(f"training {model} ...", flush=True)
            result = train(model, model_dir, Path(scratch) / f"train-{model}.log")
            print(f"  {result['train_wall_s']:.1f} s (fit {result['fit_s']:.1f} s), {result['model_mb']:.1f} MB, "
                  f"hold-out RMSLE {result['holdout_rmsle']:.4f}; other processes used "
                  f"{result['train_others_cpu_s']:.1f} CPU-s meanwhile", flush=True)
            print(f"predicting {args.trips:,} trips on one core, {args.runs} runs ...", flush=True)
            prediction = predict_in_one_core_child(model_dir, args.trips, args.runs, args.seed)
            print(f"  {prediction['predict_trips_per_s']:,} trips/s with features "
                  f"(features alone {prediction['features_trips_per_s']:,} trips/s); other processes used "
                  f"{prediction['others_cpu_s']:.1f} CPU-s meanwhile", flush=True)
            results.append({**result, **{k: v for k, v in prediction.items() if k != "model"}})

    print("\nmodel (training on the sample; prediction medians, one core)")
    for line in results_table(results):
        print("  " + line)
    checks = verdicts(results)
    for check in checks:
        print(f"  {'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['measured']}")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.results_dir / f"model-{stamp}.json"
    document = {"benchmark": "model", "argv": sys.argv[1:] if argv is None else argv, "machine": machine,
                "training_data": str(config.SAMPLE_CSV), "results": results, "targets": checks}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
