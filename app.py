"""The serving layer: a Streamlit dashboard that merges the batch and speed views.

In the Lambda architecture the batch layer is complete but late and the speed
layer is quick but covers only the newest trips. This app answers from both:
the current batch version plus every speed-layer trip above the batch
watermark (``periscope.serving.combined_views``, the one merge the tests
check), with the batch part and the speed part in their own colours. It reads
only published outputs (batch versions, speed files, status files, model
metadata, Airflow's database, read-only), never Kafka internals and never Spark.

Six pages, in the sidebar: Lambda view (the landing page), Speed layer, Batch
layer, Model, Data quality, Operations. Each page refreshes itself every few
seconds; its loaders are cached under the published version, so a refresh
re-reads only what changed. Pages with nothing to show yet say which command
fills them.

Run it (after ``make demo``, or any of the layers)::

    streamlit run app.py                     # http://localhost:8501 ; `make app` binds 127.0.0.1
    streamlit run app.py -- --views-dir /tmp/views --speed-dir /tmp/speed --refresh 5

Paths default to ``periscope.config`` (env ``PERISCOPE_VIEWS_DIR``,
``PERISCOPE_SPEED_DIR``, ``PERISCOPE_MODEL_DIR``, ``AIRFLOW_HOME``,
``KAFKA_BOOTSTRAP_SERVERS`` ...); the flags after ``--`` override them, and the
sidebar's "Data sources" override both for one browser session.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st

from periscope import config
from periscope.dashboard.ui import SETTINGS_KEY, Settings

HERE = Path(__file__).resolve().parent
PAGES_DIR = HERE / "periscope" / "dashboard" / "pages"
DEFAULT_REFRESH_S = 10.0
PATH_INPUTS: tuple[tuple[str, str], ...] = (("views_dir", "Batch views"), ("speed_dir", "Speed view"),
                                             ("model_dir", "Models"), ("airflow_home", "Airflow home"))
PAGES: tuple[tuple[str, str, str], ...] = (
    ("lambda_view.py", "Lambda view", ":material/merge_type:"),
    ("speed_layer.py", "Speed layer", ":material/bolt:"),
    ("batch_layer.py", "Batch layer", ":material/inventory_2:"),
    ("model_monitor.py", "Model", ":material/model_training:"),
    ("data_quality.py", "Data quality", ":material/rule:"),
    ("operations.py", "Operations", ":material/monitor_heart:"),
)


class ArgumentError(ValueError):
    """A wrong flag after ``--``: shown on the page instead of ending the server."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would call sys.exit inside the Streamlit server
        raise ArgumentError(f"{message}\n\n{self.format_usage()}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="streamlit run app.py --", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                    description="Periscope's dashboard: batch + speed views, merged.")
    parser.add_argument("--views-dir", type=Path, default=config.VIEWS_DIR,
                        help="published batch versions (env PERISCOPE_VIEWS_DIR)")
    parser.add_argument("--speed-dir", type=Path, default=config.SPEED_DIR,
                        help="speed view and status files (env PERISCOPE_SPEED_DIR)")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="trained model versions (env PERISCOPE_MODEL_DIR)")
    parser.add_argument("--airflow-home", type=Path, default=config.AIRFLOW_HOME,
                        help="Airflow home holding airflow.db (env AIRFLOW_HOME)")
    parser.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS,
                        help="Kafka bootstrap servers, for the health check (env KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--refresh", type=float, default=DEFAULT_REFRESH_S,
                        help="seconds between automatic refreshes of a page; 0 turns it off")
    args = parser.parse_args(argv)
    if args.refresh < 0:
        parser.error(f"--refresh must be 0 (off) or a positive number of seconds, got {args.refresh:g}")
    return args


def script_args() -> list[str]:
    """The flags after ``--`` of ``streamlit run app.py -- ...`` (none when another program runs this file)."""
    launched_as_app = Path(sys.argv[0]).resolve() == Path(__file__).resolve()
    return sys.argv[1:] if launched_as_app else []


def sidebar(args: argparse.Namespace) -> Settings:
    """Refresh interval and data sources: the CLI/env defaults, adjustable per browser session."""
    defaults = {"refresh_s": args.refresh, "bootstrap": args.bootstrap,
                **{name: str(getattr(args, name)) for name, _ in PATH_INPUTS}}
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    with st.sidebar:
        refresh = st.number_input("Auto-refresh every (s, 0 = off)", min_value=0.0, step=5.0, key="refresh_s")
        with st.expander("Data sources"):
            paths = {name: st.text_input(label, key=name) for name, label in PATH_INPUTS}
            bootstrap = st.text_input("Kafka bootstrap", key="bootstrap")
    return Settings(**{name: Path(value).expanduser() for name, value in paths.items()},
                    bootstrap=bootstrap, refresh_s=float(refresh))


def main() -> None:
    st.set_page_config(page_title="Periscope", page_icon="🚕", layout="wide")
    try:
        args = parse_args(script_args())
    except ArgumentError as error:
        st.error(f"Wrong arguments after `--`: {error}")
        st.stop()
    st.session_state[SETTINGS_KEY] = sidebar(args)
    pages = [st.Page(PAGES_DIR / file, title=title, icon=icon, default=index == 0)
             for index, (file, title, icon) in enumerate(PAGES)]
    navigation = st.navigation(pages)
    st.sidebar.caption("Periscope: NYC taxi trips through a Lambda architecture. "
                       "Blue = batch layer, orange = speed layer.")
    navigation.run()


if __name__ == "__main__":
    main()
