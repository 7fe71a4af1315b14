"""What every objective returns: SUMS over the batch, so gradient accumulation over microbatches is exact
(token-weighted, not microbatch-averaged); the step divides by `weight`.

An objective is `fn(model, params, inputs, batch, train) -> LossSums`, registered by name in OBJECTIVES:
`inputs` are the batch entries the family's model takes, `batch` the whole batch (targets, masks, ...).
An objective that scores preference pairs sets `paired = True` on itself: its batches hold the chosen answer in
row 2i and the rejected one in row 2i+1 (same prompt, same images). One that also compares against a frozen
reference model (DPO) sets `uses_reference = True`: its batches carry a `reference_logps` column that the
trainer computes with the reference params (those the stage starts from) before each step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax

REFERENCE_LOGPS = "reference_logps"  # (B,) float32: the reference model's answer log-prob of each row


def is_paired(objective) -> bool:
    """Whether `objective` (a registered objective function) reads preference pairs."""
    return getattr(objective, "paired", False)


def needs_reference(objective) -> bool:
    """Whether `objective` reads the frozen reference's `reference_logps` column (implies paired batches)."""
    return getattr(objective, "uses_reference", False)


class LossSums(NamedTuple):
    nll: jax.Array  # sum of the weighted loss (next-token: -log p(target))
    z: jax.Array  # sum of weighted logsumexp^2 (z-loss; 0 where it does not apply)
    weight: jax.Array  # what the sums are over (supervised tokens, rows, or preference pairs)
    # Further per-unit quantities, summed like `nll` (the step divides them by `weight` and logs them by name).
    metrics: dict = {}
