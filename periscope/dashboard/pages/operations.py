"""Operations: a light per component with the command that fixes a red one, batch versions, Airflow runs."""
from __future__ import annotations

import streamlit as st

from periscope import model, storage
from periscope.dashboard import data, ui


def render(settings: ui.Settings) -> None:
    st.title("Operations")
    merged = ui.combined(settings)
    statuses = ui.statuses(settings)
    runs = ui.airflow_runs(str(settings.airflow_home))
    lights = data.health(data.now_ms(), ui.broker_reachable(settings.bootstrap), settings.bootstrap, statuses,
                         data.last_speed_write_ms(settings.speed_dir), merged.batch_version, merged.manifest,
                         model.current_version(settings.model_dir), runs)

    st.subheader("Health")
    for light in lights.itertuples():
        icon = ":green[●]" if light.ok else ":red[●]"
        fix = "" if light.ok else f" — fix: `{light.fix}`"
        st.markdown(f"{icon} **{light.component}**: {light.detail}{fix}")

    st.subheader("Batch versions")
    kept = ui.versions(settings)
    if kept.empty:
        ui.empty_state(f"No batch version in {settings.views_dir} yet", data.COMMANDS["batch"])
    else:
        st.dataframe(kept, hide_index=True)
        chosen = st.selectbox("Manifest of", list(kept["version"]), key="manifest_version")
        with st.expander(f"manifest.json of {chosen}"):
            st.json(storage.read_json(settings.views_dir / chosen / storage.MANIFEST), expanded=1)

    st.subheader("Airflow: last DAG runs")
    if runs is None:
        ui.empty_state(f"No Airflow database in {settings.airflow_home} yet", data.COMMANDS["airflow"])
    elif runs.empty:
        st.info("Airflow has not run a DAG yet: trigger one in its UI (http://127.0.0.1:8080) or wait for the "
                "schedule.")
    else:
        st.markdown("Last run of each DAG")
        st.dataframe(data.last_run_per_dag(runs), hide_index=True)
        with st.expander(f"The {len(runs)} most recent runs"):
            st.dataframe(runs, hide_index=True)


ui.run_page("operations", render)
