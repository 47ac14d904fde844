"""Data quality: dead letters by reason over time, duplicates and cleaning-rule counts, the schema, freshness."""
from __future__ import annotations

import altair as alt
import streamlit as st

from periscope import model
from periscope.dashboard import data, ui


def render(settings: ui.Settings) -> None:
    st.title("Data quality")
    st.markdown("Bad input is never dropped silently. The speed layer sends every message it cannot use to the "
                "dead-letter topic `taxi-trips-dlq` with its reason; the batch layer keeps every well-formed trip "
                "in the master dataset and counts, per cleaning rule, the trips it leaves out of the views. A trip "
                "that reached the master dataset twice (imported and also replayed, or re-sent by a restarted "
                "producer) is one trip: the batch layer counts its first copy and leaves the later ones out.")
    merged = ui.combined(settings)
    statuses = ui.statuses(settings)

    st.subheader("Dead letters (speed layer)")
    totals = data.dlq_totals(statuses)
    if not statuses:
        ui.empty_state("No speed-layer process has reported yet", data.COMMANDS["consumer"])
    elif totals.empty:
        st.success("No dead letters: every message so far was a valid trip.")
    else:
        over_time = data.dlq_over_time(statuses)
        left, right = st.columns([2, 1])
        if over_time.empty:
            left.info("This speed layer does not report dead letters per minute; the totals are on the right.")
        else:
            left.altair_chart(alt.Chart(over_time, title="Dead letters per minute, by reason").mark_bar().encode(
                x=ui.utc_time_axis("minute", "minute"), y=alt.Y("sum(dead_letters):Q", title="dead letters"),
                color=alt.Color("reason:N"), tooltip=[ui.utc_tooltip("minute", "minute (UTC)"), "reason:N", "dead_letters:Q"]).properties(height=260),
                width="stretch")
        right.metric("Dead letters since the processes started", f"{int(totals['dead_letters'].sum()):,}")
        right.dataframe(totals, hide_index=True)

    st.subheader("Duplicates and cleaning rules (last batch version)")
    if merged.batch_version is None:
        ui.empty_state("No batch version yet", data.COMMANDS["batch"])
    else:
        rules = data.cleaning_counts(merged.manifest)
        counts = merged.manifest.get("rows", {})
        duplicates = data.duplicates_removed(merged.manifest)
        copies, removed = st.columns(2)
        copies.metric(f"Duplicate copies removed in {merged.batch_version}",
                      "not counted" if duplicates is None else f"{duplicates:,}",
                      help=f"{counts.get('master', 0):,} rows in the master dataset hold "
                           f"{counts.get('distinct', counts.get('master', 0)):,} distinct trips (by trip id); "
                           "the first copy in source order counts" if duplicates is not None else
                           "this version was computed before the batch layer removed duplicates")
        removed.metric(f"Trips removed by the rules in {merged.batch_version}", f"{int(rules['removed'].sum()):,}",
                       help=f"{counts.get('distinct', counts.get('master', 0)):,} distinct trips, "
                            f"{counts.get('clean', 0):,} clean")
        left, right = st.columns([1, 2])
        left.altair_chart(alt.Chart(rules, title="Trips removed per rule").mark_bar(color=data.LAYER_COLORS[0]).encode(
            x=alt.X("removed:Q"), y=alt.Y("rule:N", sort=None, title=None),
            tooltip=["rule:N", "description:N", "removed:Q"]).properties(height=240), width="stretch")
        right.dataframe(rules, hide_index=True)

    st.subheader("Freshness")
    version = model.current_version(settings.model_dir)
    meta = ui.model_metadata(str(settings.model_dir), version) if version else None
    fresh = data.freshness(data.now_ms(), merged.manifest, data.last_speed_write_ms(settings.speed_dir), statuses, meta)
    st.dataframe(fresh, hide_index=True)

    st.subheader("The trip schema")
    st.caption("The Avro schema of the master dataset; messages on `taxi-trips` carry the same fields as JSON "
               "(times as 'YYYY-MM-DD HH:MM:SS', New York wall clock).")
    st.dataframe(data.schema_fields(), hide_index=True)


ui.run_page("quality", render)
