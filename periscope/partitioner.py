"""The partition Kafka's default partitioner picks for a key, a chunk of keys at a time.

Kafka's default partitioner (``Utils.murmur2`` in the Java client,
``kafka.partitioner.DefaultPartitioner`` in kafka-python) sends a keyed message
to partition ``(murmur2(key) & 0x7FFFFFFF) % n`` of the topic's ``n`` sorted
partitions, so every message with the same key lands in the same partition, in
the order it was sent. kafka-python works that out in pure Python for every
message; ``kafka_producer.py`` works it out here, with numpy, for a chunk of
keys at a time, and hands the partition to ``send()`` (about a third less CPU
per trip; see ``periscope/producer_tuning.py``). The answer is the
same partition: ``tests/test_partitioner.py`` checks it against kafka-python's
own murmur2 and Kafka's Java test vectors.
"""
from __future__ import annotations

import numpy as np

MURMUR2_SEED, MURMUR2_M = 0x9747B28C, np.uint32(0x5BD1E995)


def murmur2(keys: list[bytes]) -> np.ndarray:
    """Kafka's murmur2 hash of each key (as ``Utils.murmur2`` in the Java client), as uint32.

    Keys of the same length are hashed together, four bytes at a time, in
    uint32 arithmetic that wraps around exactly as Java's int does.
    """
    hashes = np.empty(len(keys), dtype=np.uint32)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        data = np.frombuffer(b"".join([keys[row] for row in rows]), dtype=np.uint8).reshape(len(rows), length)
        whole = length // 4
        words = data[:, :whole * 4].copy().view("<u4")
        h = np.full(len(rows), MURMUR2_SEED ^ length, dtype=np.uint32)
        with np.errstate(over="ignore"):
            for column in range(whole):
                k = words[:, column] * MURMUR2_M
                k ^= k >> np.uint32(24)
                k *= MURMUR2_M
                h *= MURMUR2_M
                h ^= k
            if length % 4:
                for byte in range(length % 4 - 1, -1, -1):
                    h ^= data[:, whole * 4 + byte].astype(np.uint32) << np.uint32(8 * byte)
                h *= MURMUR2_M
            h ^= h >> np.uint32(13)
            h *= MURMUR2_M
            h ^= h >> np.uint32(15)
        hashes[rows] = h
    return hashes


def key_partitions(keys: list[bytes], partitions: list[int]) -> list[int]:
    """The partition Kafka's default partitioner picks for each key (Java and kafka-python alike)."""
    positive = murmur2(keys).astype(np.int64) & 0x7FFFFFFF
    return np.asarray(sorted(partitions))[positive % len(partitions)].tolist()
