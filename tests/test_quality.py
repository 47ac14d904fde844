"""periscope.quality: the data-quality gate on real views of the real sample, and real defects."""
from __future__ import annotations

import copy

import pytest

import batch_processor
from periscope import quality, views


@pytest.fixture(scope="module")
def computed(tmp_path_factory, sample_csv):
    master = tmp_path_factory.mktemp("quality") / "master"
    batch_processor.import_csv(sample_csv, master)
    batch_views, manifest = batch_processor.compute_views(master, workers=1, progress=False)
    return master, batch_views, manifest


def test_real_views_pass(computed, sample_raw):
    master, batch_views, manifest = computed
    file_rows = quality.master_rows(master, manifest)
    assert sum(file_rows.values()) == len(sample_raw)
    assert quality.check(batch_views, manifest, file_rows, previous=None) == []


def test_staged_views_read_back_identical(computed, tmp_path):
    _, batch_views, manifest = computed
    quality.stage(tmp_path / "run", batch_views, manifest)
    quality.stage(tmp_path / "run", batch_views, manifest)  # a retried task replaces its staging
    staged_views, staged_manifest = quality.read_staged(tmp_path / "run")
    assert views.views_equal(staged_views, batch_views) and staged_manifest == manifest
    with pytest.raises(FileNotFoundError, match="compute_views task did not finish"):
        quality.read_staged(tmp_path / "nothing")


def test_negative_durations_and_miscounted_views_fail(computed):
    master, batch_views, manifest = computed
    broken = {name: frame.copy() for name, frame in batch_views.items()}
    broken["hourly_stats"].loc[0, "duration_s_min"] = -5
    broken["vendor_stats"].loc[0, "trips"] += 1
    problems = quality.check(broken, manifest, quality.master_rows(master, manifest), None)
    assert any("hourly_stats has a negative duration_s" in p for p in problems)
    assert any("vendor_stats counts" in p for p in problems)


def test_row_counts_must_match_the_master_files(computed, sample_raw):
    master, batch_views, manifest = computed
    file_rows = quality.master_rows(master, manifest)
    fewer = copy.deepcopy(manifest)
    fewer["rows"]["master"] -= 10
    problems = quality.check(batch_views, fewer, file_rows, None)
    assert any(f"the master files hold {len(sample_raw):,}" in p for p in problems)
    gone = {path: -1 for path in file_rows}
    assert any("vanished" in p for p in quality.check(batch_views, manifest, gone, None))


def test_thresholds_and_empty_views(computed):
    master, batch_views, manifest = computed
    file_rows = quality.master_rows(master, manifest)
    strict = quality.Thresholds(max_rejected_share=0.001)
    assert any("rejected 0.80%" in p for p in quality.check(batch_views, manifest, file_rows, None, strict))
    empty_views, empty_manifest = batch_processor.compute_views(master.parent / "empty", 1, progress=False)
    problems = quality.check(empty_views, empty_manifest, {}, None)
    assert problems == ["only 0 clean trips, fewer than 1: is master data empty? "
                        "(`python batch_processor.py import` or run the simulation DAG)"]


def test_the_watermark_never_goes_backwards(computed):
    master, batch_views, manifest = computed
    file_rows = quality.master_rows(master, manifest)
    previous = {**manifest, "watermark": {"0": 99, "1": 5}}
    problems = quality.check(batch_views, {**manifest, "watermark": {"0": 120, "1": 4}}, file_rows, previous)
    assert problems == ["the watermark would go backwards (partition: old, new): {'1': (5, 4)}"]
    assert quality.check(batch_views, {**manifest, "watermark": {"0": 99, "1": 5}}, file_rows, previous) == []


def test_same_inputs_compares_files_and_rows(computed):
    _, _, manifest = computed
    assert quality.same_inputs(manifest, copy.deepcopy(manifest))
    assert not quality.same_inputs(manifest, None)
    more = copy.deepcopy(manifest)
    more["input_files"].append({"path": "stream/t/p000/x.avro", "rows": 3})
    assert not quality.same_inputs(more, manifest)
