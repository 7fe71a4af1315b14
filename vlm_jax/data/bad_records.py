"""Unusable records: why they are skipped, how many were, and when there are too many to go on."""
from __future__ import annotations

import logging

from vlm_jax.errors import UserError

log = logging.getLogger("vlm_jax.data")

REASONS = (
    "bad_json",  # the record does not parse, or lacks the fields its format needs
    "invalid_utf8",
    "empty_text",  # no non-empty answer/caption
    "missing_image",
    "corrupt_image",  # undecodable or truncated image bytes
    "empty_image",  # zero bytes or zero pixels
    "unsupported_image",  # decodes, but has no stated RGB meaning (e.g. negative 32-bit samples, NaN floats)
    "image_count_mismatch",  # <image> placeholders and images disagree
    "too_many_images",  # more image slots than data.shapes.max_images
    "too_long",  # longer than data.shapes.seq_len (overflow=drop), or nothing supervised survives truncation
    "record_kind",  # an SFT record where a preference objective reads pairs (chosen/rejected), or the reverse
)

# Log the first few records per reason loudly; the rest only at DEBUG so a bad shard cannot flood logs.
_LOUD_PER_REASON = 5


class BadRecord(Exception):
    """Raised while reading or preparing one record; the pipeline counts it and moves on."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason '{reason}'; add it to REASONS")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooManyBadRecords(UserError, RuntimeError):
    """The share of unusable records passed data.max_bad_fraction; the message is one line."""


class BadRecordCounter:
    """Counts good and bad records per reason and enforces data.max_bad_fraction."""

    def __init__(self, max_fraction: float, min_records: int, counts: dict | None = None, good: int = 0):
        self.max_fraction = max_fraction
        self.min_records = min_records
        self.counts = {r: 0 for r in REASONS}
        self.counts.update(counts or {})
        self.good = good

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def add_good(self):
        self.good += 1

    def add_bad(self, reason: str, detail: str, where: str):
        self.counts[reason] += 1
        level = logging.WARNING if self.counts[reason] <= _LOUD_PER_REASON else logging.DEBUG
        log.log(level, "skipped record %s: %s%s", where, reason, f" ({detail})" if detail else "")
        if self.counts[reason] == _LOUD_PER_REASON:
            log.warning("further '%s' records are logged at DEBUG level only", reason)
        self.check()

    def check(self, final: bool = False):
        """Raises TooManyBadRecords once enough records were seen (or at the end of a finite pass)."""
        if self.seen == 0 or (self.seen < self.min_records and not final):
            return
        if self.bad / self.seen <= self.max_fraction:
            return
        worst = max(self.counts, key=self.counts.get)
        raise TooManyBadRecords(
            f"{self.bad} of {self.seen} input records were unusable ({self.bad / self.seen:.1%} > "
            f"data.max_bad_fraction={self.max_fraction:.1%}; most common: {worst} x{self.counts[worst]}); "
            "fix the data or raise data.max_bad_fraction")

    def state(self) -> dict:
        return {"good": self.good, "bad": {r: n for r, n in self.counts.items() if n}}
