"""Exact removal of duplicate facts: the first copy of each trip id, in source order, counts.

The master dataset may hold a trip twice (a file imported and also replayed,
a producer restarted after a crash): the trip id is its identity, so the
batch layer keeps the first copy in source order (``storage.master_files``,
then row order within a file) and leaves out every later one. The test is
exact: polars compares the id strings themselves (its hash table confirms
equal hashes by comparing the strings), so no distinct trip can be lost to a
collision, as it could with a Bloom filter or a bare 64-bit hash.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl


def drop_duplicates(ids_per_file: Sequence[pl.Series]) -> tuple[list[np.ndarray], pl.Series]:
    """For the id columns of master files in source order: per file, which rows are first copies,
    and the distinct ids, sorted.

    ``first[i][j]`` is True when row ``j`` of file ``i`` holds an id that no
    earlier row (of an earlier file, or earlier in the same file) holds.
    """
    ids = pl.concat([pl.Series("id", [], dtype=pl.String), *ids_per_file], rechunk=False).rename("id")
    is_first = ids.is_first_distinct()
    first = is_first.to_numpy()
    bounds = np.cumsum([0] + [len(file_ids) for file_ids in ids_per_file])
    return [first[start:end] for start, end in zip(bounds[:-1], bounds[1:])], ids.filter(is_first).sort()
