"""The one loader for trip files in the Kaggle CSV layout (plain or gzip).

It turns a CSV into a *trip frame*: a pandas DataFrame with the schema's
eleven columns in record form (times as int64 milliseconds of New York wall
clock, ``store_and_fwd_flag`` as bool). Nothing is dropped silently:

* a row that cannot be parsed (bad date, text in a numeric field, missing
  value, wrong number of fields) is counted under its reason, and the first
  few are kept as examples with their line numbers;
* with ``clean=True`` the cleaning rules of ``periscope.schema`` are applied
  and every rejection is counted under the first rule it breaks.

Parsing is vectorised (pandas) so a 10-million-row file streams through in
chunks; the reasons match ``schema.parse_fields`` field by field, which the
tests check row by row.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from periscope.schema import FIELDS, FLOAT_FIELDS, INT_FIELDS, RULES, TIME_FIELDS, TIME_FORMAT, first_broken_rule

DEFAULT_CHUNK_ROWS = 250_000
MAX_EXAMPLES = 5


class CsvLayoutError(ValueError):
    """The file is not in the Kaggle layout; the message names what is missing."""


@dataclass
class LoadReport:
    """What happened to every row of a source, for logs and manifests."""

    source: str
    rows_read: int = 0
    malformed: Counter = field(default_factory=Counter)
    broken_rules: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def rows_malformed(self) -> int:
        return sum(self.malformed.values())

    @property
    def rows_valid(self) -> int:
        return self.rows_read - self.rows_malformed

    @property
    def rows_clean(self) -> int:
        return self.rows_valid - sum(self.broken_rules.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_malformed": self.rows_malformed,
            "malformed": dict(sorted(self.malformed.items())),
            "broken_rules": {rule.name: self.broken_rules.get(rule.name, 0) for rule in RULES},
            "examples": self.examples,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines: totals first, then one line per non-zero count."""
        lines = [f"{self.source}: {self.rows_read:,} rows read, {self.rows_malformed:,} malformed"]
        lines += [f"  malformed  {reason:<30} {count:>9,}" for reason, count in sorted(self.malformed.items())]
        if self.broken_rules:
            lines.append(f"  cleaning rules removed {sum(self.broken_rules.values()):,} rows, kept {self.rows_clean:,}")
            lines += [
                f"  rule       {rule.name:<30} {self.broken_rules[rule.name]:>9,}"
                for rule in RULES
                if self.broken_rules.get(rule.name)
            ]
        lines += [f"  e.g. {example}" for example in self.examples]
        return lines


def check_header(path: Path) -> None:
    """Fail early, naming the missing columns, if ``path`` is not in the Kaggle layout."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    columns = pd.read_csv(path, nrows=0).columns
    missing = [name for name in FIELDS if name not in columns]
    if missing:
        raise CsvLayoutError(
            f"{path} is missing column(s) {', '.join(missing)}; "
            f"expected the Kaggle layout: {','.join(FIELDS)}"
        )


def _parse_chunk(raw: pd.DataFrame, lines: np.ndarray, report: LoadReport) -> pd.DataFrame:
    """Text columns to record form; malformed rows counted, then removed."""
    n = len(raw)
    reason = np.full(n, "", dtype=object)
    culprit = np.full(n, "", dtype=object)

    def flag(bad: np.ndarray, code: str, name: str) -> None:
        new = bad & (reason == "")
        reason[new] = code
        culprit[new] = name

    columns: dict[str, pd.Series] = {}
    for name in FIELDS:
        text = raw[name]
        empty = (text.isna() | (text.str.strip() == "")).to_numpy()
        flag(empty, "missing_value", name)
        if name in TIME_FIELDS:
            moment = pd.to_datetime(text, format=TIME_FORMAT, errors="coerce")
            flag(moment.isna().to_numpy(), "bad_datetime", name)
            columns[name] = moment.to_numpy(dtype="datetime64[ms]").astype(np.int64)
        elif name in INT_FIELDS or name in FLOAT_FIELDS:
            number = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(number)
            number[~bad] = text[~bad].astype(np.float64)  # exactly float(text), as schema.parse_fields
            if name in INT_FIELDS:
                with np.errstate(invalid="ignore"):
                    bad |= (number != np.round(number)) | (np.abs(number) >= 2**31)
            flag(bad, "wrong_type", name)
            columns[name] = np.where(bad, 0, number).astype(np.int64) if name in INT_FIELDS else number
        elif name == "store_and_fwd_flag":
            flag(~text.isin(["Y", "N"]).to_numpy(), "wrong_type", name)
            columns[name] = (text == "Y").to_numpy()
        else:
            columns[name] = text.str.strip().to_numpy(dtype=object)

    bad_rows = np.flatnonzero(reason != "")
    report.malformed.update(reason[bad_rows])
    for row in bad_rows[: max(0, MAX_EXAMPLES - len(report.examples))]:
        report.examples.append(f"line {lines[row]}: {reason[row]} in {culprit[row]}")
    frame = pd.DataFrame(columns, index=raw.index)
    return frame[reason == ""].reset_index(drop=True)


def apply_rules(frame: pd.DataFrame, report: LoadReport | None = None) -> pd.DataFrame:
    """Keep the trips that pass every cleaning rule, counting the others."""
    broken = first_broken_rule({name: frame[name].to_numpy() for name in FIELDS[1:]})
    if report is not None:
        for index, count in zip(*np.unique(broken[broken >= 0], return_counts=True)):
            report.broken_rules[RULES[index].name] += int(count)
    return frame[broken < 0].reset_index(drop=True)


def iter_trip_chunks(
    path: Path, report: LoadReport, *, clean: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """Stream a Kaggle CSV as trip frames of at most ``chunk_rows`` rows.

    ``report`` is updated as chunks are produced, so it is complete once the
    iterator is exhausted. Memory stays bounded by the chunk size.
    """
    path = Path(path)
    check_header(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=chunk_rows, on_bad_lines="warn")
        next_line, seen = 2, 0
        for raw in reader:
            skipped = _skipped_lines(caught[seen:])
            seen = len(caught)
            _count_skipped(skipped, report)
            lines = _line_numbers(next_line, len(raw), skipped)
            next_line = int(lines[-1]) + 1 if len(lines) else next_line + len(skipped)
            report.rows_read += len(raw)
            frame = _parse_chunk(raw, lines, report)
            yield apply_rules(frame, report) if clean else frame
        _count_skipped(_skipped_lines(caught[seen:]), report)


def _skipped_lines(caught: list) -> list[int]:
    """Line numbers pandas reported as skipped for a wrong number of fields."""
    found = re.findall(r"Skipping line (\d+)", "\n".join(str(w.message) for w in caught))
    return sorted(int(line) for line in found)


def _count_skipped(skipped: list[int], report: LoadReport) -> None:
    if skipped:
        report.rows_read += len(skipped)
        report.malformed["wrong_field_count"] += len(skipped)
        room = max(0, MAX_EXAMPLES - len(report.examples))
        report.examples.extend(f"line {line}: wrong_field_count" for line in skipped[:room])


def _line_numbers(first_line: int, rows: int, skipped: list[int]) -> np.ndarray:
    """File line number of each parsed row, stepping over the skipped ones."""
    candidates = np.arange(first_line, first_line + rows + len(skipped))
    return candidates[~np.isin(candidates, skipped)][:rows]


def read_trips(path: Path, *, clean: bool = False) -> tuple[pd.DataFrame, LoadReport]:
    """The whole file as one trip frame plus its report (for files that fit in memory)."""
    report = LoadReport(source=str(path))
    chunks = list(iter_trip_chunks(Path(path), report, clean=clean))
    frame = pd.concat(chunks, ignore_index=True) if chunks else empty_trip_frame()
    return frame, report


def empty_trip_frame() -> pd.DataFrame:
    """A zero-row trip frame with the record-form dtypes."""
    dtypes = {name: np.int64 for name in INT_FIELDS + TIME_FIELDS}
    dtypes.update({name: np.float64 for name in FLOAT_FIELDS})
    dtypes.update({"id": object, "store_and_fwd_flag": bool})
    return pd.DataFrame({name: pd.Series(dtype=dtypes[name]) for name in FIELDS})


def read_trips_parquet(path: Path) -> tuple[pd.DataFrame, LoadReport]:
    """A Parquet file with the Kaggle columns as one trip frame plus its report.

    Parquet has types where the CSV has text: times may be strings or
    timestamps, ``store_and_fwd_flag`` ``"Y"``/``"N"`` or a boolean, nulls are
    real nulls. Each column is first written as the Kaggle text it stands for
    and then parsed exactly like a CSV chunk, so a Parquet row is accepted or
    rejected, and counted under the same reason, as the same row in a CSV
    would be (a timestamp with a fraction of a second is a ``bad_datetime``,
    as Kaggle times are whole seconds). Examples name rows counted from 1.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    missing = [name for name in FIELDS if name not in pq.read_schema(path).names]
    if missing:
        raise CsvLayoutError(
            f"{path} is missing column(s) {', '.join(missing)}; "
            f"expected the Kaggle layout: {','.join(FIELDS)}"
        )
    raw = pd.read_parquet(path, columns=list(FIELDS))
    text = pd.DataFrame({name: _kaggle_text(raw[name]) for name in FIELDS}, index=raw.index)
    report = LoadReport(source=str(path), rows_read=len(raw))
    frame = _parse_chunk(text, np.arange(1, len(raw) + 1), report)
    return (frame if len(frame) else empty_trip_frame()), report


def _kaggle_text(column: pd.Series) -> pd.Series:
    """A typed Parquet column as the text a Kaggle CSV would hold ("" for null)."""
    missing = column.isna().to_numpy()
    if pd.api.types.is_datetime64_any_dtype(column):
        if getattr(column.dt, "tz", None) is not None:
            column = column.dt.tz_localize(None)  # keep the wall-clock time the data was written in
        moments = column.to_numpy(dtype="datetime64[ms]")
        whole = moments.astype(np.int64) % 1000 == 0
        text = np.where(whole, np.datetime_as_string(moments, unit="s"), np.datetime_as_string(moments, unit="ms"))
        values = np.char.replace(text.astype(str), "T", " ").astype(object)
    elif pd.api.types.is_bool_dtype(column):
        values = np.where(column.to_numpy(dtype=bool, na_value=False), "Y", "N").astype(object)
    elif pd.api.types.is_numeric_dtype(column):
        values = column.astype(str).to_numpy(dtype=object)
    else:
        values = np.array(["Y" if v is True else "N" if v is False else str(v) for v in column.tolist()], dtype=object)
    values[missing] = ""
    return pd.Series(values, index=column.index, dtype=object)
