"""Assigning examples to the rows of one fixed-shape batch (first fit), with or without packing."""
from __future__ import annotations


class RowPacker:
    """Rows of one batch. Without packing each row takes one example; with packing an example goes to
    the first row that still has room for its tokens and image slots."""

    def __init__(self, batch_size: int, seq_len: int, max_slots: int, pack: bool):
        self.seq_len, self.max_slots, self.pack = seq_len, max_slots, pack
        self.rows: list[list[dict]] = [[] for _ in range(batch_size)]
        self._tokens = [0] * batch_size
        self._slots = [0] * batch_size

    def add(self, example: dict) -> bool:
        """Places the example and returns True, or returns False when no row has room (batch is full)."""
        tokens, slots = len(example["tokens"]), example["num_slots"]
        for r, row in enumerate(self.rows):
            if row and not self.pack:
                continue
            if self._tokens[r] + tokens <= self.seq_len and self._slots[r] + slots <= self.max_slots:
                row.append(example)
                self._tokens[r] += tokens
                self._slots[r] += slots
                return True
        return False

    @property
    def num_examples(self) -> int:
        return sum(len(row) for row in self.rows)
