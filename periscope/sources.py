"""The one loader for trip files: the Kaggle layout (the default) and the TLC trip records.

It turns a file into *trip frames*: pandas DataFrames in record form (times
as int64 milliseconds of New York wall clock). A Kaggle file gives the
schema's eleven ``FIELDS`` (``store_and_fwd_flag`` as bool); a TLC file
(``periscope.tlc``: every yellow and green layout since 2009, CSV or Parquet)
gives ``TRIP_FIELDS``, with what the source did not record as
``NOT_RECORDED`` or NaN. Nothing is dropped silently:

* the file itself is checked first (``open_source``): missing, empty, binary,
  a gzip stream cut short, a ``.parquet`` that is not Parquet, an unknown or
  refused layout, a header without rows: each is a ``TripFileError`` naming
  the file and the problem, which every command prints as one line (exit 2);
* a row that cannot be parsed (bad date, text in a numeric field, missing
  value, wrong number of fields, a line cut part-way) is counted under its
  reason, and the first few are kept as examples with their line numbers;
* with ``clean=True`` the cleaning rules of ``periscope.schema`` are applied
  and every rejection is counted under the first rule it breaks.

The layout is recognised from the header, the format from the content (gzip
and Parquet by their magic bytes), not from the file name. Parsing is
vectorised (pandas) so a 10-million-row file streams through in chunks; the
Kaggle reasons match ``schema.parse_fields`` field by field, which the tests
check row by row. Commands that take only the Kaggle layout (``read_trips``
by default: the DAGs) refuse a TLC file by name.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from periscope import tlc
from periscope.schema import FIELDS, FLOAT_FIELDS, INT_FIELDS, RULES, TIME_FIELDS, TIME_FORMAT, first_broken_rule

DEFAULT_CHUNK_ROWS = 250_000
MAX_EXAMPLES = 5
PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"
_SNIFF_BYTES = 1 << 16


class TripFileError(ValueError):
    """A file that cannot be read as trips; the message names the file, the problem and what to do."""


CsvLayoutError = TripFileError
"""The name callers catch (the producer, ``train_model.py``): every ``TripFileError``."""


@dataclass
class LoadReport:
    """What happened to every row of a source, for logs and manifests."""

    source: str
    rows_read: int = 0
    malformed: Counter = field(default_factory=Counter)
    broken_rules: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    layout: str = tlc.KAGGLE

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
            "layout": self.layout,
            "rows_read": self.rows_read,
            "rows_malformed": self.rows_malformed,
            "malformed": dict(sorted(self.malformed.items())),
            "broken_rules": {rule.name: self.broken_rules.get(rule.name, 0) for rule in RULES},
            "examples": self.examples,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines: totals first, then one line per non-zero count."""
        layout = "" if self.layout == tlc.KAGGLE else f" ({self.layout} layout)"
        lines = [f"{self.source}{layout}: {self.rows_read:,} rows read, {self.rows_malformed:,} malformed"]
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


# --- the file: what it is, and whether it can hold trips ------------------------------------------


@dataclass(frozen=True)
class Source:
    """A trip file checked and recognised: its format, its header and its layout."""

    path: Path
    parquet: bool
    compression: str | None
    header: list[str]
    layout: tlc.Layout

    @property
    def columns(self) -> dict[str, str]:
        """Trip field -> this file's column holding it."""
        return tlc.source_columns(self.layout, self.header)


_WHAT_TO_GIVE = "give a trip file: Kaggle-layout or TLC CSV (plain or gzip), or TLC Parquet"


def _sniff(path: Path) -> tuple[bool, str | None]:
    """(is Parquet, CSV compression) from the content; a ``TripFileError`` for what holds no text."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise TripFileError(f"{path} is a directory; {_WHAT_TO_GIVE}")
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if not head:
        raise TripFileError(f"{path} is empty (0 bytes); {_WHAT_TO_GIVE}")
    named_parquet = path.suffix.lower() in (".parquet", ".pq")
    if head.startswith(PARQUET_MAGIC):
        return True, None
    if named_parquet:
        raise TripFileError(f"{path} is named .parquet but is not a Parquet file (it does not start with "
                            f"PAR1); {_WHAT_TO_GIVE}")
    compression = None
    if head.startswith(GZIP_MAGIC):
        compression = "gzip"
        try:
            with gzip.open(path, "rb") as handle:
                head = handle.read(_SNIFF_BYTES)
        except (EOFError, OSError, zlib.error) as error:
            raise _cut_gzip(path, error) from None
        if not head:
            raise TripFileError(f"{path} is an empty gzip file; {_WHAT_TO_GIVE}")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        if b"\x00" in head:
            raise ValueError("NUL byte")
    except ValueError:
        raise TripFileError(f"{path} holds binary data, not CSV text or Parquet; {_WHAT_TO_GIVE}") from None
    return False, compression


def _cut_gzip(path: Path, error: Exception) -> TripFileError:
    return TripFileError(f"{path}: the gzip stream is cut short or corrupt ({error}); download or copy it again")


def _header(path: Path, parquet: bool, compression: str | None) -> list[str]:
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as error:
            raise TripFileError(f"{path} starts like Parquet but cannot be read as Parquet ({error}); "
                                "is it cut short?") from None
    try:
        return [str(name) for name in pd.read_csv(path, nrows=0, compression=compression).columns]
    except pd.errors.EmptyDataError:
        raise TripFileError(f"{path} has no header line (only blank lines); {_WHAT_TO_GIVE}") from None
    except (EOFError, OSError, zlib.error) as error:
        raise _cut_gzip(path, error) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise TripFileError(f"{path}: the header cannot be read as CSV ({error})") from None


def _layout(path: Path, header: list[str]) -> tlc.Layout:
    """The layout of ``header``, or a ``TripFileError`` naming the layouts known and what is missing."""
    layout = tlc.recognise(header)
    if layout is None:
        near, missing = tlc.closest(header)
        known = ", ".join(f"{known.name} ({known.era})" for known in tlc.LAYOUTS if known.refused is None)
        expected = "the Kaggle layout" if near.name == tlc.KAGGLE else f"the {near.name} layout"
        raise TripFileError(f"{path} is missing column(s) {', '.join(missing)}; expected {expected}: "
                            f"{','.join(near.columns.values())}. Layouts known: {known}")
    if layout.refused:
        raise TripFileError(f"{path} is a {layout.name} file ({layout.era}), which Periscope does not take: "
                            f"{layout.refused}; give a yellow or green cab file")
    return layout


def open_source(path: Path, tlc_layouts: bool = True) -> Source:
    """Check ``path`` and recognise its layout, reading only its first bytes and header.

    With ``tlc_layouts=False`` only the Kaggle layout is accepted: a TLC file
    is refused, naming its layout and the command that takes it.
    """
    path = Path(path)
    parquet, compression = _sniff(path)
    header = _header(path, parquet, compression)
    layout = _layout(path, header)
    if layout.name != tlc.KAGGLE and not tlc_layouts:
        raise TripFileError(f"{path} is a TLC trip file ({layout.name} layout, {layout.era}); this command "
                            "takes the Kaggle layout only for now: `python batch_processor.py import` "
                            "and `python kafka_producer.py` take TLC files")
    return Source(path, parquet, compression, header, layout)


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

    return _well_formed(pd.DataFrame(columns, index=raw.index), reason, culprit, lines, report)


def _well_formed(frame: pd.DataFrame, reason: np.ndarray, culprit: np.ndarray, lines: np.ndarray,
                 report: LoadReport) -> pd.DataFrame:
    """The rows without a reason; the others counted under theirs, the first few kept as examples."""
    bad_rows = np.flatnonzero(reason != "")
    report.malformed.update(reason[bad_rows])
    for row in bad_rows[: max(0, MAX_EXAMPLES - len(report.examples))]:
        blame = f" in {culprit[row]}" if culprit[row] else ""
        report.examples.append(f"line {lines[row]}: {reason[row]}{blame}")
    return frame[reason == ""].reset_index(drop=True)


_NOT_RULE_INPUTS = ("id", "store_and_fwd_flag", "service", "source_layout")


def rule_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The numeric columns of a trip frame, as ``schema.first_broken_rule`` takes them."""
    return {name: frame[name].to_numpy() for name in frame.columns if name not in _NOT_RULE_INPUTS}


def apply_rules(frame: pd.DataFrame, report: LoadReport | None = None) -> pd.DataFrame:
    """Keep the trips that pass every cleaning rule, counting the others."""
    broken = first_broken_rule(rule_columns(frame))
    if report is not None:
        for index, count in zip(*np.unique(broken[broken >= 0], return_counts=True)):
            report.broken_rules[RULES[index].name] += int(count)
    return frame[broken < 0].reset_index(drop=True)


def iter_trip_chunks(
    path: Path, report: LoadReport, *, clean: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    tlc_layouts: bool = False,
) -> Iterator[pd.DataFrame]:
    """Stream a trip file as trip frames of at most ``chunk_rows`` rows.

    Kaggle layout only, unless ``tlc_layouts``. ``report`` is updated as
    chunks are produced, so it is complete once the iterator is exhausted.
    Memory stays bounded by the chunk size. A file that turns out unreadable
    part-way (a gzip stream cut short) or holds no row raises
    ``TripFileError`` at the end: a caller that writes must write aside first.
    """
    source = open_source(Path(path), tlc_layouts)
    report.layout = source.layout.name
    try:
        if source.parquet:
            chunks = _parquet_chunks(source, report, chunk_rows)
        elif source.layout.name == tlc.KAGGLE:
            chunks = _kaggle_csv_chunks(source, report, chunk_rows)
        else:
            chunks = _tlc_csv_chunks(source, report, chunk_rows)
        for frame in chunks:
            yield apply_rules(frame, report) if clean else frame
    except (EOFError, zlib.error, OSError) as error:
        if source.compression == "gzip":
            raise _cut_gzip(source.path, error) from None
        raise TripFileError(f"{source.path} cannot be read ({type(error).__name__}: {error})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise TripFileError(f"{source.path} cannot be read as CSV past its header ({error})") from None
    except _arrow_errors() as error:
        raise TripFileError(f"{source.path}: the Parquet data cannot be read ({error}); is it cut short?") from None
    if report.rows_read == 0:
        raise TripFileError(f"{source.path} has a header ({source.layout.name} layout) but no rows of trips")


def _arrow_errors() -> tuple[type[Exception], ...]:
    import pyarrow as pa

    return (pa.ArrowException,)


def _csv_reader(source: Source, chunk_rows: int, **options) -> Iterator[tuple[pd.DataFrame, list[int]]]:
    """The file's rows as text, in chunks, with the line numbers pandas skipped for a wrong field count.

    The Kaggle columns are renamed to the schema's spelling (a header may differ in case).
    """
    fields = {column: name for name, column in source.columns.items()} if source.layout.name == tlc.KAGGLE else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = pd.read_csv(source.path, dtype=str, keep_default_na=False, chunksize=chunk_rows,
                             on_bad_lines="warn", compression=source.compression, **options)
        seen = 0
        for raw in reader:
            skipped = _skipped_lines(caught[seen:])
            seen = len(caught)
            yield raw.rename(columns=fields), skipped
        yield pd.DataFrame(columns=list(fields.values())), _skipped_lines(caught[seen:])


def _kaggle_csv_chunks(source: Source, report: LoadReport, chunk_rows: int) -> Iterator[pd.DataFrame]:
    next_line = 2
    for raw, skipped in _csv_reader(source, chunk_rows):
        _count_skipped(skipped, report)
        if len(raw) == 0:
            continue
        lines = _line_numbers(next_line, len(raw), skipped)
        next_line = int(lines[-1]) + 1 if len(lines) else next_line + len(skipped)
        report.rows_read += len(raw)
        yield _parse_chunk(raw, lines, report)


def _tlc_csv_chunks(source: Source, report: LoadReport, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """TLC CSV text: a line without any value (the 2009-2015 files' blank second line) is no row; a
    last line cut part-way (no newline, fewer fields than the header) is a ``wrong_field_count``."""
    layout, columns = source.layout, source.columns
    if len(source.header) != len(set(source.header)):  # pandas would rename a repeated name to a.1
        raise TripFileError(f"{source.path}: the header repeats a column name; give each column once")
    cut = _last_line_cut(source)
    next_line, pending = 2, None
    for raw, skipped in _csv_reader(source, chunk_rows, skip_blank_lines=False):
        _count_skipped(skipped, report)
        if pending is not None:
            yield _tlc_chunk(*pending, last=len(raw) == 0 and cut, layout=layout, columns=columns, report=report)
            pending = None
        if len(raw):
            lines = _line_numbers(next_line, len(raw), skipped)
            next_line = int(lines[-1]) + 1
            pending = (raw, lines)
    if pending is not None:
        yield _tlc_chunk(*pending, last=cut, layout=layout, columns=columns, report=report)


def _tlc_chunk(raw: pd.DataFrame, lines: np.ndarray, *, last: bool, layout: tlc.Layout,
               columns: dict[str, str], report: LoadReport) -> pd.DataFrame:
    blank_line = ((raw == "") | raw.isna()).all(axis=1).to_numpy()
    raw, lines = raw[~blank_line].reset_index(drop=True), lines[~blank_line]
    report.rows_read += len(raw)
    truncated = np.zeros(len(raw), dtype=bool)
    if last and len(raw):
        truncated[-1] = True
    frame, reason, culprit = tlc.parse(raw, layout, columns, truncated)
    return _well_formed(frame, reason, culprit, lines, report)


def _last_line_cut(source: Source) -> bool:
    """Does the file end part-way through a line: no final newline, and fewer fields than the header?"""
    tail = b""
    if source.compression == "gzip":
        with gzip.open(source.path, "rb") as handle:
            while block := handle.read(1 << 20):
                tail = (tail + block)[-_SNIFF_BYTES:]
    else:
        with open(source.path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _SNIFF_BYTES))
            tail = handle.read()
    if not tail or tail.endswith(b"\n"):
        return False
    last = tail.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")
    return len(next(csv.reader([last]), [])) < len(source.header)


def _parquet_chunks(source: Source, report: LoadReport, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Parquet row groups in batches; Kaggle columns parsed as the text a Kaggle CSV would hold, so a
    row is judged as in a CSV; TLC columns parsed from their types. Examples name rows from 1."""
    import pyarrow.parquet as pq

    columns = source.columns
    wanted = sorted(set(columns.values()), key=source.header.index)
    first_row = 1
    for batch in pq.ParquetFile(source.path).iter_batches(batch_size=chunk_rows, columns=wanted):
        raw = batch.to_pandas()
        if source.layout.name == tlc.KAGGLE:
            raw = raw.rename(columns={column: name for name, column in columns.items()})
        rows = np.arange(first_row, first_row + len(raw))
        first_row += len(raw)
        report.rows_read += len(raw)
        if source.layout.name == tlc.KAGGLE:
            text = pd.DataFrame({name: _kaggle_text(raw[name]) for name in FIELDS}, index=raw.index)
            yield _parse_chunk(text, rows, report)
        else:
            frame, reason, culprit = tlc.parse(raw, source.layout, columns)
            yield _well_formed(frame, reason, culprit, rows, report)


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


def read_trips(path: Path, *, clean: bool = False, tlc_layouts: bool = False) -> tuple[pd.DataFrame, LoadReport]:
    """The whole file as one trip frame plus its report (for files that fit in memory).

    Kaggle layout (CSV, gzip or Parquet) unless ``tlc_layouts``; see ``iter_trip_chunks``.
    """
    report = LoadReport(source=str(path))
    chunks = list(iter_trip_chunks(Path(path), report, clean=clean, tlc_layouts=tlc_layouts))
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
    A file named ``.parquet`` that is not Parquet is a ``TripFileError``.
    """
    return read_trips(path)


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
