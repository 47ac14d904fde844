"""Print what the pipeline has made and where: ``python -m periscope.summary``.

``make demo`` ends with it, so a newcomer sees at a glance which model is
live, what the master dataset holds and which batch version the dashboard
will read — with the path of each and the command to look further.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from periscope import cli, config, model, storage


def model_lines(model_dir: Path) -> list[str]:
    version = model.current_version(model_dir)
    if version is None:
        return [f"model        none yet in {model_dir}: run `python train_model.py`"]
    meta = model.read_metadata(model_dir, version)
    metrics = meta["holdout_metrics"]
    folder = model.version_dir(model_dir, version)
    return [
        f"model        {version} ({meta['model']}, {len(meta['features'])} features, "
        f"{meta['model_bytes'] / 1e6:.1f} MB) in {folder}",
        f"             hold-out RMSLE {metrics['rmsle']:.4f} on {metrics['rows']:,} real trips "
        f"({metrics['rmsle_clean']:.4f} on the {metrics['rows_clean']:,} clean ones)",
        f"             score it again: python train_model.py --evaluate {folder / 'holdout.csv.gz'}",
    ]


def master_lines(master_dir: Path) -> list[str]:
    files = storage.master_files(master_dir)
    rows = sum(int(storage.avro_metadata(path).get("rows", 0)) for path in files)
    return [f"master data  {len(files)} Avro files, {rows:,} trips, under {master_dir}"]


def view_lines(views_dir: Path) -> list[str]:
    version = storage.current_version(views_dir)
    if version is None:
        return [f"batch views  none yet in {views_dir}: run `python batch_processor.py`"]
    batch, manifest = storage.read_version(views_dir, version)
    return [
        f"batch views  {version}: {manifest['rows']['clean']:,} clean trips in {len(batch)} views, "
        f"in {views_dir / version}",
        "             " + ", ".join(f"{name} ({len(frame):,} rows)" for name, frame in batch.items()),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR, help="model versions")
    parser.add_argument("--master-dir", type=Path, default=config.MASTER_DIR, help="Avro master dataset")
    parser.add_argument("--views-dir", type=Path, default=config.VIEWS_DIR, help="published batch views")
    args = parser.parse_args(argv)
    for line in model_lines(args.model_dir) + master_lines(args.master_dir) + view_lines(args.views_dir):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
