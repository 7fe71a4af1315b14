"""What every objective returns: SUMS over the batch, so gradient accumulation over microbatches is exact
(token-weighted, not microbatch-averaged); the step divides by `weight`.

An objective is `fn(model, params, inputs, batch, train) -> LossSums`, registered by name in OBJECTIVES:
`inputs` are the batch entries the family's model takes, `batch` the whole batch (targets, masks, ...).
"""
from __future__ import annotations

from typing import NamedTuple

import jax


class LossSums(NamedTuple):
    nll: jax.Array  # sum of the weighted loss (next-token: -log p(target))
    z: jax.Array  # sum of weighted logsumexp^2 (z-loss; 0 where it does not apply)
    weight: jax.Array  # what the sums are over (supervised tokens, or rows)
