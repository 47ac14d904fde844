"""The serving layer's dashboard (``app.py``): pure data functions and one module per page.

``data.py`` turns published outputs (batch versions, speed files, status
files, model metadata, Airflow's database) into small tables and has no
Streamlit in it, so tests call it directly. ``ui.py`` holds the Streamlit
side shared by the pages: settings, cached loaders, charts, empty states.
``pages/`` holds one script per page, which ``app.py`` registers with
``st.navigation``.
"""
