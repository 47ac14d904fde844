"""Lambda view (landing page): batch view + speed view = the complete answer, each part in its colour."""
from __future__ import annotations

import streamlit as st

from periscope import zones
from periscope.dashboard import data, ui

EXPLANATION = """
**What is being merged.** The *batch layer* recomputes every view from all stored trips now and then;
its result is complete but only up to a point in the stream, its **watermark** (per Kafka partition,
the last offset it has read). The *speed layer* handles each trip within a second of its arrival. This
page adds the two: the batch version, plus the speed layer's trips **above** the watermark. Trips at or
below it are already in the batch view, so nothing is missing. A trip is a *fact with an identity*, its
id: if the same trip reached the system twice (a file imported and also replayed, a producer restarted
after a crash), the batch layer counts its first copy only, and a speed row whose trip the batch version
or an earlier speed row already holds is left out, so nothing counts twice. When the next batch version
is published, the watermark moves up, the orange part shrinks into the blue part, and the totals stay
the same. Every view holds counts, sums and sums of squares, so the sum is exact, and the
averages and spreads below are computed from the merged sums.
"""


def minutes(seconds: float | None) -> str:
    return ui.metric_value(None if seconds is None else seconds / 60, "{:.1f} min")


def render(settings: ui.Settings) -> None:
    st.title("Lambda view: batch + speed")
    merged = ui.combined(settings)
    cover = data.coverage(merged)
    with st.expander("What is being merged?", expanded=True):
        st.markdown(EXPLANATION)
    if cover.batch_version is None and cover.speed_trips == 0:
        ui.empty_state("No batch version and no speed-layer trips yet", data.COMMANDS["batch"])
        ui.empty_state("For live trips on top", data.COMMANDS["consumer"], data.COMMANDS["producer"])
        return
    st.markdown(data.coverage_sentence(cover))
    if cover.batch_version is None:
        ui.empty_state("Only the speed layer has data; for the history", data.COMMANDS["batch"])
    elif cover.speed_trips == 0:
        ui.empty_state("Only the batch layer has data: every trip the speed layer saw is at or below the "
                       "watermark. For more live trips on top (once the replay has sent them all, "
                       "`--loop` sends them again under new ids)", data.COMMANDS["consumer"],
                       data.COMMANDS["more trips"])

    total = data.overall(merged.views["daily_summary"])
    cols = st.columns(5)
    cols[0].metric("Trips (batch + speed)", f"{total['trips']:,}")
    cols[1].metric("Batch trips", f"{cover.batch_trips:,}")
    cols[2].metric("Speed trips above the watermark", f"{cover.speed_trips:,}")
    cols[3].metric("Mean duration", minutes(total["duration_mean_s"]))
    cols[4].metric("Spread (std)", minutes(total["duration_std_s"]))

    left, right = st.columns(2)
    by_day = data.layered(merged.batch_views["daily_summary"], merged.speed_views["daily_summary"], ["pickup_date"])
    left.altair_chart(ui.stacked_bars(by_day, "pickup_date:T", "pickup day", "Trips by day"), width="stretch")
    by_hour = data.layered(merged.batch_views["hourly_stats"], merged.speed_views["hourly_stats"], ["pickup_hour"])
    right.altair_chart(ui.stacked_bars(by_hour, "pickup_hour:O", "pickup hour", "Trips by hour of day"),
                       width="stretch")

    left, right = st.columns(2)
    daily = data.describe(merged.views["daily_summary"], ["pickup_date"])
    left.altair_chart(ui.mean_with_spread(daily, "pickup_date:T", "pickup day", "Duration by day: mean ± 1 std"),
                      width="stretch")
    hourly = data.describe(merged.views["hourly_stats"], ["pickup_hour"])
    right.altair_chart(ui.mean_with_spread(hourly, "pickup_hour:O", "pickup hour",
                                           "Duration by hour of day: mean ± 1 std"), width="stretch")

    st.subheader("Zones and boroughs: batch + speed")
    boroughs = data.borough_choices()
    parts = dict(zip(data.LAYERS, (merged.batch_views["zone_daily"], merged.speed_views["zone_daily"])))
    summary = data.zone_summary(merged.views["zone_daily"], zones.zone_table(), boroughs, parts)
    st.caption("Each zone is coloured by the merged view (batch version + speed rows above the watermark); its "
               f"tooltip splits its trips into the batch part and the speed part ({summary['batch_trips'].sum():,} "
               f"batch, {summary['speed_trips'].sum():,} speed in all). So does the flow table, per pair of "
               "boroughs.")
    ui.revenue_metrics(data.revenue(summary), "in the merged view")
    ui.zone_section(summary, zones.zone_geojson(), key="lambda_zone_measure", layered=True)
    flow_parts = dict(zip(data.LAYERS, (merged.batch_views["borough_flows"], merged.speed_views["borough_flows"])))
    ui.flow_section(data.borough_flows(merged.views["borough_flows"], boroughs, flow_parts),
                    "Trips from borough to borough (batch + speed)")

    with st.expander("The merged hourly view (per pickup hour of day)"):
        table = hourly[["pickup_hour", "trips", "duration_s_mean", "duration_s_std", "distance_m_mean"]]
        st.dataframe(table.rename(columns={"duration_s_mean": "mean s", "duration_s_std": "std s",
                                           "distance_m_mean": "mean distance m"}).round(1), hide_index=True)


ui.run_page("lambda", render)
