"""The dashboard (app.py) with Streamlit's AppTest: every page with real data, with only one layer, and empty.

The data is real: a batch version recomputed by ``batch_processor`` from the
shipped sample plus stream master files up to a watermark, speed files with
the trained model's predictions for offsets on both sides of it, status files
as the speed layer writes them, and an Airflow ``dag_run`` table created from
Airflow's own model; for revenue, a batch version of a shipped TLC file. Expected
values are computed from those inputs, not by the dashboard's code (zones by the
tests' own polygon test, ``conftest.shapely_zones``).
"""
from __future__ import annotations

import gzip
import json
import sys
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import batch_processor
from periscope import serving, speed_view, zones
from periscope.dashboard import data
from periscope.model import load_model, read_metadata
from periscope.schema import TRIP_FIELDS
from tests.conftest import (SPEED_FIRST, SPEED_LAST, TLC_DIR, WATERMARK, Demo, clean, heartbeat,
                            independent_tlc, independent_tlc_rules, shapely_zones, status)

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
PAGES = {
    "lambda": "periscope/dashboard/pages/lambda_view.py",
    "speed": "periscope/dashboard/pages/speed_layer.py",
    "batch": "periscope/dashboard/pages/batch_layer.py",
    "model": "periscope/dashboard/pages/model_monitor.py",
    "quality": "periscope/dashboard/pages/data_quality.py",
    "operations": "periscope/dashboard/pages/operations.py",
}
ZONE_CSV = ROOT / "data" / "zones" / "taxi_zone_centroids.csv"
ZONE_POLYGONS = ROOT / "data" / "zones" / "taxi_zones.geojson.gz"
GREEN = TLC_DIR / "green_tripdata_2020-04_1000rows.csv"
BATCH_WHERE = "picked up in the chosen boroughs and dates"


def open_page(page: str, views_dir: Path, speed_dir: Path, model_dir: Path, airflow_home: Path,
              bootstrap: str = "127.0.0.1:1") -> AppTest:
    """Run app.py with these sources (set as the sidebar would) and switch to ``page``."""
    app = AppTest.from_file(str(APP), default_timeout=120)
    sources = {"views_dir": views_dir, "speed_dir": speed_dir, "model_dir": model_dir, "airflow_home": airflow_home}
    for key, value in sources.items():
        app.session_state[key] = str(value)
    app.session_state["bootstrap"] = bootstrap
    app.session_state["refresh_s"] = 0.0
    app.run()
    app.switch_page(PAGES[page]).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def demo_page(demo: Demo, page: str) -> AppTest:
    heartbeat(demo.speed_dir)
    return open_page(page, demo.views_dir, demo.speed_dir, demo.model_dir, demo.airflow_home, demo.bootstrap)


def metrics(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def texts(app: AppTest) -> str:
    return "\n".join(element.value for kind in ("markdown", "info", "warning", "success", "caption")
                     for element in getattr(app, kind))


# --- every page with data -------------------------------------------------------------------------------


def test_lambda_page_total_is_batch_plus_speed_above_the_watermark(demo):
    app = demo_page(demo, "lambda")
    shown = metrics(app)
    assert shown["Batch trips"] == f"{demo.batch_trips:,}"
    assert shown["Speed trips above the watermark"] == f"{demo.speed_trips:,}" == f"{3 * (SPEED_LAST - WATERMARK):,}"
    assert shown["Trips (batch + speed)"] == f"{demo.batch_trips + demo.speed_trips:,}"
    assert shown["Mean duration"] == f"{demo.durations.mean() / 60:.1f} min"
    assert shown["Spread (std)"] == f"{demo.durations.std(ddof=1) / 60:.1f} min"
    text = texts(app)
    assert "Batch as of version **v000002**" in text and f"p0 ≤ {WATERMARK}" in text
    minutes = (demo.stream["kafka_timestamp_ms"].max() - demo.stream["kafka_timestamp_ms"].min()) / 60_000
    assert f"last **{demo.speed_trips:,} trips / {minutes:.1f} minutes**" in text
    assert "What is being merged" in app.expander[0].label
    hourly = app.dataframe[-1].value
    assert hourly["trips"].sum() == demo.batch_trips + demo.speed_trips


def test_speed_page_shows_recent_trips_latency_and_lag(demo):
    app = demo_page(demo, "speed")
    shown = metrics(app)
    latency = demo.stream["visible_at_ms"] - demo.stream["kafka_timestamp_ms"]
    assert shown["Trips in the speed view"] == f"{demo.speed_trips:,}"
    assert shown["Latency p50"] == f"{latency.median():,.0f} ms"
    assert shown["Consumer lag"] == f"{demo.lag:,} messages"
    assert shown["Throughput now"] == "180 trips/s"
    recent = app.dataframe[0].value
    newest = demo.stream.sort_values(["visible_at_ms", "partition", "offset"], ascending=False).head(len(recent))
    assert list(recent["trip"]) == list(newest["id"])
    assert list(recent["actual s"]) == list(newest["trip_duration"])
    assert (recent["offset"] > WATERMARK).all()
    processes = app.dataframe[1].value
    assert dict(zip(processes["consumer"], processes["alive"])) == {"alive": True, "gone": False}


def test_batch_page_filters_dates_and_vendors(demo):
    app = demo_page(demo, "batch")
    assert metrics(app)["Trips in the date range"] == f"{demo.batch_trips:,}"
    assert "Version **v000002**" in texts(app)
    deck = json.loads(app.get("deck_gl_json_chart")[0].proto.json)
    assert deck["layers"][0]["@@type"] == "ScatterplotLayer" and len(deck["layers"][0]["data"]) > 100
    assert deck.get("mapProvider") is None and deck["mapStyle"] == "__MAP_STYLE__"  # no basemap: nothing to fetch

    app.date_input(key="batch_dates").set_value((datetime(2016, 3, 1).date(), datetime(2016, 3, 31).date())).run()
    app.multiselect(key="batch_vendors").set_value([2]).run()
    assert not app.exception
    pickup = pd.to_datetime(demo.batch_frame["pickup_datetime"], unit="ms")
    in_march = ((pickup >= "2016-03-01") & (pickup < "2016-04-01")).sum()
    shown = metrics(app)
    assert shown["Trips in the date range"] == f"{in_march:,}"
    assert shown["Days"] == "31"
    assert shown["Trips of the chosen vendors"] == f"{(demo.batch_frame['vendor_id'] == 2).sum():,}"


# --- zones, boroughs and revenue -----------------------------------------------------------------------


def zone_table() -> pd.DataFrame:
    return pd.read_csv(ZONE_CSV).set_index("location_id")


def zoned(trips: pd.DataFrame) -> pd.DataFrame:
    """Record-form Kaggle trips as the tests place them: pickup date, duration, both zones by the tests'
    own polygon test (0: none) and their boroughs ("no zone" for 0)."""
    borough = zone_table()["borough"]
    out = pd.DataFrame({"date": pd.to_datetime(trips["pickup_datetime"].to_numpy(), unit="ms").normalize(),
                        "duration": trips["trip_duration"].to_numpy()})
    for end in ("pickup", "dropoff"):
        out[end] = shapely_zones(trips[f"{end}_longitude"], trips[f"{end}_latitude"])
        out[f"{end}_borough"] = out[end].map(borough).fillna("no zone")
    return out


MARCH = (pd.Timestamp("2016-03-01"), pd.Timestamp("2016-03-31"))


@pytest.fixture(scope="module")
def march(demo) -> pd.DataFrame:
    """The demo's batch trips picked up in March 2016, placed by ``zoned``."""
    pickup = pd.to_datetime(demo.batch_frame["pickup_datetime"], unit="ms")
    return zoned(demo.batch_frame[pickup.between(MARCH[0], MARCH[1] + pd.Timedelta(days=1), inclusive="left")])


def test_zone_summary_and_flows_are_the_trips_of_the_dates_and_boroughs(demo, march):
    batch = serving.combined_views(demo.views_dir, demo.speed_dir).batch_views
    chosen = ["Manhattan", "Queens", "no zone"]
    picked = march[march["pickup_borough"].isin(chosen)]
    summary = data.zone_summary(data.between_dates(batch["zone_daily"], *MARCH), zones.zone_table(), chosen)

    table = zone_table()
    expected_zones = list(table.index[table["borough"].isin(chosen)]) + ([0] if (picked["pickup"] == 0).any() else [])
    assert sorted(summary.index) == sorted(expected_zones)
    per_zone = picked.groupby("pickup")["duration"].agg(["count", "mean"])
    np.testing.assert_array_equal(summary["trips"], per_zone["count"].reindex(summary.index, fill_value=0))
    np.testing.assert_allclose(summary["duration_min_mean"], per_zone["mean"].reindex(summary.index) / 60)
    assert list(summary["zone"]) == list(table["zone"].reindex(summary.index).fillna("no zone"))

    flows = data.borough_flows(data.between_dates(batch["borough_flows"], *MARCH), chosen)
    expected = picked.groupby(["pickup_borough", "dropoff_borough"])["duration"].agg(["count", "mean"])
    got = flows.set_index(["from", "to"]).sort_index()
    assert got.index.tolist() == expected.index.tolist()
    np.testing.assert_array_equal(got["trips"], expected["count"])
    np.testing.assert_allclose(got["mean duration (min)"], expected["mean"] / 60)
    np.testing.assert_allclose(got["share %"], 100 * expected["count"] / len(picked))
    assert flows["trips"].is_monotonic_decreasing
    assert flows["trips"].sum() == summary["trips"].sum() == len(picked)

    revenue = data.revenue(summary)  # Kaggle trips record no fare, tip or total amount
    assert (revenue["trips"] == len(picked)).all() and (revenue["recorded by"] == 0).all()
    assert revenue[["sum USD", "mean USD"]].isna().all().all()
    assert data.zone_measures(summary) == ["trips", "mean duration (min)"]


def test_the_choropleth_colours_each_zone_and_splits_its_trips_into_batch_and_speed(demo):
    merged = serving.combined_views(demo.views_dir, demo.speed_dir)
    parts = {"batch": merged.batch_views["zone_daily"], "speed": merged.speed_views["zone_daily"]}
    summary = data.zone_summary(merged.views["zone_daily"], zones.zone_table(), ["Manhattan"], parts)
    polygons = json.loads(gzip.decompress(ZONE_POLYGONS.read_bytes()))
    collection = data.choropleth(polygons, summary, "trips")

    table = zone_table()
    manhattan = table.index[table["borough"] == "Manhattan"]
    batch = zoned(demo.batch_frame)["pickup"].value_counts().reindex(manhattan, fill_value=0)
    speed = zoned(demo.stream)["pickup"].value_counts().reindex(manhattan, fill_value=0)
    shown = {feature["properties"]["location_id"]: feature["properties"] for feature in collection["features"]}
    assert sorted(shown) == sorted(manhattan)
    for zone, properties in shown.items():
        assert properties["trips"] == f"{batch[zone] + speed[zone]:,}"
        assert properties["layers"] == f"batch {batch[zone]:,}, speed {speed[zone]:,}"
        assert (properties["zone"], properties["borough"]) == (table.loc[zone, "zone"], "Manhattan")
        assert properties["fare"] == properties["revenue"] == "not recorded"
    total = (batch + speed).sort_values(kind="stable")
    greens = [shown[zone]["fill_color"][1] for zone in total.index if total[zone] > 0]
    assert greens == sorted(greens, reverse=True) and greens[0] > greens[-1]  # more trips, a darker red
    assert all(shown[zone]["fill_color"] == list(data.NO_DATA_COLOR) for zone in total.index if total[zone] == 0)


def test_batch_page_zone_map_flows_and_revenue_follow_the_filters(demo, march):
    app = demo_page(demo, "batch")
    app.date_input(key="batch_dates").set_value(tuple(day.date() for day in MARCH)).run()
    app.multiselect(key="batch_boroughs").set_value(["Manhattan"]).run()
    assert not app.exception, [e.value for e in app.exception]
    picked = march[march["pickup_borough"] == "Manhattan"]
    assert metrics(app)[f"Trips {BATCH_WHERE}"] == f"{len(picked):,}"
    deck = json.loads(app.get("deck_gl_json_chart")[1].proto.json)
    layer = deck["layers"][0]
    assert layer["@@type"] == "GeoJsonLayer" and deck.get("mapProvider") is None
    table = zone_table()
    assert len(layer["data"]["features"]) == (table["borough"] == "Manhattan").sum()
    assert app.radio(key="batch_zone_measure").options == ["trips", "mean duration (min)"]
    flows = app.dataframe[-1].value
    assert set(flows["from"]) == {"Manhattan"} and flows["trips"].sum() == len(picked)
    assert f"none of the {len(picked):,} trips {BATCH_WHERE} records a fare, tip or total" in texts(app)

    app.multiselect(key="batch_boroughs").set_value([]).run()
    assert not app.exception, [e.value for e in app.exception]
    assert metrics(app)[f"Trips {BATCH_WHERE}"] == "0"
    assert "No trips picked up in the chosen boroughs and dates." in texts(app)


def test_lambda_page_zone_map_and_flows_say_which_part_is_batch_and_which_speed(demo):
    app = demo_page(demo, "lambda")
    deck = json.loads(app.get("deck_gl_json_chart")[0].proto.json)
    assert deck["layers"][0]["@@type"] == "GeoJsonLayer" and deck.get("mapProvider") is None
    assert len(deck["layers"][0]["data"]["features"]) == len(zone_table())
    flows = app.dataframe[0].value
    assert flows["batch trips"].sum() == demo.batch_trips and flows["speed trips"].sum() == demo.speed_trips
    assert (flows["trips"] == flows["batch trips"] + flows["speed trips"]).all()
    assert f"({demo.batch_trips:,} batch, {demo.speed_trips:,} speed in all)" in texts(app)


@pytest.fixture(scope="module")
def tlc_views(tmp_path_factory) -> Path:
    """A batch version of one TLC file (it records fare, tip and total amount), made by the CLI."""
    root = tmp_path_factory.mktemp("tlc-dashboard")
    dirs = ["--master-dir", str(root / "master"), "--views-dir", str(root / "views"),
            "--speed-dir", str(root / "speed")]
    assert batch_processor.main([*dirs, "import", "--cutoff", "none", str(GREEN)]) == 0
    assert batch_processor.main([*dirs, "recompute", "--workers", "1"]) == 0
    return root


def test_batch_page_shows_the_revenue_a_tlc_file_records(tlc_views, tmp_path):
    raw, ok = independent_tlc(GREEN)
    trips = raw[ok]
    facts = ["vendor", "pickup", "dropoff", "passengers", "pzone", "dzone", "distance", "fare", "tip", "total"]
    trips = trips[~trips[facts].astype(str).duplicated()]  # the same content is the same fact
    trips = trips[independent_tlc_rules(trips) == ""].copy()
    cents = {name: (trips[name] * 100).round() for name in ("fare", "tip", "total")}
    app = open_page("batch", tlc_views / "views", tlc_views / "speed", tmp_path / "model", tmp_path / "airflow")
    shown = metrics(app)
    assert shown[f"Trips {BATCH_WHERE}"] == f"{len(trips):,}"
    for name, (sum_label, mean_label) in data.REVENUE_LABELS.items():
        recorded = int(trips[name].notna().sum())
        assert recorded > 0
        assert shown[sum_label] == f"${cents[name].sum() / 100:,.2f}", name
        assert shown[mean_label] == f"${cents[name].sum() / 100 / recorded:,.2f}", name
    assert app.radio(key="batch_zone_measure").options == list(data.ZONE_MEASURES)

    trips["zone"] = trips["pzone"].where(trips["pzone"].between(1, 263), 0).astype(int)
    by_zone = trips.assign(fare_cents=cents["fare"], total_cents=cents["total"]).groupby("zone").agg(
        n=("fare", "size"), fares=("fare", "count"), fare_cents=("fare_cents", "sum"),
        total_cents=("total_cents", "sum"))
    busiest = by_zone[by_zone.index > 0]["n"].idxmax()
    deck = json.loads(app.get("deck_gl_json_chart")[1].proto.json)
    shown_zone = next(feature["properties"] for feature in deck["layers"][0]["data"]["features"]
                      if feature["properties"]["location_id"] == busiest)
    expected = by_zone.loc[busiest]
    assert shown_zone["trips"] == f"{int(expected['n']):,}"
    assert shown_zone["fare"] == f"${expected['fare_cents'] / 100 / expected['fares']:,.2f}"
    assert shown_zone["revenue"] == f"${expected['total_cents'] / 100:,.2f}"
    flows = app.dataframe[-1].value
    assert flows["trips"].sum() == len(trips)
    assert flows["total amount (USD)"].sum() == pytest.approx(cents["total"].sum() / 100)


def test_model_page_compares_live_error_with_the_holdout(demo):
    app = demo_page(demo, "model")
    shown = metrics(app)
    meta = read_metadata(demo.model_dir)
    assert shown["Hold-out RMSLE (clean trips)"] == f"{meta['holdout_metrics']['rmsle_clean']:.3f}"
    actual, predicted = demo.stream["trip_duration"].to_numpy(float), demo.stream["predicted_duration_s"].to_numpy()
    rmsle = np.sqrt(np.mean((np.log1p(predicted) - np.log1p(actual)) ** 2))
    assert shown["Live RMSLE"] == f"{rmsle:.3f}"
    assert shown["Live MAE"] == f"{np.mean(np.abs(predicted - actual)):,.0f} s"
    assert shown["Trips scored live"] == f"{demo.speed_trips:,}"
    assert f"Live model **{meta['version']}**" in texts(app)
    holdout = app.dataframe[0].value
    assert holdout["rows"].tolist() == [meta["holdout_metrics"]["rows"], meta["holdout_metrics"]["rows_clean"]]


def test_feature_importances_come_from_the_fitted_trees(trained_model_dir):
    model = load_model(trained_model_dir)
    importances = data.feature_importances(model.estimator, model.metadata["features"])
    assert sorted(importances["feature"]) == sorted(model.metadata["features"])
    assert importances["importance"].sum() == pytest.approx(1.0) and (importances["importance"] >= 0).all()
    assert importances["importance"].is_monotonic_decreasing
    assert data.feature_importances(object(), ["a"]) is None


def test_quality_page_shows_dead_letters_over_time_and_cleaning_counts(demo):
    app = demo_page(demo, "quality")
    shown = metrics(app)
    assert shown["Dead letters since the processes started"] == f"{demo.dlq_total:,}"
    removed = sum(demo.rule_counts.values())
    assert shown["Trips removed by the rules in v000002"] == f"{removed:,}"
    assert shown["Duplicate copies removed in v000002"] == f"{demo.duplicates:,}"
    rules = app.dataframe[1].value
    assert dict(zip(rules["rule"], rules["removed"])) == demo.rule_counts
    totals = app.dataframe[0].value
    assert dict(zip(totals["reason"], totals["dead_letters"])) == {
        "duration_too_short": 5, "invalid_json": 3, "pickup_outside_nyc": 3}
    fresh = app.dataframe[2].value.set_index("layer")
    assert fresh.loc["batch view", "fresh"] and fresh.loc["speed view (last write)", "fresh"]
    schema = app.dataframe[3].value
    assert list(schema["field"]) == list(TRIP_FIELDS)


def test_dead_letters_per_minute_add_up_over_processes(demo):
    per_minute = data.dlq_over_time(speed_view.read_statuses(demo.speed_dir))
    assert per_minute["dead_letters"].sum() == demo.dlq_total
    latest = per_minute[per_minute["minute"] == per_minute["minute"].max()]
    assert dict(zip(latest["reason"], latest["dead_letters"])) == {"duration_too_short": 1, "pickup_outside_nyc": 3}


def test_minute_counts_keep_a_bounded_history():
    history = speed_view.MinuteCounts(keep_minutes=3)
    for minute in range(5):
        history.add(["a"] * (minute + 1) + ["b"], minute * 60_000 + 59_999)
    history.add([], 10 * 60_000)
    kept = history.as_status()
    assert [entry["minute_ms"] for entry in kept] == [120_000, 180_000, 240_000]
    assert kept[-1]["counts"] == {"a": 5, "b": 1}


def test_a_caught_up_speed_layer_without_recent_files_is_green_and_stale_consumers_are_not_alive():
    now = data.now_ms()
    running = status("live", "running", now - 1_000, {0: 0, 1: 0, 2: 0}, {}, now).to_json()
    killed = status("killed", "running", now - 600_000, {0: 40}, {}, now).to_json()
    stopped = status("stopped", "stopped", now - 5_000, {0: 0}, {}, now).to_json()
    lights = data.health(now, True, "127.0.0.1:9092", [running, killed, stopped], None, None, {}, None, None)
    light = dict(zip(lights["component"], zip(lights["ok"], lights["detail"])))
    assert light["speed layer consumer"] == (True, "1 alive (2 stopped or silent ones ignored), total lag 0")
    ok, detail = light["last speed write"]
    assert ok and "caught up (lag 0)" in detail and "pruned" in detail

    behind = status("live", "running", now - 1_000, {0: 7}, {}, now).to_json()
    lights = data.health(now, True, "127.0.0.1:9092", [behind], None, None, {}, None, None)
    assert not lights.set_index("component").loc["last speed write", "ok"], "lagging without writing is red"
    lights = data.health(now, True, "127.0.0.1:9092", [killed], now - 2_000, None, {}, None, None)
    consumer = lights.set_index("component").loc["speed layer consumer"]
    assert not consumer["ok"] and consumer["detail"].startswith("none alive; the last heartbeat was 10 min")


def test_operations_page_lights_versions_and_airflow_runs(demo):
    app = demo_page(demo, "operations")
    lights = {line.split("**")[1]: line for line in (m.value for m in app.markdown) if line.startswith(":")}
    assert lights["Kafka broker"].startswith(":red") and "`make kafka-up`" in lights["Kafka broker"]
    assert lights["speed layer consumer"].startswith(":green") and \
        "1 alive (1 stopped or silent one ignored), total lag 17" in lights["speed layer consumer"]
    assert lights["batch view"].startswith(":green") and "v000002" in lights["batch view"]
    assert lights["model"].startswith(":green")
    assert lights["Airflow"].startswith(":red") and "last run failed: periscope_batch" in lights["Airflow"]
    kept = app.dataframe[0].value
    assert list(kept["version"]) == ["v000002", "v000001"] and list(kept["current"]) == [True, False]
    assert list(kept["clean trips"]) == [demo.batch_trips, len(demo.sample_clean)]
    last = app.dataframe[1].value
    assert dict(zip(last["dag_id"], last["state"])) == {"periscope_batch": "failed", "periscope_retrain": "success"}
    assert (last["seconds"] > 39).all()


# --- one layer only, and nothing --------------------------------------------------------------------------


def test_only_the_batch_layer(demo, tmp_path):
    app = open_page("lambda", demo.views_dir, tmp_path / "no-speed", demo.model_dir, tmp_path / "no-airflow")
    assert metrics(app)["Trips (batch + speed)"] == f"{demo.batch_trips:,}"
    assert "`python kafka_consumer.py`" in texts(app)
    speed = open_page("speed", demo.views_dir, tmp_path / "no-speed", demo.model_dir, tmp_path / "no-airflow")
    assert "`python kafka_consumer.py`" in texts(speed)


def test_only_the_speed_layer(demo, tmp_path):
    app = open_page("lambda", tmp_path / "no-views", demo.speed_dir, demo.model_dir, tmp_path / "no-airflow")
    all_speed = len(speed_view.read_speed(demo.speed_dir))
    assert all_speed == 3 * (SPEED_LAST - SPEED_FIRST + 1)
    assert metrics(app)["Trips (batch + speed)"] == f"{all_speed:,}"
    assert "`python batch_processor.py`" in texts(app)
    batch = open_page("batch", tmp_path / "no-views", demo.speed_dir, demo.model_dir, tmp_path / "no-airflow")
    assert "`python batch_processor.py`" in texts(batch)


EMPTY_HINTS = {
    "lambda": ["`python batch_processor.py`", "`python kafka_consumer.py`"],
    "speed": ["`python kafka_consumer.py`", "`python kafka_producer.py --rate 200`"],
    "batch": ["`python batch_processor.py`"],
    "model": ["`python train_model.py`"],
    "quality": ["`python kafka_consumer.py`", "`python batch_processor.py`"],
    "operations": ["`python batch_processor.py`", "`make airflow`", "`make kafka-up`"],
}


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_when_nothing_exists_yet(page, tmp_path):
    app = open_page(page, tmp_path / "views", tmp_path / "speed", tmp_path / "model", tmp_path / "airflow")
    shown = texts(app)
    for hint in EMPTY_HINTS[page]:
        assert hint in shown, (page, hint, shown)
    assert not app.error


def test_a_wrong_flag_is_explained_on_the_page(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(APP), "--refresh", "-3"])
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert "--refresh must be 0 (off) or a positive number" in app.error[0].value
    monkeypatch.setattr(sys, "argv", [str(APP), "--view-dir", "x"])
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert "unrecognized arguments: --view-dir x" in app.error[0].value


@pytest.mark.kafka
def test_the_real_speed_layer_reports_dead_letters_per_minute(kafka_bootstrap, topics, trained_model_dir,
                                                              sample_trips, tmp_path):
    import kafka_consumer
    from tests.conftest import consumer_args, produce, trip_messages

    good = clean(sample_trips.iloc[:400]).head(300)
    bad = [(b"bad-json", b'{"id": "x"'), (b"bad-empty", b""), (b"bad-json-2", b"[1, 2]")]
    produce(kafka_bootstrap, topics[0], trip_messages(good) + bad)
    speed_dir = tmp_path / "speed"
    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir)) == 0

    per_minute = data.dlq_over_time(speed_view.read_statuses(speed_dir))
    assert per_minute.groupby("reason")["dead_letters"].sum().to_dict() == {"invalid_json": 2, "empty_message": 1}
    app = open_page("quality", tmp_path / "views", speed_dir, trained_model_dir, tmp_path / "airflow")
    assert metrics(app)["Dead letters since the processes started"] == "3"
    assert "does not report dead letters per minute" not in texts(app)  # so the per-minute chart is drawn
