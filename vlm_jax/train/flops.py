"""Model FLOPs of a training step (for MFU), from the family's forward FLOPs per parameter group.

Each group (one layer's attention or MLP, an embedding, a head: vlm_jax/models/flops.py) with forward FLOPs F
costs 3F when any of its parameters trains (train.trainable/frozen: forward, activation and weight gradients),
2F when it is frozen but a trainable group lies upstream of it (forward and the activation gradient that must
pass through it to reach that group), and 1F when it is frozen and nothing upstream trains (a frozen tower, or
the frozen first layers of a stack: no gradient reaches them). A group whose matmul weights are frozen but whose own norm
scale or gate trains costs 2F (the gradient passes through it). Kept simple on purpose: the first trainable group
after a frozen prefix is billed 3F although the gradient with respect to its own input is not needed (a small
over-count, e.g. a trainable projector above a frozen tower).
"""
from __future__ import annotations

import functools
import re

from vlm_jax.config import ModelConfig
from vlm_jax.families import get_family


def train_flops(m: ModelConfig, batch: dict, trainable: frozenset[str], padded: bool = False,
                reference: bool = False) -> float:
    """Training FLOPs of one step on `batch` (all its rows; see `Family.flops_groups` for `padded`), plus one
    forward pass of the frozen reference model with `reference` (DPO scores every batch under it)."""
    groups = get_family(m).flops_groups(m, batch, padded)
    feeds, total = {}, 0.0  # feeds: the group's output carries a gradient (it or something upstream trains)
    for g in groups:
        trains = _trains(g.params, trainable)
        crossed = any(feeds[i] for i in g.inputs) or bool(g.norms and _trains(g.norms, trainable))
        feeds[g.name] = trains or crossed
        total += g.forward * ((3 if trains else 2 if crossed else 1) + int(reference))
    return total


@functools.lru_cache(maxsize=4096)
def _trains(pattern: str, trainable: frozenset[str]) -> bool:
    return any(re.match(pattern, p) for p in trainable)
