"""periscope.partitioner: the partition Kafka's default partitioner picks, computed a chunk of keys at a time.

The producer passes these partitions to ``send()`` instead of letting
kafka-python hash every key itself, so they must be exactly kafka-python's (and
the Java client's): otherwise a trip id would land in another partition than
any other client puts it in.
"""
from __future__ import annotations

import random

import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2

from periscope.partitioner import key_partitions, murmur2

# Kafka's own test vectors (org.apache.kafka.common.utils.UtilsTest.testMurmur2), as Java ints
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def random_keys(seed: int = 7) -> list[bytes]:
    """Bytes of every length from 0 to 23 (all four tail lengths), and ids like the producer's."""
    rng = random.Random(seed)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 24))) for _ in range(3000)]
    return keys + [f"id{rng.randrange(10**7):07d}-{rng.randrange(2, 200)}".encode() for _ in range(3000)]


def test_murmur2_is_the_java_clients():
    keys = list(JAVA_MURMUR2)
    as_java_int = [h - (1 << 32) if h >= 1 << 31 else h for h in murmur2(keys).tolist()]
    assert as_java_int == list(JAVA_MURMUR2.values())


def test_murmur2_is_kafka_pythons():
    keys = random_keys() + list(JAVA_MURMUR2)
    assert murmur2(keys).tolist() == [kafka_murmur2(key) & 0xFFFFFFFF for key in keys]


@pytest.mark.parametrize("partitions", [[0, 1, 2], [0], list(range(7)), [2, 0, 1]])
def test_partitions_are_those_of_kafkas_default_partitioner(partitions):
    keys = random_keys()
    ordered = sorted(partitions)  # kafka-python's DefaultPartitioner indexes the sorted partitions
    expected = [ordered[(kafka_murmur2(key) & 0x7FFFFFFF) % len(ordered)] for key in keys]
    assert key_partitions(keys, partitions) == expected


def test_no_keys_no_partitions():
    assert murmur2([]).tolist() == [] and key_partitions([], [0, 1, 2]) == []
