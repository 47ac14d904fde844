"""Batch layer: the current batch version's views, an hour-of-week heatmap, a pickup-density map, a zone
choropleth, borough-to-borough flows and revenue."""
from __future__ import annotations

import altair as alt
import pydeck as pdk
import streamlit as st

from periscope import zones
from periscope.dashboard import data, ui

NYC = pdk.ViewState(latitude=40.745, longitude=-73.965, zoom=10.3, pitch=0)


def density_map(cells) -> pdk.Deck:
    """Pickup density without a basemap: the grid cells alone draw Manhattan's shape, and nothing is fetched.

    ``map_provider=None`` with pydeck's default ``map_style`` is the combination Streamlit leaves
    tile-less (``map_style=None`` would make it fetch a Carto basemap, unreachable offline).
    """
    layer = pdk.Layer("ScatterplotLayer", data=cells, get_position=["longitude", "latitude"], get_fill_color="color",
                      get_radius="radius", pickable=True, stroked=False)
    return pdk.Deck(layers=[layer], initial_view_state=NYC, map_provider=None,
                    tooltip={"text": "{trips} pickups\nmean {duration_s_mean} s"})


def render(settings: ui.Settings) -> None:
    st.title("Batch layer")
    merged = ui.combined(settings)
    if merged.batch_version is None:
        ui.empty_state(f"No batch version in {settings.views_dir} yet", data.COMMANDS["batch"])
        return
    batch, manifest = merged.batch_views, merged.manifest
    st.markdown(f"Version **{merged.batch_version}**, published {manifest.get('created_at', '?')} by the "
                f"{manifest.get('engine', '?')} engine: {manifest['rows']['clean']:,} clean trips of "
                f"{manifest['rows']['master']:,} in the master dataset; watermark "
                f"{data.watermark_text(merged.watermark)}. Recomputed from all of the master data, every time.")

    daily_all = batch["daily_summary"]
    first, last = daily_all["pickup_date"].min().date(), daily_all["pickup_date"].max().date()
    vendors = sorted(int(v) for v in batch["vendor_stats"]["vendor_id"])
    left, middle, right = st.columns([2, 1, 2])
    picked = left.date_input("Pickup dates", value=(first, last), min_value=first, max_value=last, key="batch_dates")
    start, end = (picked[0], picked[-1]) if isinstance(picked, (tuple, list)) and picked else (first, last)
    chosen = middle.multiselect("Vendors", vendors, default=vendors, key="batch_vendors")
    boroughs = right.multiselect("Pickup boroughs", data.borough_choices(), default=data.borough_choices(),
                                 key="batch_boroughs")
    st.caption("Each batch view is keyed by a few things (date, hour of week, vendor, cell, zone, borough), as the "
               "batch layer publishes them: the date range filters the daily, hourly, zone and flow views, the "
               "vendor choice the vendor view, the pickup boroughs the zone map, the flows and the revenue.")

    daily = data.describe(data.between_dates(daily_all, start, end), ["pickup_date"])
    hourly = data.describe(data.between_dates(batch["hourly_stats"], start, end), ["pickup_hour"])
    vendor = data.describe(batch["vendor_stats"][batch["vendor_stats"]["vendor_id"].isin(chosen)], ["vendor_id"])
    cols = st.columns(3)
    cols[0].metric("Trips in the date range", f"{int(daily['trips'].sum()):,}")
    cols[1].metric("Days", f"{len(daily):,}")
    cols[2].metric("Trips of the chosen vendors", f"{int(vendor['trips'].sum()):,}")

    left, right = st.columns(2)
    left.altair_chart(alt.Chart(daily, title="Trips per day").mark_bar(color=data.LAYER_COLORS[0]).encode(
        x=alt.X("pickup_date:T", title="pickup day"), y=alt.Y("trips:Q"),
        tooltip=["pickup_date:T", alt.Tooltip("trips:Q", format=",")]).properties(height=260), width="stretch")
    right.altair_chart(ui.mean_with_spread(hourly, "pickup_hour:O", "pickup hour",
                                           "Duration by hour of day: mean ± 1 std"), width="stretch")

    left, right = st.columns(2)
    week = data.hour_of_week(batch["hour_of_week"])
    measure = left.radio("Heatmap of", ["trips", "mean duration (s)"], horizontal=True, key="heatmap_measure")
    field = "trips:Q" if measure == "trips" else "duration_s_mean:Q"
    left.altair_chart(alt.Chart(week, title="Hour of week").mark_rect().encode(
        x=alt.X("pickup_hour:O", title="hour"), y=alt.Y("weekday:O", sort=list(data.WEEKDAYS), title=None),
        color=alt.Color(field, title=measure, scale=alt.Scale(scheme="blues")),
        tooltip=["weekday:O", "pickup_hour:O", alt.Tooltip("trips:Q", format=","),
                 alt.Tooltip("duration_s_mean:Q", format=".0f")]).properties(height=260), width="stretch")
    right.dataframe(vendor[["vendor_id", "trips", "duration_s_mean", "duration_s_std", "distance_m_mean"]]
                    .rename(columns={"duration_s_mean": "mean s", "duration_s_std": "std s",
                                     "distance_m_mean": "mean distance m"}).round(1), hide_index=True)
    bands = data.describe(batch["distance_bands"], ["distance_band"])
    right.altair_chart(alt.Chart(bands, title="Trips by straight-line distance").mark_bar(
        color=data.LAYER_COLORS[0]).encode(x=alt.X("distance_band_label:N", sort=None, title=None), y="trips:Q")
        .properties(height=180), width="stretch")

    st.subheader("Pickup density")
    cells = data.map_cells(batch["pickup_grid"])
    st.caption(f"{len(cells):,} grid cells of about 560 × 420 m; colour and size grow with the number of pickups. "
               "No basemap: the cells alone draw the city.")
    st.pydeck_chart(density_map(cells), height=480)

    st.subheader("Zones and boroughs")
    summary = data.zone_summary(data.between_dates(batch["zone_daily"], start, end), zones.zone_table(), boroughs)
    flows = data.borough_flows(data.between_dates(batch["borough_flows"], start, end), boroughs)
    where = "picked up in the chosen boroughs and dates"
    unzoned = int(summary.loc[summary["borough"] == zones.BOROUGHS[0], "trips"].sum())
    st.metric(f"Trips {where}", f"{int(summary['trips'].sum()):,}")
    ui.revenue_metrics(data.revenue(summary), where)
    unzoned_text = (f" {unzoned:,} trips have no pickup zone (outside every zone, or an unknown one): counted "
                    "in the flows, not on the map." if unzoned else "")
    st.caption("The TLC's taxi zones of the chosen boroughs, each coloured by the chosen measure of the trips "
               f"picked up in it; grey: no trip, or no value to colour by.{unzoned_text}")
    ui.zone_section(summary, zones.zone_geojson(), key="batch_zone_measure")
    ui.flow_section(flows, "Trips from borough to borough")


ui.run_page("batch", render)
