"""periscope.quality: the data-quality gate on real views of the real sample, and real defects."""
from __future__ import annotations

import copy

import pytest

import pandas as pd

import batch_processor
from periscope import quality, views
from periscope.schema import parse_cutoff
from periscope.storage import BatchVersion


@pytest.fixture(scope="module")
def computed(tmp_path_factory, sample_csv):
    """The real sample imported twice: the history before the cutoff, then the whole file."""
    master = tmp_path_factory.mktemp("quality") / "master"
    batch_processor.import_csv(sample_csv, master, cutoff_ms=parse_cutoff("2016-06-01"))
    batch_processor.import_csv(sample_csv, master)
    version = batch_processor.compute_views(master, workers=1, progress=False)
    return master, version.views, version.manifest, version.trip_ids


def test_real_views_with_duplicates_pass(computed, sample_csv):
    master, batch_views, manifest, trip_ids = computed
    file_rows = quality.master_rows(master, manifest)
    raw = pd.read_csv(sample_csv)
    before = int((pd.to_datetime(raw["pickup_datetime"]) < pd.Timestamp("2016-06-01")).sum())
    assert sum(file_rows.values()) == len(raw) + before
    assert manifest["rows"]["duplicates"] == before and manifest["rows"]["distinct"] == raw["id"].nunique()
    assert quality.check(batch_views, manifest, file_rows, previous=None, trip_ids=trip_ids) == []


def test_the_counts_must_add_up(computed):
    master, batch_views, manifest, trip_ids = computed
    file_rows = quality.master_rows(master, manifest)
    fewer_copies = copy.deepcopy(manifest)
    fewer_copies["rows"]["duplicates"] -= 1
    distinct = manifest["rows"]["distinct"]
    problems = quality.check(batch_views, fewer_copies, file_rows, None)
    assert any(p.startswith(f"distinct ({distinct:,}) + duplicates") for p in problems)
    assert any("the input files' duplicates do not add up" in p for p in problems)
    counted_twice = copy.deepcopy(manifest)
    counted_twice["rows"]["distinct"] += 5
    counted_twice["rows"]["duplicates"] -= 5
    counted_twice["input_files"][1]["duplicates"] -= 5
    problems = quality.check(batch_views, counted_twice, file_rows, None, trip_ids=trip_ids)
    assert any(p.startswith("clean (") and f"!= distinct trips ({distinct + 5:,})" in p for p in problems)
    assert any(f"the trip index holds {distinct:,} ids, not one per distinct trip ({distinct + 5:,})" in p
               for p in problems)


def test_staged_views_read_back_identical(computed, tmp_path):
    _, batch_views, manifest, trip_ids = computed
    version = BatchVersion(batch_views, manifest, trip_ids)
    quality.stage(tmp_path / "run", version)
    quality.stage(tmp_path / "run", version)  # a retried task replaces its staging
    staged = quality.read_staged(tmp_path / "run")
    assert views.views_equal(staged.views, batch_views) and staged.manifest == manifest
    assert staged.trip_ids.equals(trip_ids)
    with pytest.raises(FileNotFoundError, match="compute_views task did not finish"):
        quality.read_staged(tmp_path / "nothing")


def test_negative_durations_and_miscounted_views_fail(computed):
    master, batch_views, manifest, _ = computed
    broken = {name: frame.copy() for name, frame in batch_views.items()}
    broken["hourly_stats"].loc[0, "duration_s_min"] = -5
    broken["vendor_stats"].loc[0, "trips"] += 1
    problems = quality.check(broken, manifest, quality.master_rows(master, manifest), None)
    assert any("hourly_stats has a negative duration_s" in p for p in problems)
    assert any("vendor_stats counts" in p for p in problems)


def test_row_counts_must_match_the_master_files(computed):
    master, batch_views, manifest, _ = computed
    file_rows = quality.master_rows(master, manifest)
    fewer = copy.deepcopy(manifest)
    fewer["rows"]["master"] -= 10
    problems = quality.check(batch_views, fewer, file_rows, None)
    assert any(f"the master files hold {sum(file_rows.values()):,}" in p for p in problems)
    gone = {path: -1 for path in file_rows}
    assert any("vanished" in p for p in quality.check(batch_views, manifest, gone, None))


def test_thresholds_and_empty_views(computed):
    master, batch_views, manifest, _ = computed
    file_rows = quality.master_rows(master, manifest)
    strict = quality.Thresholds(max_rejected_share=0.001)
    assert any("rejected 0.80% of the distinct trips" in p
               for p in quality.check(batch_views, manifest, file_rows, None, strict))
    empty = batch_processor.compute_views(master.parent / "empty", 1, progress=False)
    problems = quality.check(empty.views, empty.manifest, {}, None, trip_ids=empty.trip_ids)
    assert problems == ["only 0 clean trips, fewer than 1: is master data empty? "
                        "(`python batch_processor.py import` or run the simulation DAG)"]


def test_the_watermark_never_goes_backwards(computed):
    master, batch_views, manifest, _ = computed
    file_rows = quality.master_rows(master, manifest)
    previous = {**manifest, "watermark": {"0": 99, "1": 5}}
    problems = quality.check(batch_views, {**manifest, "watermark": {"0": 120, "1": 4}}, file_rows, previous)
    assert problems == ["the watermark would go backwards (partition: old, new): {'1': (5, 4)}"]
    assert quality.check(batch_views, {**manifest, "watermark": {"0": 99, "1": 5}}, file_rows, previous) == []


def test_same_inputs_compares_files_and_rows(computed):
    _, _, manifest, _ = computed
    assert quality.same_inputs(manifest, copy.deepcopy(manifest))
    assert not quality.same_inputs(manifest, None)
    more = copy.deepcopy(manifest)
    more["input_files"].append({"path": "stream/t/p000/x.avro", "rows": 3})
    assert not quality.same_inputs(more, manifest)
