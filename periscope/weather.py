"""The day's weather at Central Park, a model feature known at pickup (it rains before you hail).

``data/central_park_weather.csv`` holds NOAA's daily GHCN record for Central
Park, 2009-01-01..2024-02-29 (provenance in data/README.md): precipitation
(PRCP), snowfall (SNOW) and snow depth (SNWD), in inches. It is read once per
process into arrays indexed by day, so a lookup is one numpy take for a whole
batch: cheap enough for the speed layers' hot path. A day outside the file
(before 2009, after February 2024, a simulated 2026 trip) or a value NOAA did
not record is NaN, which the model's trees treat as "weather unknown".
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from periscope.config import shipped_data

WEATHER_CSV = shipped_data("central_park_weather.csv")
COLUMNS = {"precipitation_in": "PRCP", "snowfall_in": "SNOW", "snow_depth_in": "SNWD"}
"""Our name -> NOAA's column."""


@lru_cache(maxsize=2)
def daily_table(path: Path = WEATHER_CSV) -> tuple[int, dict[str, np.ndarray]]:
    """(first day as days since 1970-01-01, each column as an array with one value per day)."""
    with path.open("rb") as handle:
        frame = pd.read_csv(handle, usecols=["DATE", *COLUMNS.values()])
    days = pd.to_datetime(frame["DATE"]).to_numpy().astype("datetime64[D]").astype(np.int64)
    first = int(days.min())
    columns = {}
    for name, source in COLUMNS.items():
        values = np.full(int(days.max()) - first + 1, np.nan)
        values[days - first] = pd.to_numeric(frame[source], errors="coerce")
        columns[name] = values
    return first, columns


def on_days(days: np.ndarray) -> dict[str, np.ndarray]:
    """The weather of each day (days since 1970-01-01, int64): one float64 array per column,
    NaN where the day is outside the table or the value was not recorded."""
    first, columns = daily_table()
    index = np.asarray(days, dtype=np.int64) - first
    known = (index >= 0) & (index < len(columns["precipitation_in"]))
    safe = np.where(known, index, 0)
    return {name: np.where(known, values[safe], np.nan) for name, values in columns.items()}
