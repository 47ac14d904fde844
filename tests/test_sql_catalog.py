"""``batch_processor.py sql``: the master data and the current batch version as SQL tables.

Real Spark with a real Hive-style catalog (embedded Derby), in subprocesses as
a user runs it; the figures expected are computed with pandas from the CSVs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import batch_processor
from periscope import config, spark_session, sql_catalog
from tests.conftest import ROOT, SHARED_DATA

GREEN = SHARED_DATA / "tlc" / "green_tripdata_2020-04_1000rows.csv"


def test_view_statements_name_the_version_and_read_timestamps(tmp_path, sample_csv):
    """Each view of the version is one ``CREATE OR REPLACE VIEW`` over that version's file."""
    dirs = [str(tmp_path / name) for name in ("master", "views", "speed")]
    flags = ["--master-dir", dirs[0], "--views-dir", dirs[1], "--speed-dir", dirs[2]]
    assert batch_processor.main([*flags, "run", "--input", str(sample_csv)]) == 0
    statements = sql_catalog.view_statements(Path(dirs[1]), "v000001")
    views = sorted(path.stem for path in (Path(dirs[1]) / "v000001").glob("*.parquet"))
    assert [re.match(r"CREATE OR REPLACE VIEW periscope\.(\w+) ", s).group(1) for s in statements] == [
        *views, "batch_trip_ids", "batch_version"]
    assert all("/v000001/" in statement for statement in statements[:-1])
    daily = next(s for s in statements if "periscope.daily_summary " in s)
    assert "timestamp_micros(pickup_date DIV 1000) AS pickup_date" in daily


def _table(output: str, header: str) -> list[list[str]]:
    """The rows of the result table whose header line contains ``header``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line)
    rows = []
    for line in lines[start + 2:]:
        if line.startswith("+"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture()
def published(tmp_path, sample_csv, sample_raw, independent_clean_mask):
    """Master data from the sample and a copy of its first 500 rows, one version published."""
    copies = tmp_path / "copies.csv"
    sample_raw.head(500).to_csv(copies, index=False)
    dirs = {name: tmp_path / name for name in ("master", "views", "speed", "state")}
    flags = ["--master-dir", str(dirs["master"]), "--views-dir", str(dirs["views"]),
             "--speed-dir", str(dirs["speed"])]
    assert batch_processor.main([*flags, "import", str(sample_csv), str(copies)]) == 0
    assert batch_processor.main([*flags, "recompute"]) == 0
    history = pd.to_datetime(sample_raw["pickup_datetime"]) < pd.Timestamp(config.CUTOFF)
    distinct = sample_raw[history]
    clean = pd.to_datetime(distinct.loc[independent_clean_mask(distinct), "pickup_datetime"])
    by_hour = (pd.DataFrame({"weekday": clean.dt.weekday, "hour": clean.dt.hour}).value_counts()
               .rename("trips").reset_index().sort_values(["trips", "weekday", "hour"],
                                                          ascending=[False, True, True]))
    expected = {"master": int(history.sum() + history.head(500).sum()), "distinct": len(distinct),
                "clean": len(clean),
                "busiest": [str(v) for v in by_hour.iloc[0][["weekday", "hour", "trips"]]]}
    env = {**os.environ, "PERISCOPE_STATE_DIR": str(dirs["state"]),
           "PERISCOPE_SPARK_JARS_DIR": str(spark_session.JARS_DIR), "PYTHONUNBUFFERED": "1"}
    return flags, dirs, expected, env


def sql_command(flags: list[str], *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "batch_processor.py"), *flags, "sql", *args]


def test_prompt_follows_each_publish_and_holds_the_catalog(published):
    """A prompt re-points the views at a version published while it is open; a second session is refused."""
    flags, dirs, expected, env = published
    prompt = subprocess.Popen(sql_command(flags), cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    output: list[str] = []

    def read_until(marker: str, timeout_s: float = 240.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = prompt.stdout.readline()
            assert line, f"the prompt ended early: {''.join(output)}"
            output.append(line)
            if marker in line:
                return line
        raise AssertionError(f"no {marker!r} within {timeout_s} s: {''.join(output)}")

    try:
        first = read_until("SQL over the periscope database")
        assert "master" in first and "daily_summary" in first
        prompt.stdin.write("SELECT version AS shown FROM periscope.batch_version\n")
        prompt.stdin.flush()
        read_until("|shown")
        assert read_until("|v0000").strip() == "|v000001|"

        busy = subprocess.run(sql_command(flags, "-e", "SELECT 1"), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and "Traceback" not in busy.stderr
        assert busy.stderr.strip().splitlines()[-1].startswith("error: another `batch_processor.py sql`")

        assert batch_processor.main([*flags, "recompute"]) == 0  # v000002, published under the prompt
        prompt.stdin.write("SELEC typo\n")
        prompt.stdin.write("SELECT version AS shown, sum(trips) AS trips FROM periscope.batch_version "
                           "CROSS JOIN periscope.daily_summary GROUP BY version\n")
        prompt.stdin.write("quit\n")
        prompt.stdin.flush()
        assert read_until("error:").startswith("sql> error:")
        read_until("|shown")
        row = read_until("|v0000").strip().strip("|").split("|")
        assert [cell.strip() for cell in row] == ["v000002", str(expected["clean"])]
        assert prompt.wait(timeout=60) == 0
    finally:
        if prompt.poll() is None:
            prompt.kill()


def test_execute_counts_every_copy_in_master_and_each_trip_once_in_the_views(published):
    """``-e`` prints each result; master holds every copy, in every layout; a failing statement ends
    with one line."""
    flags, dirs, expected, env = published
    assert batch_processor.main([*flags, "import", "--cutoff", "none", str(GREEN)]) == 0  # not in v000001
    green = pd.read_csv(GREEN)
    result = subprocess.run(sql_command(
        flags, "-e", "SELECT count(*) AS copies, count(DISTINCT id) AS trips FROM periscope.master "
                     "WHERE service IS NULL OR service <> 'green'",
        "-e", "SELECT count(*) AS green, count(pickup_location_id) AS zoned FROM periscope.master "
              "WHERE service = 'green'",
        "-e", "SELECT sum(trips) AS clean FROM periscope.daily_summary",
        "-e", "SELECT pickup_weekday, pickup_hour, trips FROM periscope.hour_of_week "
              "ORDER BY trips DESC, pickup_weekday, pickup_hour LIMIT 1",
        "-e", "SELECT * FROM periscope.no_such_view"), cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert _table(result.stdout, "|copies") == [[str(expected["master"]), str(expected["distinct"])]]
    zoned = int(green["PULocationID"].notna().sum())
    assert _table(result.stdout, "|green") == [[str(len(green)), str(zoned)]]
    assert _table(result.stdout, "|clean") == [[str(expected["clean"])]]
    assert _table(result.stdout, "|pickup_weekday") == [expected["busiest"]]
    assert result.returncode == 2 and "Traceback" not in result.stderr and "stacktrace" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 'SELECT * FROM periscope.no_such_view':") and "no_such_view" in last
