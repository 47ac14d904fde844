"""The simulated trips API: which trips "happen" in a time interval, and publishing them once.

The Airflow DAG ``taxi_api_simulation`` (``airflow/dags/taxi_api_simulation_dag.py``)
calls ``publish_interval`` once per data interval. There is no real taxi API, so
the shipped 2016 sample plays one, on a loop:

* **Retiming by whole weeks.** Every trip is shifted by a whole number of weeks,
  so its weekday and hour of day (what the model and the hour-of-week view use)
  stay what they really were; ``pickup_day_of_year`` does not. Cycle 0 starts
  on the last day, on or before the simulation's anchor (the DAG's
  ``start_date``), that has the weekday of the sample's first day, and lasts
  as many whole weeks as the sample spans (26 for 1 January - 30 June 2016,
  which fills them exactly); cycle 1 follows, and so on forever. An interval ``[start, end)`` gets exactly
  the trips whose *retimed* pickup falls in it, so consecutive intervals never
  share a trip and never skip one.
* **New facts, new ids.** A retimed trip is a trip of the simulated API, not
  the sample's trip again, so it gets an id of its own: cycle 0 sends
  ``id2875421-sim1``, cycle 1 ``id2875421-sim2``, and so on. (With the
  sample's ids the batch layer would count them as copies of the history it
  imported, once, at their 2016 time: a trip's id is its identity.)
* **The clock.** Trip times carry no time zone (Kaggle's New York wall clock);
  the simulation maps Airflow's UTC intervals onto that clock one to one, so no
  daylight-saving switch makes an hour happen twice or not at all.
* **Messages** are exactly the producer's: key = trip id, value =
  ``schema.record_to_json`` plus ``original_pickup_datetime`` and
  ``original_dropoff_datetime`` (consumers ignore extra fields), sent with
  ``acks=all`` by an idempotent producer.

Publishing once per interval. A ledger file per interval
(``var/simulation/<topic>/<start>--<end>.json``) records what was sent:

1. ledger says ``published`` -> send nothing (a re-run, or a retry after success);
2. no ledger -> write it as ``pending`` with the planned trip ids and the
   topic's end offsets *before* sending; send; flush; check every delivery;
   rewrite it as ``published`` with the offsets each trip got;
3. ledger says ``pending`` (an attempt died between sending and the final
   ledger write) -> read the topic back from the recorded end offsets and send
   only the planned messages (same key and same bytes) that are not there.

So every planned trip lands exactly once, whatever crashes, as long as the
ledger directory survives and the topic keeps the messages (retention counts
from production time). Deleting ``var/simulation`` makes re-runs publish again.
"""
from __future__ import annotations

import calendar
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from periscope.schema import format_time, record_to_json
from periscope.storage import atomic_write_json, locked, read_json

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
READ_BACK_IDLE_MS = 2_000


# --- pure functions: the timeline and what an interval holds ------------------------------


def same_weekday_on_or_before(ms: int, like_ms: int) -> int:
    """00:00 of the last day on or before ``ms`` that has the weekday of ``like_ms``."""
    day = ms // DAY_MS
    return (day - (day - like_ms // DAY_MS) % 7) * DAY_MS


def to_ms(moment: datetime) -> int:
    """A timezone-aware datetime as ms since 1970-01-01 00:00 UTC (the trips' clock, see above)."""
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone; Airflow's data interval bounds always have one")
    return calendar.timegm(moment.utctimetuple()) * 1000 + moment.microsecond // 1000


def last_whole_hour(ms: int) -> tuple[int, int]:
    """``[start, end)`` of the last whole hour that ended at or before ``ms``.

    The interval of a manual run without a logical date (Airflow 3's default
    for ``airflow dags trigger`` and the UI), taken from when it was triggered.
    """
    end = ms - ms % HOUR_MS
    return end - HOUR_MS, end


def compact(ms: int) -> str:
    """``20260105T100000`` for a ledger file name."""
    return format_time(ms).replace("-", "").replace(":", "").replace(" ", "T")


@dataclass(frozen=True)
class Timeline:
    """How the sample repeats: cycle ``k`` is the sample shifted by ``shift_ms(k)``."""

    origin_ms: int  # 00:00 of the sample's first day
    anchor_ms: int  # where cycle 0 begins: a day on or before the simulation's start, origin's weekday
    cycle_ms: int  # whole weeks covering the sample

    def shift_ms(self, cycle: int) -> int:
        return self.anchor_ms - self.origin_ms + cycle * self.cycle_ms


def make_timeline(pickups_ms: np.ndarray, anchor_ms: int) -> Timeline:
    """The timeline of a sample whose pickups are ``pickups_ms``, starting at ``anchor_ms``."""
    if len(pickups_ms) == 0:
        raise ValueError("the sample has no trips to simulate")
    first = int(np.min(pickups_ms))
    origin = first - first % DAY_MS
    weeks = (int(np.max(pickups_ms)) - origin) // WEEK_MS + 1
    return Timeline(origin, same_weekday_on_or_before(anchor_ms, origin), weeks * WEEK_MS)


def simulated_suffix(cycle: int) -> str:
    """The id suffix of the simulated API's trips in ``cycle`` (0-based): -sim1, -sim2, ..."""
    return f"-sim{cycle + 1}"


def select_interval(trips: pd.DataFrame, timeline: Timeline, start_ms: int, end_ms: int) -> pd.DataFrame:
    """The trips whose retimed pickup is in ``[start_ms, end_ms)``, retimed, in pickup order.

    ``trips`` must be sorted by pickup (``kafka_producer.replay_order``). The
    result has the trip columns (ids suffixed per cycle, times shifted) plus
    ``original_pickup_datetime`` and ``original_dropoff_datetime`` in ms.
    """
    if end_ms <= start_ms:
        raise ValueError(f"empty interval: end {format_time(end_ms)} is not after start {format_time(start_ms)}")
    if start_ms < timeline.anchor_ms:
        raise ValueError(f"interval starts at {format_time(start_ms)}, before the simulation's first week "
                         f"({format_time(timeline.anchor_ms)}); move the DAG's start_date earlier")
    pickups = trips["pickup_datetime"].to_numpy()
    parts = []
    first_cycle = (start_ms - timeline.anchor_ms) // timeline.cycle_ms
    last_cycle = (end_ms - 1 - timeline.anchor_ms) // timeline.cycle_ms
    for cycle in range(first_cycle, last_cycle + 1):
        shift = timeline.shift_ms(cycle)
        lo, hi = np.searchsorted(pickups, [start_ms - shift, end_ms - shift], side="left")
        part = trips.iloc[lo:hi].copy()
        part["original_pickup_datetime"] = part["pickup_datetime"]
        part["original_dropoff_datetime"] = part["dropoff_datetime"]
        part["pickup_datetime"] += shift
        part["dropoff_datetime"] += shift
        part["id"] = part["id"] + simulated_suffix(cycle)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def to_messages(selected: pd.DataFrame) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of each selected trip, as ``kafka_producer.py --retime`` encodes them."""
    messages = []
    for record in selected.to_dict("records"):
        original = {"original_pickup_datetime": format_time(record.pop("original_pickup_datetime")),
                    "original_dropoff_datetime": format_time(record.pop("original_dropoff_datetime"))}
        messages.append((record["id"].encode(), record_to_json(record, **original)))
    return messages


def still_to_send(planned: list[tuple[bytes, bytes]], landed: set[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The planned messages not found in the topic (after an attempt that died mid-way)."""
    return [message for message in planned if message not in landed]


# --- the ledger -------------------------------------------------------------------------------


def ledger_path(ledger_dir: Path, topic: str, start_ms: int, end_ms: int) -> Path:
    return Path(ledger_dir) / topic / f"{compact(start_ms)}--{compact(end_ms)}.json"


def read_ledger(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None


# --- I/O: Kafka ---------------------------------------------------------------------------------


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The next offset of every partition of ``topic``: where anything sent from now on will land."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise FileNotFoundError(f"topic {topic!r} does not exist at {bootstrap}: "
                                    "create it with `python -m periscope.kafka_local create-topics`")
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        consumer.close()


def read_topic(bootstrap: str, topic: str, since: dict[int, int]) -> list[Any]:
    """Every message of ``topic`` from offsets ``since`` (per partition; 0 where absent) to the current end."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        end = consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, since.get(tp.partition, 0))
        messages = []
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for tp, batch in consumer.poll(timeout_ms=READ_BACK_IDLE_MS).items():
                messages += [m for m in batch if m.offset < end[tp]]
        return messages
    finally:
        consumer.close()


def send(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> dict[str, list[int]]:
    """Send with ``acks=all`` and idempotence, wait for every acknowledgement; ``{id: [partition, offset]}``.

    Raises if any message was not acknowledged: the caller must not record the interval as published.
    """
    from kafka import KafkaProducer

    from periscope.stream import PRODUCER_CONFIG

    settings = {**PRODUCER_CONFIG, "client_id": "periscope-api-simulation"}
    producer = KafkaProducer(bootstrap_servers=bootstrap, **settings)
    try:
        futures = [(key, producer.send(topic, key=key, value=value)) for key, value in messages]
        producer.flush()
        placed = {}
        for key, future in futures:
            metadata = future.get(timeout=0)  # raises the delivery error, if any
            placed[key.decode()] = [metadata.partition, metadata.offset]
        return placed
    finally:
        producer.close()


@dataclass
class Outcome:
    """What one call of ``publish_interval`` did, for the task log and the tests."""

    ledger: Path
    planned: int
    sent: int
    already_in_topic: int
    skipped_as_published: bool

    def line(self) -> str:
        if self.skipped_as_published:
            return (f"{self.ledger.name}: already published ({self.planned} trips, ledger {self.ledger}); "
                    "nothing sent")
        recovered = (f", {self.already_in_topic} found in the topic from an earlier attempt"
                     if self.already_in_topic else "")
        return f"{self.ledger.name}: {self.planned} trips planned, {self.sent} sent{recovered}; ledger {self.ledger}"


def publish_interval(trips: pd.DataFrame, timeline: Timeline, start_ms: int, end_ms: int,
                     bootstrap: str, topic: str, ledger_dir: Path) -> Outcome:
    """Publish the interval's trips exactly once (see the module docstring for the protocol)."""
    path = ledger_path(ledger_dir, topic, start_ms, end_ms)
    planned = to_messages(select_interval(trips, timeline, start_ms, end_ms))
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        ledger = read_ledger(path)
        if ledger and ledger["status"] == "published":
            return Outcome(path, int(ledger["trips"]), 0, 0, True)
        landed: set[tuple[bytes, bytes]] = set()
        if ledger and ledger["status"] == "pending":
            since = {int(p): int(o) for p, o in ledger["end_offsets_before"].items()}
            landed = {(m.key, m.value) for m in read_topic(bootstrap, topic, since)}
            log.info("%s: an earlier attempt did not finish; read the topic back from %s", path.name, since)
        else:
            ledger = {
                "status": "pending",
                "topic": topic,
                "interval": [format_time(start_ms), format_time(end_ms)],
                "trips": len(planned),
                "ids": [key.decode() for key, _ in planned],
                "end_offsets_before": end_offsets(bootstrap, topic),
            }
            atomic_write_json(path, ledger)
        missing = still_to_send(planned, landed)
        placed = send(bootstrap, topic, missing) if missing else {}
        atomic_write_json(path, {**ledger, "status": "published", "sent_by_last_attempt": len(missing),
                                 "placed_by_last_attempt": placed})
    return Outcome(path, len(planned), len(missing), len(planned) - len(missing), False)
