"""Speed layer: the newest trips with predicted vs actual duration, throughput, latency, lag per partition."""
from __future__ import annotations

import altair as alt
import streamlit as st

from periscope.dashboard import data, ui

SCATTER_POINTS = 2000


def render(settings: ui.Settings) -> None:
    st.title("Speed layer")
    st.markdown("What the speed layer (`kafka_consumer.py` or `spark_streaming.py`) has made visible above the "
                "batch watermark: every trip validated, predicted and written within about a second.")
    rows = ui.combined(settings).speed_rows
    statuses = ui.statuses(settings)
    procs = data.consumers(statuses, data.now_ms())
    if rows.empty and procs.empty:
        ui.empty_state("No speed-layer trips and no speed-layer process yet", data.COMMANDS["consumer"],
                       data.COMMANDS["producer"])
        return

    latency = data.latency_ms(rows)
    alive = procs[procs["alive"]]
    cols = st.columns(5)
    cols[0].metric("Trips in the speed view", f"{len(rows):,}")
    cols[1].metric("Throughput now", ui.metric_value(alive["trips/s"].sum() if len(alive) else 0.0, "{:,.0f} trips/s"))
    cols[2].metric("Latency p50", ui.metric_value(latency.median() if len(rows) else None, "{:,.0f} ms"))
    cols[3].metric("Latency p99", ui.metric_value(latency.quantile(0.99) if len(rows) else None, "{:,.0f} ms"))
    cols[4].metric("Consumer lag", ui.metric_value(alive["lag"].fillna(0).sum() if len(alive) else None,
                                                    "{:,.0f} messages"))

    if rows.empty:
        ui.empty_state("No trips above the batch watermark yet (a batch run absorbs what the speed "
                       "layer saw)", data.COMMANDS["more trips"])
    else:
        st.subheader("Most recent trips")
        st.dataframe(data.recent_trips(rows), hide_index=True)
        left, right = st.columns(2)
        sample = rows.tail(SCATTER_POINTS)
        points = sample.assign(actual_min=sample["trip_duration"] / 60,
                               predicted_min=sample["predicted_duration_s"] / 60)
        limit = float(min(points[["actual_min", "predicted_min"]].quantile(0.99).max(), 180)) or 1.0
        scatter = alt.Chart(points, title=f"Predicted vs actual (last {len(points):,} trips)").mark_circle(
            size=14, opacity=0.4, color=data.LAYER_COLORS[1]).encode(
            x=alt.X("actual_min:Q", title="actual minutes", scale=alt.Scale(domain=[0, limit], clamp=True)),
            y=alt.Y("predicted_min:Q", title="predicted minutes", scale=alt.Scale(domain=[0, limit], clamp=True)),
            tooltip=["id:N", alt.Tooltip("actual_min:Q", format=".1f"), alt.Tooltip("predicted_min:Q", format=".1f")])
        diagonal = alt.Chart(alt.Data(values=[{"v": 0}, {"v": limit}])).mark_line(color="gray", strokeDash=[4, 4]) \
            .encode(x="v:Q", y="v:Q")
        left.altair_chart((scatter + diagonal).properties(height=300), width="stretch")
        flow = data.throughput(rows)
        right.altair_chart(alt.Chart(flow, title="Trips made visible per second (10 s bins)").mark_bar(
            color=data.LAYER_COLORS[1]).encode(x=ui.utc_time_axis("time"),
                                               y=alt.Y("trips_per_s:Q", title="trips/s")).properties(height=300),
                           width="stretch")
        lat = flow.melt("time", ["latency_p50_ms", "latency_p99_ms"], var_name="percentile", value_name="ms")
        st.altair_chart(ui.time_lines(lat, "ms", "percentile", "End-to-end latency (produced -> visible)", "ms"),
                        width="stretch")

    st.subheader("Speed-layer processes and lag per partition")
    if procs.empty:
        ui.empty_state("No status file from a speed-layer process", data.COMMANDS["consumer"])
        return
    st.dataframe(procs.drop(columns=["age_s"]), hide_index=True)
    lag = data.partition_lag(statuses)
    if not lag.empty:
        st.altair_chart(alt.Chart(lag, title="Lag per partition (messages behind the log end)").mark_bar().encode(
            x=alt.X("partition:O"), y=alt.Y("lag:Q"), color="consumer:N",
            tooltip=["consumer:N", "partition:O", "position:Q", "lag:Q"]).properties(height=220),
            width="stretch")


ui.run_page("speed", render)
