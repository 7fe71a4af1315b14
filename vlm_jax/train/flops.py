"""Model FLOPs per training sample from the config (for MFU), from the family's forward FLOPs per component.

A training step costs 3x forward for a component with trainable parameters (forward + activation and weight
gradients), 2x for a frozen component that gradients must still flow through (a trainable component feeds
it), and 1x for a frozen component nothing upstream trains (the family's `towers` are fed by nothing).
"""
from __future__ import annotations

from vlm_jax.config import ModelConfig
from vlm_jax.families import get_family


def train_flops_per_sample(m: ModelConfig, seq_len: int, num_images: int, trainable: frozenset[str]) -> float:
    family = get_family(m)
    total, upstream_trains = 0.0, False
    for component, forward in family.forward_flops(m, seq_len, num_images).items():
        trains = any(p.startswith(component + "/") for p in trainable)
        gradient_flows = upstream_trains and component not in family.towers
        total += forward * (3 if trains else 2 if gradient_flows else 1)
        upstream_trains |= trains
    return total


def forward_flops(m: ModelConfig, seq_len: int, num_images: int) -> dict[str, float]:
    """Forward FLOPs of one sample per component, in data-flow order (num_images: image slots per sample)."""
    return get_family(m).forward_flops(m, seq_len, num_images)
