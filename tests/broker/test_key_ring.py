"""A key ring that reloads its keys: new workers trusted at their first word, floods cheap."""

from __future__ import annotations

from pathlib import Path

from broker.identity import KeyRing
from fedmq.keys import KeyFolder


class Source:
    """Keys to reload, and how often they were read."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.stamp = 0
        self.reads = 0

    def read(self) -> dict[str, bytes]:
        self.reads += 1
        return dict(self.keys)


def test_a_flood_of_unknown_names_reads_the_keys_once_an_interval() -> None:
    source = Source()
    ring = KeyRing(reload=source.read, reload_every_s=3600)

    assert [ring(f"stranger-{n}") for n in range(100)] == [None] * 100

    assert source.reads == 1  # at construction only: within the interval nothing more


def test_a_key_added_since_the_last_read_is_found_at_once_when_the_stamp_says_so() -> None:
    source = Source()
    ring = KeyRing(reload=source.read, reload_every_s=3600, stamp=lambda: source.stamp)
    source.keys["w1"] = b"1" * 32
    source.stamp += 1
    assert ring("w1") == b"1" * 32
    source.keys["w2"] = b"2" * 32  # a second worker, within the interval

    assert ring("w2") is None  # the stamp did not change: within the interval, not read
    source.stamp += 1
    assert ring("w2") == b"2" * 32
    assert [ring("stranger") for _ in range(10)] == [None] * 10
    assert source.reads == 3  # at construction and at each change: the flood read nothing


def test_two_workers_started_together_are_both_trusted_from_the_key_folder(tmp_path: Path) -> None:
    folder = KeyFolder(tmp_path)
    first = folder.worker_identity("worker-1")
    ring = KeyRing(reload=folder.worker_keys, reload_every_s=3600, stamp=folder.worker_keys_stamp)
    assert ring("worker-1") == first.public_key

    second = folder.worker_identity("worker-2")  # a moment later, in the same interval

    assert ring("worker-2") == second.public_key
    assert ring("worker-3") is None
