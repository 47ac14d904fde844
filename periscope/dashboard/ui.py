"""The Streamlit side shared by the dashboard's pages: settings, cached loaders, charts, empty states.

Caching follows what the layers publish. A batch version never changes once
named, and neither does a speed file, so the merged views are cached under
the key (batch version, listing of speed files): an auto-refresh that finds
the same key re-reads nothing, and a new speed file or a new batch version
makes exactly one fresh read through ``serving.combined_views``. Status files
are a few kilobytes and change every second, so they are read on every run.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import pydeck as pdk
import streamlit as st

from periscope import kafka_local, model, serving, speed_view, storage
from periscope.dashboard import data

SETTINGS_KEY = "periscope_settings"


@dataclass(frozen=True)
class Settings:
    """Where the dashboard reads from and how often it refreshes (set in ``app.py``)."""

    views_dir: Path
    speed_dir: Path
    model_dir: Path
    airflow_home: Path
    bootstrap: str
    refresh_s: float


def settings() -> Settings:
    found = st.session_state.get(SETTINGS_KEY)
    if found is None:
        st.error("Open the dashboard through `streamlit run app.py`: it sets where the data is.")
        st.stop()
    return found


def run_page(name: str, render: Callable[[Settings], None]) -> None:
    """Render a page body as a fragment that re-runs itself every ``refresh_s`` seconds (0: never)."""
    current = settings()

    def body() -> None:
        started = time.perf_counter()
        render(current)
        every = f"refreshes every {current.refresh_s:g} s" if current.refresh_s else "auto-refresh off"
        st.caption(f"Rendered {pd.Timestamp.now(tz='UTC'):%H:%M:%S} UTC in "
                   f"{(time.perf_counter() - started) * 1000:.0f} ms; {every}.")

    st.fragment(body, run_every=current.refresh_s or None, key=f"page-{name}")()


def empty_state(what: str, *commands: str) -> None:
    """A friendly note naming the command(s) that fill an empty part of the page."""
    st.info(f"{what}: run " + " and ".join(f"`{command}`" for command in commands) + ".")


# --- cached loaders (keyed by what was published) --------------------------------------------------------


@st.cache_data(max_entries=3, show_spinner="Reading the batch and speed views ...")
def _combined(views_dir: str, speed_dir: str, batch_version: str | None,
              speed_files: tuple[tuple[int, int, int], ...]) -> serving.Combined:
    return serving.combined_views(Path(views_dir), Path(speed_dir))


def combined(current: Settings) -> serving.Combined:
    """The Lambda merge (batch version + speed rows above its watermark), re-read only when either changed."""
    return _combined(str(current.views_dir), str(current.speed_dir), storage.current_version(current.views_dir),
                     data.speed_signature(current.speed_dir))


def statuses(current: Settings) -> list[dict[str, Any]]:
    return speed_view.read_statuses(current.speed_dir)


@st.cache_data(max_entries=8, show_spinner=False)
def model_metadata(model_dir: str, version: str) -> dict[str, Any]:
    return model.read_metadata(Path(model_dir), version)


@st.cache_data(max_entries=4, show_spinner="Reading the model's trees ...")
def model_importances(model_dir: str, version: str) -> pd.DataFrame | None:
    """Importances stored in the metadata ({feature: score}) if training recorded them, else from the trees."""
    stored = model.read_metadata(Path(model_dir), version).get("feature_importances")
    if stored:
        return data.importance_table(list(stored), list(stored.values()))
    loaded = model.load_model(Path(model_dir), version)
    return data.feature_importances(loaded.estimator, loaded.metadata["features"])


@st.cache_data(ttl=5, show_spinner=False)
def broker_reachable(bootstrap: str) -> bool:
    return kafka_local.is_reachable(bootstrap, timeout=1.0)


@st.cache_data(ttl=10, show_spinner=False)
def airflow_runs(airflow_home: str) -> pd.DataFrame | None:
    return data.airflow_runs(Path(airflow_home))


@st.cache_data(max_entries=4, show_spinner=False)
def _versions(views_dir: str, names: tuple[str, ...], current: str | None) -> pd.DataFrame:
    return data.versions(Path(views_dir))


def versions(current: Settings) -> pd.DataFrame:
    names = tuple(path.name for path in storage.version_dirs(current.views_dir))
    return _versions(str(current.views_dir), names, storage.current_version(current.views_dir))


# --- charts --------------------------------------------------------------------------------------------


def _layer_color() -> alt.Color:
    return alt.Color("layer:N", title="layer", scale=alt.Scale(domain=list(data.LAYERS), range=list(data.LAYER_COLORS)),
                     sort=list(data.LAYERS))


def stacked_bars(frame: pd.DataFrame, x: str, x_title: str, title: str) -> alt.Chart:
    """Trips per key, the batch part and the speed part stacked in their own colours."""
    return alt.Chart(frame, title=title).mark_bar().encode(
        x=alt.X(x, title=x_title),
        y=alt.Y("sum(trips):Q", title="trips", stack="zero"),
        color=_layer_color(),
        order=alt.Order("layer_order:Q"),
        tooltip=[alt.Tooltip(x.split(":")[0], title=x_title), "layer:N", alt.Tooltip("trips:Q", format=",")],
    ).transform_calculate(layer_order="datum.layer == 'batch' ? 0 : 1").properties(height=260)


def mean_with_spread(frame: pd.DataFrame, x: str, x_title: str, title: str) -> alt.LayerChart:
    """Mean trip duration (minutes) with a band of one standard deviation either side."""
    mean, std = frame["duration_s_mean"], frame["duration_s_std"]
    minutes = frame.assign(mean=mean / 60, low=(mean - std) / 60, high=(mean + std) / 60)
    base = alt.Chart(minutes, title=title).encode(x=alt.X(x, title=x_title))
    band = base.mark_area(opacity=0.25).encode(y=alt.Y("low:Q", title="minutes"), y2="high:Q")
    line = base.mark_line(point=True).encode(
        y="mean:Q", tooltip=[alt.Tooltip(x.split(":")[0], title=x_title), alt.Tooltip("mean:Q", format=".1f"),
                             alt.Tooltip("trips:Q", format=",")])
    return (band + line).properties(height=260)


def utc_time_axis(field: str, title: str = "time") -> alt.X:
    """A wall-clock x axis in UTC with 24-hour labels, saying so in its title.

    The frames hold naive UTC times; without ``type="utc"`` the browser would
    show them in its own time zone, and Vega's default labels are 12-hour
    ones without AM/PM.
    """
    return alt.X(f"{field}:T", title=f"{title} (UTC)", scale=alt.Scale(type="utc"),
                 axis=alt.Axis(format="%H:%M", labelOverlap=True))


def utc_tooltip(field: str, title: str = "time (UTC)") -> alt.Tooltip:
    """The time of a point as a 24-hour UTC time, to go with ``utc_time_axis``."""
    return alt.Tooltip(f"{field}:T", title=title, timeUnit="utcyearmonthdatehoursminutesseconds",
                       format="%Y-%m-%d %H:%M:%S")


def time_lines(frame: pd.DataFrame, y: str, color: str, title: str, y_title: str) -> alt.Chart:
    return alt.Chart(frame, title=title).mark_line(point=True).encode(
        x=utc_time_axis("time"), y=alt.Y(f"{y}:Q", title=y_title), color=f"{color}:N",
        tooltip=[utc_tooltip("time"), f"{color}:N", alt.Tooltip(f"{y}:Q", format=",.3f")]).properties(height=260)


def metric_value(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if value is None or pd.isna(value) else fmt.format(value)


# --- zones and boroughs ----------------------------------------------------------------------------

CITY = pdk.ViewState(latitude=40.70, longitude=-73.94, zoom=9.3, pitch=0)


def zone_map(collection: dict[str, Any], revenue: bool, layered: bool) -> pdk.Deck:
    """A choropleth of ``data.choropleth`` polygons, with no basemap (``map_provider=None``, as the
    density map: the zones draw the city and nothing is fetched). The tooltip names the zone, its
    trips and mean duration, its mean fare and total amount if ``revenue``, each part's trips if
    ``layered``."""
    layer = pdk.Layer("GeoJsonLayer", data=collection, get_fill_color="properties.fill_color",
                      get_line_color=[90, 90, 90, 160], line_width_min_pixels=0.5, stroked=True, filled=True,
                      pickable=True, auto_highlight=True)
    lines = ["{zone} ({borough})", "{trips} trips, mean {duration}"]
    lines += ["mean fare {fare}, total amount {revenue}"] if revenue else []
    lines += ["{layers}"] if layered else []
    return pdk.Deck(layers=[layer], initial_view_state=CITY, map_provider=None, tooltip={"text": "\n".join(lines)})


def zone_section(summary: pd.DataFrame, polygons: dict[str, Any], key: str, layered: bool = False) -> None:
    """A radio of the measures ``summary`` has (revenue only where recorded) and the zone map by it."""
    measures = data.zone_measures(summary)
    measure = st.radio("Colour the zones by", measures, horizontal=True, key=key)
    revenue = any(label in data.REVENUE_MEASURES for label in measures)
    st.pydeck_chart(zone_map(data.choropleth(polygons, summary, measure), revenue, layered), height=520)


def flow_section(flows: pd.DataFrame, title: str) -> None:
    """Borough-to-borough flows as a heatmap (trips, log colour) beside the table itself (its revenue
    columns left out where no trip recorded them)."""
    if flows.empty:
        st.info("No trips picked up in the chosen boroughs and dates.")
        return
    left, right = st.columns([2, 3])
    order = data.borough_choices()
    extra = [alt.Tooltip(f"{column}:Q", format=",") for column in flows.columns if column.endswith(" trips")]
    left.altair_chart(alt.Chart(flows, title=title).mark_rect().encode(
        x=alt.X("to:N", title="dropoff borough", sort=order, axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
        y=alt.Y("from:N", title="pickup borough", sort=order, axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("trips:Q", scale=alt.Scale(type="log", scheme="orangered")),
        tooltip=["from:N", "to:N", alt.Tooltip("trips:Q", format=","), *extra,
                 alt.Tooltip("mean duration (min):Q", format=".1f")]).properties(height=320), width="stretch")
    shown = flows.dropna(axis="columns", how="all")
    formats = {column: st.column_config.NumberColumn(format="$%.2f" if "USD" in column else "%.1f")
               for column in shown.columns if shown[column].dtype.kind == "f"}
    right.dataframe(shown, hide_index=True, column_config=formats)


def revenue_metrics(table: pd.DataFrame, where: str) -> None:
    """Fare, tip and total amount (sums and means) of ``data.revenue``, or a plain sentence that the
    sources recorded none (the Kaggle sample has no revenue fields)."""
    trips = int(table["trips"].iloc[0])
    if table["recorded by"].sum() == 0:
        st.info(f"No revenue to show: none of the {trips:,} trips {where} records a fare, tip or total "
                "amount. The Kaggle sample has no such fields; TLC trip records do "
                "(`python batch_processor.py import --cutoff none FILE`).")
        return
    for column, (_, row) in zip(st.columns(len(table)), table.iterrows()):
        total, mean = data.REVENUE_LABELS[row["field"]]
        column.metric(total, metric_value(row["sum USD"], "${:,.2f}"))
        column.metric(mean, metric_value(row["mean USD"], "${:,.2f}"))
    st.caption("Recorded by " + ", ".join(f"{row['field']} {row['recorded by']:,}" for _, row in table.iterrows())
               + f" of the {trips:,} trips {where}.")
