"""Model: metadata and hold-out metrics, live error from the speed layer, residuals, importances, drift."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from periscope import model
from periscope.dashboard import data, ui


def render(settings: ui.Settings) -> None:
    st.title("Model")
    version = model.current_version(settings.model_dir)
    if version is None:
        ui.empty_state(f"No trained model in {settings.model_dir} yet", data.COMMANDS["model"])
        return
    meta = ui.model_metadata(str(settings.model_dir), version)
    holdout = meta.get("holdout_metrics") or {}
    training = meta.get("training_data", {})
    trees = f"{meta['trees']} trees, " if meta.get("trees") else ""
    st.markdown(f"Live model **{version}**: {meta.get('model', '?')}, {len(meta.get('features', []))} features, "
                f"{trees}trained {meta.get('trained_at', '?')} on "
                f"{training.get('train_rows', 0):,} trips ({training.get('split', '?')} split, "
                f"{training.get('holdout_rows', 0):,} held out). Target: {meta.get('target', '?')}.")

    rows = ui.combined(settings).speed_rows
    live = data.live_error(rows)
    drift = data.drift(holdout, live)
    cols = st.columns(4)
    cols[0].metric("Hold-out RMSLE (clean trips)", ui.metric_value(holdout.get("rmsle_clean"), "{:.3f}"))
    cols[1].metric("Live RMSLE", ui.metric_value(live["rmsle"] if live["rows"] else None, "{:.3f}"),
                   delta=None if drift["ratio"] is None else f"{(drift['ratio'] - 1) * 100:+.0f} % vs hold-out",
                   delta_color="inverse")
    cols[2].metric("Live MAE", ui.metric_value(live["mae"] if live["rows"] else None, "{:,.0f} s"))
    cols[3].metric("Trips scored live", f"{live['rows']:,}")
    if drift["drifting"]:
        st.warning(f"Live RMSLE is {drift['ratio']:.2f}× the hold-out RMSLE: the stream no longer looks like the "
                   f"training data (a replay with --retime does this on purpose). Retrain on recent trips: "
                   f"`{data.COMMANDS['model']}`.")
    elif drift["drifting"] is False:
        st.success(f"No drift: live RMSLE is {drift['ratio']:.2f}× the hold-out RMSLE "
                   f"(warning above {data.DRIFT_WARN_RATIO:.1f}×).")

    st.subheader("Hold-out metrics")
    st.dataframe(data.holdout_table(holdout).round(3), hide_index=True)

    if rows.empty:
        ui.empty_state("No live predictions to score yet", data.COMMANDS["consumer"], data.COMMANDS["producer"])
    else:
        over_time = data.live_error_over_time(rows)
        reference = pd.DataFrame([{"metric": name.upper(), "value": (drift.get(name) or {}).get("holdout")}
                                  for name in ("mae", "rmse", "rmsle")])
        charts = st.columns(2)
        for column, names, unit in ((charts[0], ["RMSLE"], ""), (charts[1], ["MAE", "RMSE"], " (s)")):
            part = over_time[over_time["metric"].isin(names)]
            lines = ui.time_lines(part, "value", "metric", f"Live {' and '.join(names)} per minute", "error" + unit)
            rules = alt.Chart(reference[reference["metric"].isin(names)]).mark_rule(strokeDash=[6, 4]).encode(
                y="value:Q", color="metric:N", tooltip=["metric:N", alt.Tooltip("value:Q", format=",.3f")])
            column.altair_chart(lines + rules, width="stretch")
        st.caption("Dashed: the same metric on the hold-out trips that pass the cleaning rules (the speed layer "
                   "scores only those).")

    left, right = st.columns(2)
    if not rows.empty:
        residual = data.residuals(rows)
        left.altair_chart(alt.Chart(residual, title="Residuals: log(1 + predicted) − log(1 + actual)").mark_bar(
            color=data.LAYER_COLORS[1]).encode(x=alt.X("log_residual:Q", bin=alt.Bin(maxbins=60), title="log residual"),
                                               y=alt.Y("count():Q", title="trips")).properties(height=300),
                          width="stretch")
    importances = ui.model_importances(str(settings.model_dir), version)
    if importances is None:
        right.info("This kind of model does not record feature importances.")
    else:
        right.altair_chart(alt.Chart(importances, title="Feature importances (share of split gain)").mark_bar()
                           .encode(x=alt.X("importance:Q", axis=alt.Axis(format="%")),
                                   y=alt.Y("feature:N", sort="-x", title=None)).properties(height=380),
                           width="stretch")

    with st.expander("Model versions and full metadata"):
        st.write(", ".join(f"**{v}**" if v == version else v for v in model.list_versions(settings.model_dir)))
        st.json(meta, expanded=False)


ui.run_page("model", render)
