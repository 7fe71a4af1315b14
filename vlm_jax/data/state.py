"""Iterator state keyed by global sample position, and re-sharding it to another process count.

Process p of P reads global positions `base + p + i * P` for stream index i = 0, 1, ... and skips the
positions in `skip` (consumed by other processes before a re-shard). Its state is the first stream index
not yet emitted (`next`) plus record counts, as plain JSON. Packing and skipped records make processes
consume different numbers of positions, so a re-shard starts the new processes at the first position
nobody consumed and carries the consumed positions beyond it in `skip`: nothing is lost or repeated.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from vlm_jax.paths import user_path

STATE_VERSION = 1


@dataclass
class Cursor:
    process_index: int
    process_count: int
    base: int = 0
    skip: frozenset = field(default_factory=frozenset)
    next: int = 0  # first stream index not yet emitted in a batch (or counted as bad)

    def position(self, stream_index: int) -> int:
        return self.base + self.process_index + stream_index * self.process_count

    def state(self) -> dict:
        return {"version": STATE_VERSION, "process_index": self.process_index,
                "process_count": self.process_count, "base": self.base, "skip": sorted(self.skip),
                "next": self.next}

    @classmethod
    def from_state(cls, state: dict) -> "Cursor":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} is not {STATE_VERSION}; "
                             "it was written by another vlm_jax version")
        return cls(state["process_index"], state["process_count"], state["base"], frozenset(state["skip"]),
                   state["next"])


def _merge_records(states: Sequence[dict]) -> dict:
    bad: dict[str, int] = {}
    for s in states:
        for reason, n in s["records"]["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    return {"good": sum(s["records"]["good"] for s in states), "bad": bad,
            "truncated": sum(s["records"]["truncated"] for s in states)}


def reshard_states(states: Sequence[dict], process_count: int) -> list[dict]:
    """All P per-process states of one checkpoint -> `process_count` states that continue exactly.

    Record counts are merged into the new process 0 (the others start from zero).
    """
    states = sorted(states, key=lambda s: s["process_index"])
    cursors = [Cursor.from_state(s) for s in states]
    old_count = cursors[0].process_count
    if [c.process_index for c in cursors] != list(range(old_count)) or \
            any(c.process_count != old_count for c in cursors):
        raise ValueError(f"re-sharding needs the states of all {old_count} processes of one checkpoint, "
                         f"got process indices {[c.process_index for c in cursors]}")
    base, skip = cursors[0].base, cursors[0].skip

    def first_unread(c: Cursor) -> int:
        i = c.next
        while c.position(i) in skip:
            i += 1
        return c.position(i)

    new_base = min(first_unread(c) for c in cursors)
    consumed_beyond = {g for g in skip if g >= new_base}
    for c in cursors:
        first = max(0, -(-(new_base - base - c.process_index) // old_count))
        consumed_beyond.update(c.position(i) for i in range(first, c.next))
    empty = {"good": 0, "bad": {}, "truncated": 0}
    return [{**Cursor(p, process_count, new_base, frozenset(consumed_beyond)).state(),
             "records": _merge_records(states) if p == 0 else empty} for p in range(process_count)]


_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def restore_state(directory, process_index: int, process_count: int) -> dict:
    """This process's state from a directory written by grain's Orbax CheckpointHandler
    (`process_{i}-of-{n}.json`), re-sharded when the checkpoint came from another process count."""
    directory = user_path(directory, "data-iterator state directory")
    own = directory / f"process_{process_index}-of-{process_count}.json"
    if own.is_file():
        return json.loads(own.read_text())
    files = {m.groups(): path for path in directory.glob("process_*-of-*.json")
             if (m := _STATE_FILE.search(path.name))}
    counts = {int(n) for _, n in files}
    if len(counts) != 1:
        raise ValueError(f"{directory}: expected data-iterator states of one process count, found counts "
                         f"{sorted(counts) or 'none'}")
    states = [json.loads(path.read_text()) for path in files.values()]
    return reshard_states(states, process_count)[process_index]
